"""Every method against its official code, side by side: one process, interleaved calls, the same random weights.

For each method that has an adapter here (`ADAPTERS`, filled by `@official_adapter(slug)`), the official module is
imported from a local clone of its repository (fetched by you, never vendored: `--official SLUG=PATH`), built with
random weights, and those weights are loaded into ours. Each table row then times the official module and our
variants (unfused / fused, bf16, compiled, ... as the adapter offers) in turn, A, B, C, A, B, C, ..., on the same
input, and keeps the medians (hfpapers.testing.benchmark.interleaved_medians): a busy spell on a shared machine
slows every variant alike, so trust the ratios more than the img/s. It also prints each variant's largest
absolute output difference from the official module, and the fraction of the fp32 matmul rate (a 2048^3 matmul
timed in the same run) that the FLOPs of our fastest fp32 variant reach.

    python evaluation/benchmarks/side_by_side.py --official efficientvim=/tmp/EfficientViM \\
        scaling-mlp=/tmp/scaling_mlps [--methods efficientvim] [--presets M1 M4] [--threads 2] [--repeats 7]
        [--warmup 2] [--compile] [--json out.json]

A bare `--official PATH` is accepted when `--methods` names one method. Official code published on PyPI
(TrAct's torch-tract) can be given as `--official tract=pip`: the installed package is imported. Adding a method:
write a function that takes (repository path, args) and yields `Row`s, decorate it with
`@official_adapter("<slug>")`; see the ones below.
What the official repositories need: EfficientViM imports timm (its reparameterised model is timed too when timm
is importable); both import a package only for FLOP counting or downloads (fvcore, progressbar), replaced by an
empty module when missing. CroCo (naver/croco) needs only torch and numpy; without its compiled CUDA kernel it
warns and runs RoPE through its PyTorch fallback, which is what it is timed with on a CPU. LayerDiffuse
(lllyasviel/sd-forge-layerdiffuse) needs diffusers; the Forge, OpenCV and torchvision imports at the top of its
models.py become empty modules when missing. FTWT (selkerdawy/FTWT): its `utils` package is loaded without its
`__init__` (which imports tensorboardX and torchvision), thop becomes an empty module. Pooling And Attention
(yixuantt/PoolingAndAttn) needs einops (`pip install einops`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import json
import os
import platform
import sys
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import hfpapers
from hfpapers.testing.benchmark import MATMUL_SIZE, MachineLoad, count_flops, interleaved_medians, matmul_gflops

OFFICIAL = "official"
CODE_HOSTS = ("https://github.com/", "https://gitlab.com/")
INSTALLED = Path("pip")  # `--official SLUG=pip`: the official package installed by pip, not a clone


@dataclass
class Row:
    """One line of a method's table: callables timed in turn, the first one the official module."""

    model: str  # what is timed, e.g. "M1 forward, batch 16"
    items_per_call: int  # images per call: the table shows images/s
    variants: dict[str, Callable[[], object]]  # name -> one call; OFFICIAL first
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # variant -> largest |output - official output|
    flops_per_call: float | None = None  # matmul-like FLOPs of one call of our fp32 variants
    goal: str = ""
    images_per_s: dict[str, float] = field(default_factory=dict)  # filled by main


ADAPTERS: dict[str, Callable[[Path, argparse.Namespace], Iterator[Row]]] = {}


def official_adapter(slug: str):
    """Register `fn(repository_path, args) -> Iterator[Row]` as the side-by-side comparison of method `slug`."""
    def register(fn):
        ADAPTERS[slug] = fn
        return fn
    return register


def import_official(repository: Path, subdirectory: str, module: str, optional: Mapping | None = None,
                    installed: str | None = None):
    """Import `module` from `repository/subdirectory` (prepended to sys.path). The modules in `optional` (name ->
    the names imported from it), which the official code needs only for FLOP counting or downloads, become
    placeholders holding None when they are not installed. Official code published on PyPI names its installed
    package in `installed`: with `--official SLUG=pip` (`repository` is INSTALLED) that package is imported."""
    if repository == INSTALLED:
        if installed is None:
            raise ValueError(f"{module!r} is not on PyPI: pass --official with the root of a clone, not {INSTALLED}")
        try:
            return importlib.import_module(installed)
        except ImportError as error:
            raise ImportError(f"--official ...={INSTALLED} imports the installed package {installed!r}: {error}") \
                from error
    root = repository / subdirectory
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: pass the root of a clone of the official repository")
    for name, attributes in (optional or {}).items():
        try:
            importlib.import_module(name)
        except ImportError:
            for part in range(1, name.count(".") + 2):
                dotted = ".".join(name.split(".")[:part])
                sys.modules.setdefault(dotted, types.ModuleType(dotted))
            for attribute in attributes:
                setattr(sys.modules[name], attribute, None)
    top = module.split(".")[0]
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        if not str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(root)):
            del sys.modules[name]  # another repository's package of the same name (both have `models`)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(root))


def presets_for(slug: str, args, default: tuple[str, ...]) -> list[str]:
    """The --presets that method `slug` has (all of `default` when none was given)."""
    if not args.presets:
        return list(default)
    return [p for p in args.presets if p in hfpapers.get_method(slug).presets]


def max_abs_diff(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    reference = outputs[OFFICIAL].float()
    return {name: (out.float() - reference).abs().max().item() for name, out in outputs.items() if name != OFFICIAL}


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile of an inference copy, with inductor's freezing (weights as constants: prepacked for oneDNN)."""
    torch._inductor.config.freezing = True
    return torch.compile(model, fullgraph=True, dynamic=False)  # each preset its own static graph


# --- EfficientViM ---------------------------------------------------------------------------------------------------


@official_adapter("efficientvim")
def efficientvim_rows(repository: Path, args) -> Iterator[Row]:
    """Forward (eval, inference_mode) of the official EfficientViM_M*, timm's model and its reparameterised copy
    (when timm is importable), ours and our fused copy; BatchNorm statistics and gates randomised so that the
    folding is really exercised (efficientvim_speed.perturb_inference_statistics)."""
    from efficientvim_speed import perturb_inference_statistics
    from hfpapers.methods.efficientvim.convert_efficientvim import convert_state_dict

    official_models = import_official(repository, "classification", "models", optional={"fvcore.nn": ("flop_count",)})
    try:
        import timm
        from timm.models.efficientvim import checkpoint_filter_fn
        from timm.utils.model import reparameterize_model
    except ImportError:
        timm = None
    batch = args.batch_size or 16
    for preset in presets_for("efficientvim", args, hfpapers.get_method("efficientvim").paper_presets):
        torch.manual_seed(0)
        official = getattr(official_models, f"EfficientViM_{preset}")().eval()
        perturb_inference_statistics(official, torch.Generator().manual_seed(0))
        state = official.state_dict()
        ours = hfpapers.create_model("efficientvim", preset=preset).eval()
        ours.load_state_dict(convert_state_dict(state, ours.config))
        fused = copy.deepcopy(ours).fuse()
        size = ours.config.image_size
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        variants = {OFFICIAL: lambda m=official: m(x)}
        if timm is not None:
            reference = timm.create_model(f"efficientvim_{preset.lower()}").eval()
            reference.load_state_dict(checkpoint_filter_fn(state, reference))
            variants["timm"] = lambda m=reference: m(x)
            variants["timm reparameterised"] = lambda m=reparameterize_model(copy.deepcopy(reference)): m(x)
        variants["ours"] = lambda: ours(pixel_values=x).logits
        variants["ours fused"] = lambda: fused(pixel_values=x).logits
        if args.compile:
            fast = compiled(fused)
            variants["ours fused, compiled"] = lambda: fast(pixel_values=x).logits
        with torch.inference_mode():
            diffs = max_abs_diff({name: fn() for name, fn in variants.items()})
            flops = count_flops(lambda: ours(pixel_values=x))  # the fused convs' oneDNN calls are not counted
        yield Row(f"{preset} forward, {size}px, batch {batch}", batch, variants, diffs, flops,
                  goal="ours fused >= 1.3x official, > timm reparameterised")


# --- Scaling MLP ----------------------------------------------------------------------------------------------------


@official_adapter("scaling-mlp")
def scaling_mlp_rows(repository: Path, args) -> Iterator[Row]:
    """The official BottleneckMLP against ours: forward (eval, inference_mode; also `fuse()`d, under bf16 autocast,
    and compiled with --compile), and a train step: forward, cross-entropy, backward, LION step, zero_grad; the
    official loop (train.py: its model and its Lion) against ours (our model and ScalingMLPRecipe's optimiser)."""
    from hfpapers.methods.scaling_mlp.convert_scaling_mlp import convert_state_dict
    from hfpapers.methods.scaling_mlp.recipe import ScalingMLPRecipe

    networks = import_official(repository, ".", "models.networks", optional={"progressbar": ()})
    official_lion = import_official(repository, ".", "utils.optimizer").Lion
    batch = args.batch_size or 64
    for preset in presets_for("scaling-mlp", args, ("B_12-Wi_1024",)):
        ours = hfpapers.create_model("scaling-mlp", preset=preset).eval()
        c = ours.config
        torch.manual_seed(0)
        official = networks.BottleneckMLP(c.input_dim, c.num_labels,
                                          [[c.expansion_factor * c.hidden_size, c.hidden_size]] * c.num_blocks,
                                          norm=c.norm_type).eval()
        ours.load_state_dict(convert_state_dict(official.state_dict()))
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=generator)
        labels = torch.randint(c.num_labels, (batch,), generator=generator)
        flat = x.flatten(1)

        fused = copy.deepcopy(ours).fuse()  # prepacked oneDNN weights, GELU inside the GEMM
        variants = {OFFICIAL: lambda: official(flat), "ours": lambda: ours(pixel_values=x).logits,
                    "ours fused": lambda: fused(pixel_values=x).logits,
                    "ours bf16 autocast": lambda: _bf16(lambda: ours(pixel_values=x).logits)}
        if args.compile:
            fast = compiled(copy.deepcopy(ours))
            variants["ours compiled"] = lambda: fast(pixel_values=x).logits
        with torch.inference_mode():
            diffs = max_abs_diff({name: fn() for name, fn in variants.items()})
            flops = count_flops(lambda: ours(pixel_values=x))
        yield Row(f"{preset} forward, batch {batch}", batch, variants, diffs, flops,
                  goal="ours fused >= 0.70 of the matmul rate")

        # Train steps from the same weights: the official loop (train.py's order) and ours.
        official.train(), ours.train()
        lr = 1e-4

        def official_step(model=official, optimizer=official_lion(official.parameters(), lr=lr)):
            loss = torch.nn.CrossEntropyLoss()(model(flat), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        train_args = types.SimpleNamespace(learning_rate=lr, weight_decay=0.0)
        ours_optimizer = ScalingMLPRecipe().build_optimizer(ours, train_args)

        def ours_step(model=ours, optimizer=ours_optimizer):
            F.cross_entropy(model(pixel_values=x).logits, labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # The check: 3 steps of each from the same weights, then the largest parameter difference.
        before = copy.deepcopy(official.state_dict())
        for _ in range(3):
            official_step(), ours_step()
        after = convert_state_dict(official.state_dict())
        diff = max((ours.state_dict()[k] - v).abs().max().item() for k, v in after.items())
        official.load_state_dict(before), ours.load_state_dict(convert_state_dict(before))
        yield Row(f"{preset} train step (LION), batch {batch}", batch, {OFFICIAL: official_step, "ours": ours_step},
                  {"ours": diff}, 3 * flops, goal="ours >= 1.3x official")


def _bf16(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


# --- CroCo ------------------------------------------------------------------------------------------------------------


class _FixedMask(torch.nn.Module):
    """Stands in for the official `RandomMask`: the same mask every call, so both models reconstruct one mask."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return self.mask


@official_adapter("croco")
def croco_rows(repository: Path, args) -> Iterator[Row]:
    """Pair forward (eval, inference_mode) of the official `CroCoNet` against our `CroCoForPretraining`, items =
    pairs: the same random weights (converted with `convert_croco`), the same pair batch and the same mask. Without
    its compiled CUDA kernel the official code runs RoPE through its PyTorch fallback, which rebuilds the rotary
    tables in every attention call; ours builds them once per forward and attends through SDPA."""
    from hfpapers.methods.croco.convert_croco import KWARGS, convert_state_dict
    from hfpapers.methods.croco.modeling_croco import random_mask

    croco_net = import_official(repository, ".", "models.croco").CroCoNet
    batch = args.batch_size or 4
    for preset in presets_for("croco", args, ("croco-v1", "croco-v2-vitb-small")):
        ours = hfpapers.create_model("croco", preset=preset, head="AutoModelForPreTraining").eval()
        c = ours.config
        positions = "cosine" if c.position_embedding == "cosine" else f"RoPE{c.rope_base:g}"
        torch.manual_seed(0)
        official = croco_net(pos_embed=positions, **{theirs: getattr(c, name) for theirs, name in KWARGS.items()})
        official.eval()
        ours.load_state_dict(convert_state_dict(official.state_dict(), c))
        n = official.patch_embed.num_patches
        mask = random_mask(batch, n, int(c.mask_ratio * n), torch.Generator().manual_seed(0))
        official.mask_generator = _FixedMask(mask)
        generator = torch.Generator().manual_seed(1)
        image, reference = torch.randn(2, batch, 3, c.image_size, c.image_size, generator=generator)
        variants = {OFFICIAL: lambda: official(image, reference)[0],
                    "ours": lambda: ours(image, reference, mask=mask).logits}
        with torch.inference_mode():
            diffs = max_abs_diff({name: fn() for name, fn in variants.items()})
            flops = count_flops(lambda: ours(image, reference, mask=mask))
        yield Row(f"{preset} ({positions}) pair forward, {c.image_size}px, batch {batch} pairs", batch, variants,
                  diffs, flops, goal="ours faster than official; RoPE without the official fallback's penalty")


# --- LayerDiffuse -----------------------------------------------------------------------------------------------------


@official_adapter("layerdiffusion")
def layerdiffusion_rows(repository: Path, args) -> Iterator[Row]:
    """One pass of the transparent decoder at 512 px (eval, inference_mode): the official `UNet1024` forward against
    our `TransparentVAEDecoder` (the same raw output: alpha, then RGB), in fp32 and on our bf16 path (bf16 autocast;
    the two highest-resolution levels stay fp32). The official file imports Forge (`backend`), OpenCV and
    torchvision at the top for its pipeline helpers; the decoder needs none of them, so they are placeholders when
    missing. Its `latent_conv_in` starts at zero (so the latent would not count): it gets random weights."""
    # imported before the placeholders exist: diffusers' and transformers' find_spec checks fail on them
    from hfpapers.methods.layerdiffusion.modeling_layerdiffusion import TransparentVAEDecoder

    # "backend" first: the placeholder made for "backend.patcher.base" would make it look installed
    models = import_official(repository, ".", "lib_layerdiffusion.models",
                             optional={"cv2": (), "torchvision": ("transforms",), "backend": ("memory_management",),
                                       "backend.patcher.base": ("ModelPatcher",)})
    for name in [n for n in sys.modules if n.split(".")[0] in ("cv2", "torchvision", "backend")]:
        if sys.modules[name].__spec__ is None:  # a placeholder: gone again, for the other adapters' imports (timm)
            del sys.modules[name]
    batch, size = args.batch_size or 1, 512
    torch.manual_seed(0)
    official = models.UNet1024(in_channels=3, out_channels=4).eval()  # as the official TransparentVAEDecoder
    official.latent_conv_in.reset_parameters()
    ours = TransparentVAEDecoder().eval()  # the released architecture, the official parameter names
    ours.load_state_dict(official.state_dict())
    generator = torch.Generator().manual_seed(1)
    pixel = torch.rand(batch, 3, size, size, generator=generator)  # VAE-decoded RGB in [0, 1]
    latent = torch.randn(batch, 4, size // 8, size // 8, generator=generator)
    variants = {OFFICIAL: lambda: official(pixel, latent), "ours": lambda: ours(pixel, latent).sample,
                "ours bf16 autocast": lambda: _bf16(lambda: ours(pixel, latent).sample)}
    with torch.inference_mode():
        diffs = max_abs_diff({name: fn() for name, fn in variants.items()})
        flops = count_flops(lambda: ours(pixel, latent))
    yield Row(f"transparent decoder, one pass, {size}px, batch {batch}", batch, variants, diffs, flops,
              goal="ours <= official in fp32; bf16 path about 2x faster (error <= 1e-2)")


# --- TrAct ------------------------------------------------------------------------------------------------------------


def _tract_models(batch: int) -> dict[str, tuple[str, torch.nn.Module, str, torch.Tensor]]:
    """--presets key -> (row name, model, its first layer's name, pixel batch); random weights."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=64, hidden_sizes=[64, 128], depths=[1, 1],
                                                       layer_type="basic", num_labels=10,
                                                       downsample_in_first_stage=False))
    # The CIFAR variant of ResNet-18's stem (3x3, stride 1, no max-pool), as in the paper's CIFAR runs.
    resnet.resnet.embedder.embedder.convolution = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)
    resnet.resnet.embedder.pooler = torch.nn.Identity()
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=4,
                                              num_attention_heads=3, intermediate_size=384, num_labels=10))
    mlp = hfpapers.create_model("scaling-mlp", preset="tiny", num_labels=10)
    generator = torch.Generator().manual_seed(1)
    return {
        "resnet": ("ResNet, CIFAR stem 3x3 (n = 27), 32px", resnet, "resnet.embedder.embedder.convolution",
                   torch.randn(batch, 3, 32, 32, generator=generator)),
        "vit": ("ViT, 4x4 patches (n = 48), 32px", vit, "vit.embeddings.patch_embeddings.projection",
                torch.randn(batch, 3, 32, 32, generator=generator)),
        "scaling-mlp": ("Scaling MLP tiny, Linear on pixels (n = 768), 16px", mlp, "mlp.linear_in",
                        torch.randn(batch, 3, 16, 16, generator=generator)),
    }


def _sgd_step(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()

    return step


@official_adapter("tract")
def tract_rows(repository: Path, args) -> Iterator[Row]:
    """The cost of a TrAct train step (forward with labels, loss, backward, SGD step), l = 0.1: the official
    `TrAct` wrapper (torch-tract) on the first layer, the plain step without TrAct, and ours (`apply_tract`), on
    copies of one model (same weights, same batch). Models (`--presets resnet vit scaling-mlp`, default all): a
    ResNet with the CIFAR stem (the paper's ResNet-18 setting), a ViT with 4x4 patches, and the zoo's tiny Scaling
    MLP (n > batch: the Woodbury form). The difference column: the largest parameter difference between ours and
    the official after 3 steps from the same weights."""
    from hfpapers.methods.tract import apply_tract

    # The clone's src/ is the package that pip installs as torch_tract (setup.py's package_dir).
    official_tract = import_official(repository, ".", "src", installed="torch_tract")
    batch = args.batch_size or 128
    for key, (name, plain, layer, pixels) in _tract_models(batch).items():
        if args.presets and key not in args.presets:
            continue
        labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
        official = copy.deepcopy(plain)
        owner, _, attribute = layer.rpartition(".")
        setattr(official.get_submodule(owner), attribute,
                official_tract.TrAct(official.get_submodule(layer), l=0.1))  # keeps the weight's name
        ours = copy.deepcopy(plain)
        apply_tract(ours, 0.1, layer=layer)
        steps = {OFFICIAL: _sgd_step(official, pixels, labels), "plain (no TrAct)": _sgd_step(plain, pixels, labels),
                 "ours": _sgd_step(ours, pixels, labels)}
        before = copy.deepcopy(plain.state_dict())
        for _ in range(3):
            steps[OFFICIAL](), steps["ours"]()
        reference = official.state_dict()
        diff = max((v - reference[k]).abs().max().item() for k, v in ours.state_dict().items())
        official.load_state_dict(before), ours.load_state_dict(before)
        yield Row(f"{name} train step (SGD), batch {batch}", batch, steps, {"ours": diff},
                  goal="ours step <= torch-tract's step")


# --- FTWT -------------------------------------------------------------------------------------------------------------

_FTWT_OFFICIAL = {"resnet56-cifar10": "resnet56", "vgg16-bn-cifar10": "vgg16_bn"}  # preset -> models.cifar builder
_FTWT_KEEP = 0.5  # share of each unit's filters the predictors switch on (differently for each image)


def _ftwt_import(repository: Path):
    """The official `models.cifar` and `utils.layers`. The clone's `utils/__init__.py` imports its training tools
    (tensorboardX, torchvision, a progress bar), which the models do not use: `utils` is registered as a bare package
    over the clone's folder, so that only `utils.layers` (torch, numpy, matplotlib) runs. thop, imported by the
    ResNet for FLOP counting only, becomes an empty module when missing."""
    if not (repository / "utils" / "layers.py").is_file():
        raise FileNotFoundError(f"{repository / 'utils' / 'layers.py'} does not exist: pass the root of a clone of "
                                "selkerdawy/FTWT")
    for name in [n for n in sys.modules if n == "utils" or n.startswith("utils.")]:
        del sys.modules[name]  # another repository's `utils` (scaling_mlps has one)
    package = types.ModuleType("utils")
    package.__path__ = [str(repository / "utils")]
    package.__file__ = str(repository / "utils" / "__init__.py")  # never run
    sys.modules["utils"] = package
    cifar = import_official(repository, ".", "models.cifar",
                            optional={"thop": ("profile",), "thop.vision.basic_hooks": ("zero_ops",)})
    return cifar, sys.modules["utils.layers"]


def _ftwt_official_masking(layers, official: torch.nn.Module, config) -> list[torch.nn.Module]:
    """The official `fuse_masking` (utils/utils.py, not imported: it imports torchvision's datasets): every conv
    unit wrapped in the official `ConvWithMask` with its predictor (`--embedding -1`), the second conv of a
    BasicBlock masked before the residual sum (`--gtafterblock False`, the default). Returns the units in order."""
    def wrap(conv, bn, fn):
        return layers.ConvWithMask(conv, bn, fn, target=-1, nclass=config.num_labels, ratio=config.mass_threshold,
                                   do_softmax=int(config.predictor_softmax), mode=config.mask_mode,
                                   gt_type=config.gt_type)

    official.baseline = False
    if config.backbone == "vgg":
        features, modules, units, i = list(official.features), [], [], 0
        while i < len(features):  # conv, BN, ReLU -> one masked unit; the max pools stay
            if isinstance(features[i], torch.nn.Conv2d):
                units.append(wrap(*features[i:i + 3]))
                modules.append(units[-1])
                i += 3
            else:
                modules.append(features[i])
                i += 1
        official.features = torch.nn.Sequential(*modules)
        return units
    official.masked_conv = wrap(official.conv1, official.bn1, official.relu)
    units = [official.masked_conv]
    for block in (b for stage in (official.layer1, official.layer2, official.layer3) for b in stage):
        block.masked_conv1 = wrap(block.conv1, block.bn1, block.relu)
        block.masked_conv2 = wrap(block.conv2, block.bn2, torch.nn.Identity())
        block.gtafterblock = block.baseline = False
        units += [block.masked_conv1, block.masked_conv2]
    return units


@official_adapter("ftwt")
def ftwt_rows(repository: Path, args) -> Iterator[Row]:
    """Inference (eval, inference_mode) of the official CIFAR ResNet-56 and VGG-16-BN with their mask predictors
    (`fuse_masking`, then the masked forward its `test()` runs: every convolution computed in full, then multiplied
    by the binary mask; it also computes the self-supervised targets and a FLOP count) against ours: the default
    execution (the same masked dense forward, without targets), the sparse execution (`sparse=True`: only the
    predicted filters run, over the channels that can be non-zero, one image at a time) and the dense network
    (`masking=False`, predictors off; its logits differ, so no difference is shown). Our random weights, with random
    BN statistics and predictors set so that about half of each unit's filters run, differently for each image
    (`ftwt.set_keep_share`), are loaded into the official modules; the same mass threshold r on both."""
    from ftwt import set_keep_share

    cifar, layers = _ftwt_import(repository)
    batch = args.batch_size or 64
    for preset in presets_for("ftwt", args, tuple(_FTWT_OFFICIAL)):
        if preset not in _FTWT_OFFICIAL:
            raise ValueError(f"--presets {preset}: the official FTWT code has CIFAR models only "
                             f"({', '.join(_FTWT_OFFICIAL)})")
        torch.manual_seed(0)
        ours = hfpapers.create_model("ftwt", preset=preset).eval()
        set_keep_share(ours, _FTWT_KEEP)
        c = ours.config
        official = getattr(cifar, _FTWT_OFFICIAL[preset])(num_classes=c.num_labels)
        units = _ftwt_official_masking(layers, official, c)
        pairs = [pair for unit, predictor, theirs in zip(ours.ftwt.masked_units(), ours.ftwt.mask_predictors, units,
                                                         strict=True)
                 for pair in ((unit.convolution, theirs.conv), (unit.normalization, theirs.bn),
                              (predictor.conv, theirs.mask.model[-1]))]
        pairs.append((ours.classifier, official.classifier if c.backbone == "vgg" else official.fc))
        for mine, theirs in pairs:
            theirs.load_state_dict(mine.state_dict())
        official.eval()
        dense = copy.deepcopy(ours)
        dense.config.masking = False
        x = torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(1))
        variants = {OFFICIAL: lambda m=official: m(x)[0], "ours": lambda m=ours: m(pixel_values=x).logits,
                    "ours sparse": lambda m=ours: m(pixel_values=x, sparse=True).logits,
                    "ours dense (masking off)": lambda m=dense: m(pixel_values=x).logits}
        with torch.inference_mode():
            diffs = max_abs_diff({n: fn() for n, fn in variants.items() if n != "ours dense (masking off)"})
            sparse = ours(pixel_values=x, sparse=True)
            flops = count_flops(lambda: ours(pixel_values=x))  # the full convolutions of the masked dense forward
        kept = torch.cat([m.flatten() for m in sparse.masks]).mean().item()
        executed = sparse.macs.mean().item() / ours.dense_macs()
        yield Row(f"{preset} forward, {c.image_size}px, batch {batch}, r = {c.mass_threshold}; {kept:.0%} of filters "
                  f"on, sparse runs {executed:.0%} of the dense MACs", batch, variants, diffs, flops,
                  goal="ours >= official; masked filters really skipped (the official code only multiplies by "
                       "the masks)")


# --- Pooling And Attention (llm-embedding) ----------------------------------------------------------------------------


@official_adapter("llm-embedding")
def llm_embedding_rows(repository: Path, args) -> Iterator[Row]:
    """The multi-layer trainable pooler of Models 3 and 5 alone (eval, inference_mode): 768 latents query one state
    per decoder layer, 32 heads x 2048, GEGLU x4, at the decoder's width (default preset qwen2-0.5b-model-5: 24 x
    896 in). The official `PerceiverResampler` (pooling_layers/MultiLayersTrainablePooling.py, built as
    model_loaders/model5.py builds it: every size the decoder's hidden size, 32 layer rows of which the first
    num_layers are used) against our `TrainablePooler`, in fp32 and under bf16 autocast; the difference column is
    the pooled (L2-normalised) embedding's. The decoder is not run: the per-layer token means it would feed the pooler (of a
    512-token input in the paper's setting; the sequence length does not reach the pooler) are random states."""
    from hfpapers.methods.llm_embedding.configuration_llm_embedding import LLMEmbeddingConfig
    from hfpapers.methods.llm_embedding.convert_llm_embedding import convert_pooler_state_dict
    from hfpapers.methods.llm_embedding.modeling_llm_embedding import TrainablePooler

    try:
        resampler = import_official(repository, ".", "pooling_layers.MultiLayersTrainablePooling").PerceiverResampler
    except ModuleNotFoundError as error:
        if error.name != "einops":
            raise
        raise ImportError("the official pooler imports einops: pip install einops") from error
    record = hfpapers.get_method("llm-embedding")
    batch = args.batch_size or 1
    for preset in presets_for("llm-embedding", args, ("qwen2-0.5b-model-5",)):
        config = LLMEmbeddingConfig(**record.presets[preset].config)
        if config.pooling != "multi_layer_trainable":
            raise ValueError(f"--presets {preset}: the llm-embedding adapter times the multi-layer pooler (Models 3 "
                             "and 5); this preset has none")
        c = config.pooler_config
        torch.manual_seed(0)
        official = resampler(dim=c.hidden_size, hidden_dim=c.hidden_size, latent_dim=c.latent_size).eval()
        # no grad flags: FlopCounterMode's module hooks fail on the expanded latents (a view of a parameter that
        # requires grad) under inference_mode
        ours = TrainablePooler(c).eval().requires_grad_(False)
        ours.load_state_dict(convert_pooler_state_dict(official.state_dict(), c.num_layers))
        states = torch.randn(batch, c.num_layers, c.hidden_size, generator=torch.Generator().manual_seed(1))
        variants = {OFFICIAL: lambda: official(states), "ours": lambda: ours(states),
                    "ours bf16 autocast": lambda: _bf16(lambda: ours(states))}
        with torch.inference_mode():
            diffs = max_abs_diff({name: fn() for name, fn in variants.items()})
            flops = count_flops(lambda: ours(states))
        yield Row(f"{preset} pooler forward ({c.num_layers} layer states x {c.hidden_size} in; {c.num_latents} "
                  f"latents, {c.num_heads} heads x {c.head_dim}), batch {batch}", batch, variants, diffs, flops,
                  goal="ours >= official; bf16 >= 1.8x at <= 1e-2")


# --- the run ----------------------------------------------------------------------------------------------------------


def parse_official(values: list[str], methods: list[str] | None, parser) -> dict[str, Path]:
    paths = {}
    for value in values:
        slug, sep, path = value.partition("=")
        if not sep:
            if not methods or len(methods) != 1:
                parser.error(f"--official {value}: give SLUG=PATH, or name exactly one method with --methods")
            slug, path = methods[0], value
        if slug not in ADAPTERS:
            parser.error(f"--official {value}: no side-by-side adapter for {slug!r} (have: {', '.join(ADAPTERS)})")
        paths[slug] = Path(path).expanduser()
    return paths


def method_table(rows: list[Row], peak: float) -> str:
    names = list(dict.fromkeys(n for row in rows for n in row.variants))  # every row's variants, in order
    ours = [n for n in names if n != OFFICIAL]
    header = (["model", *(f"{n} img/s" for n in names), *(f"{n} / official" for n in ours),
               "ours fastest fp32: GFLOP/s (of matmul rate)", "max abs diff vs official", "goal"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ips = row.images_per_s
        official = ips[OFFICIAL]
        fp32 = [n for n in ips if n.startswith("ours") and "bf16" not in n]
        rate = "-"
        if row.flops_per_call and fp32:
            best = max(ips[n] for n in fp32)
            gflops = row.flops_per_call * best / row.items_per_call / 1e9
            rate = f"{gflops:.1f} ({gflops / peak:.2f})"
        cells = [row.model, *(f"{ips[n]:.1f}" if n in ips else "-" for n in names),
                 *(f"**{ips[n] / official:.2f}x**" if n in ips else "-" for n in ours),
                 rate, ", ".join(f"{n}: {row.max_abs_diff[n]:.1e}" for n in ours if n in row.max_abs_diff), row.goal]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", nargs="+", required=True, metavar="SLUG=PATH",
                        help="clone of each official repository (a bare PATH with a single --methods); "
                             "pip: the installed package, where the official code is on PyPI")
    parser.add_argument("--methods", nargs="+", help="method slugs (default: every one given with --official)")
    parser.add_argument("--presets", nargs="+", help="presets (default: each adapter's)")
    parser.add_argument("--batch-size", type=int,
                        help="default: each adapter's (16 EfficientViM, 64 Scaling MLP, 4 CroCo pairs, "
                             "1 LayerDiffuse, 128 TrAct, 64 FTWT, 1 Pooling And Attention)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (every variant once per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU seconds (use with --threads 1 on a machine others keep busy)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants (slow to build)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    paths = parse_official(args.official, args.methods, parser)
    slugs = [s for s in (args.methods or paths) if s in paths]
    if args.methods and (missing := [s for s in args.methods if s not in paths]):
        parser.error(f"no --official path for {missing}")

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark modules the adapters reuse
    tables = {}
    with MachineLoad() as load:
        peak_start = matmul_gflops(args.warmup, args.repeats, clock=clock)
        for slug in slugs:
            tables[slug] = []
            for row in ADAPTERS[slug](paths[slug], args):
                with torch.inference_mode() if "train" not in row.model else contextlib.nullcontext():
                    medians = interleaved_medians(row.variants, args.warmup, args.repeats, clock)
                row.images_per_s = {n: row.items_per_call / m.seconds for n, m in medians.items()}
                row.variants = dict.fromkeys(row.variants)  # drop the closures (and the models they hold)
                tables[slug].append(row)
                gc.collect()
        peak = max(peak_start, matmul_gflops(args.warmup, args.repeats, clock=clock))

    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"median of {args.repeats} interleaved rounds after {args.warmup}; 1-min load average {load.load_before:.2f} "
          f"before, {load.load_after:.2f} after; {load.wall_s:.0f} s")
    if load.background is not None:
        print(f"background: other processes used {100 * load.background:.1f}% of the machine's CPU time")
    print(f"matmul rate: fp32 {MATMUL_SIZE}^3 = {peak:.1f} GFLOP/s (faster of start and end of the run)")
    for slug, rows in tables.items():
        print(f"\n### {slug} (official: {paths[slug]})\n")
        print(method_table(rows, peak))
    # a record's official_code names the paper's page where no code was released
    without = [r.slug for r in hfpapers.list_methods()
               if r.official_code.startswith(CODE_HOSTS) and r.slug not in ADAPTERS]
    if without:
        print(f"\nmethods with official code but no side-by-side adapter yet: {', '.join(without)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
                       "repeats": args.repeats,
                       "matmul_gflops": peak, "load_average_before": load.load_before,
                       "background_cpu_fraction": load.background,
                       "tables": {slug: [{"model": r.model, "images_per_s": r.images_per_s,
                                          "max_abs_diff": r.max_abs_diff, "flops_per_call": r.flops_per_call}
                                         for r in rows] for slug, rows in tables.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
