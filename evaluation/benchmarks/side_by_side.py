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
(yixuantt/PoolingAndAttn) needs einops (`pip install einops`). GS-LoRA (bjzhb666/GS-LoRA) needs einops and loralib
(`pip install einops loralib==0.1.2`); its `util` package is loaded without `util.utils` (torchvision, mxnet,
matplotlib, wandb: its training loop's tools), wandb and IPython become empty modules. READ (rui-qian/READ): its
model/READ.py imports the vendored LLaVA, whose MPT model (einops, Bloom internals gone from transformers 5) becomes
an empty module and whose Auto-class registration of "llava" (a transformers 5 type) is skipped; OpenCV, matplotlib
and torchvision become empty modules when missing. Neural Collapse in Deep Linear Networks
(Fsoft-AIC/Neural-Collapse-in-Deep-Linear-Networks): its synthetic_experiment_imbalanced.py needs tqdm, scipy and
sympy; its NC functions call `.cuda()`, which returns the tensor itself during their calls. R-AMT (wuw2019/R-AMT,
folder code/): its masked image encoder (modules/) and RegLoss (loss/) need torch only; `clip` is loaded without its
`__init__` (torchvision, PIL, ftfy, the OpenAI weight download); our random CLIP weights are copied into it.
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


def _bare_package(name: str, folder: Path) -> types.ModuleType:
    """Registers `folder` as package `name` without running its `__init__.py` (which imports tools the timed
    modules do not need), in place of any other repository's package of that name."""
    for loaded in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
        del sys.modules[loaded]
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    package.__file__ = str(folder / "__init__.py")  # never run
    sys.modules[name] = package
    return package


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
    _bare_package("utils", repository / "utils")  # also replaces another repository's `utils` (scaling_mlps)
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


# --- GS-LoRA ----------------------------------------------------------------------------------------------------------

# The official face Transformer (train/train_own_forget_cl.py: 112 px, patch 8, 512 wide, 6 blocks, 8 heads, MLP 2048)
# and a narrower one; 6 blocks in both, as the official `get_structure_loss` names exactly six groups.
_GS_LORA_VITS = {"face-vit-small": {"patch_size": 16, "dim": 256, "heads": 4, "mlp_dim": 1024},
                 "face-vit": {"patch_size": 8, "dim": 512, "heads": 8, "mlp_dim": 2048}}
_GS_LORA_CLASSES = 100  # CASIA-100


def _drop_placeholders(*tops: str) -> None:
    """Removes the placeholder modules under `tops` once the official code holds what it imported from them:
    transformers' find_spec checks fail on a module without a spec."""
    for name in [n for n in sys.modules if n.split(".")[0] in tops]:
        if sys.modules[name].__spec__ is None:
            del sys.modules[name]


def _gs_lora_import(repository: Path):
    """The official `vit_pytorch_face.vit_face` (ViT_face with loralib layers) and `engine_cl` (get_structure_loss).
    `engine_cl` imports `util.utils` (torchvision, mxnet, matplotlib, sklearn, wandb: the data and evaluation tools),
    used only by its training loop: `util` is registered as a bare package over the clone's folder with `util.utils`
    a placeholder, so that only `util.data_prefetcher` (torch) runs. wandb and IPython (`embed`, for debugging)
    become placeholders when missing; einops and loralib (the LoRA layers being timed) are needed."""
    if not (repository / "engine_cl.py").is_file():
        raise FileNotFoundError(f"{repository / 'engine_cl.py'} does not exist: pass the root of a clone of "
                                "bjzhb666/GS-LoRA")
    _bare_package("util", repository / "util")
    tools = sys.modules["util.utils"] = types.ModuleType("util.utils")
    tools.train_accuracy = tools.get_time = tools.AverageMeter = None  # the loop's helpers, never called here
    optional = {"wandb": (), "IPython": ("embed",)}
    try:
        vit_face = import_official(repository, ".", "vit_pytorch_face.vit_face", optional=optional)
        engine = import_official(repository, ".", "engine_cl", optional=optional)
    except ModuleNotFoundError as error:
        if error.name not in ("einops", "loralib"):
            raise
        raise ImportError("the official face Transformer imports einops and loralib (its LoRA layers): "
                          "pip install einops loralib==0.1.2") from error
    finally:
        _drop_placeholders("wandb", "IPython", "util")
    return vit_face, engine, importlib.import_module("loralib")


class _FaceClassifier(torch.nn.Module):
    """A face Transformer's embedding and a Linear classifier, called as a transformers image classifier is
    (`pixel_values=` in, `.logits` out): what GS-LoRA's recipe trains."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, pixel_values):
        return types.SimpleNamespace(logits=self.head(self.backbone(pixel_values)))


def _without_lora(model: torch.nn.Module, lora) -> torch.nn.Module:
    """A copy of `model` whose loralib layers are plain nn.Linear layers holding the same base weights."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, lora.LoRALayer):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("lora_")})
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, linear)
    return model


@official_adapter("gs-lora")
def gs_lora_rows(repository: Path, args) -> Iterator[Row]:
    """One GS-LoRA training step without the optimiser (forward, L = CE(retain) + beta ReLU(BND - CE(forget)) +
    alpha L_structure, backward) on the official face Transformer (ViT_face, LoRA rank 8 in both FFN Linear layers
    of its 6 blocks): the official loralib layers, two forward passes (retain, then forget, as engine_cl's
    train_one_epoch) and its `get_structure_loss`, against ours on a copy of the same network: its LoRA layers
    plain Linear, peft's LoRA on the FFN layers our `find_ffn_targets` finds, `GSLoRARecipe.compute_loss` (one
    forward of both batches, `group_sparse_penalty`). The official CosFace head moves labels to CUDA in every call,
    so both sides end in the same Linear classifier (100 classes) on the embedding; dropout 0 (the official 0.1
    would draw different masks). Same base and LoRA weights (B random, so every LoRA matrix has a gradient), the
    official continual script's settings: alpha 1e-4, beta 0.15, BND 105. Models (`--presets face-vit-small
    face-vit`, default the small one): 112 px, 6 blocks; face-vit is the paper's (patch 8, 512 wide, 8 heads, MLP
    2048), face-vit-small has patch 16, 256 wide, 4 heads, MLP 1024. Items = retain + forget images; the
    difference column: the larger of the loss's and the LoRA gradients' differences."""
    from peft import get_peft_model

    from hfpapers.engine import TrainingState
    from hfpapers.methods.gs_lora import GSLoRAConfig, find_ffn_targets, lora_config, lora_groups
    from hfpapers.methods.gs_lora.recipe import GSLoRARecipe

    vit_face, engine, lora = _gs_lora_import(repository)
    config = GSLoRAConfig(rank=8, alpha=1e-4, beta=0.15, bound=105.0)  # scripts/run_cl_forget.sh
    batch = args.batch_size or 8
    for preset in [p for p in _GS_LORA_VITS if p in args.presets] if args.presets else ["face-vit-small"]:
        torch.manual_seed(0)
        official = vit_face.ViT_face(loss_type="None", GPU_ID=None, num_class=_GS_LORA_CLASSES, image_size=112,
                                     depth=6, dropout=0.0, emb_dropout=0.0, lora_rank=config.rank,
                                     lora_pos="FFN", **_GS_LORA_VITS[preset])
        for module in official.modules():
            if isinstance(module, lora.Linear) and module.r > 0:
                torch.nn.init.normal_(module.lora_B, std=0.02)
        lora.mark_only_lora_as_trainable(official)  # as train_own_forget_cl.py: only LoRA trains
        head = torch.nn.Linear(_GS_LORA_VITS[preset]["dim"], _GS_LORA_CLASSES).requires_grad_(False)

        plain = _FaceClassifier(_without_lora(official, lora), copy.deepcopy(head))
        targets = find_ffn_targets(plain)
        ours = get_peft_model(plain, lora_config(targets, config.rank, config.lora_alpha))
        groups = lora_groups(ours, targets, "block")  # per block: fc1.A, fc1.B, fc2.A, fc2.B
        official_groups = [[official.get_parameter(f"transformer.layers.{i}.1.fn.fn.net.{j}.lora_{m}")
                            for j in (0, 3) for m in "AB"] for i in range(len(groups))]
        with torch.no_grad():
            for mine, theirs in zip(groups, official_groups, strict=True):
                for a, b in zip(mine, theirs, strict=True):
                    a.copy_(b)

        generator = torch.Generator().manual_seed(1)
        retain_x, forget_x = torch.randn(2, batch, 3, 112, 112, generator=generator)
        retain_y, forget_y = torch.randint(_GS_LORA_CLASSES, (2, batch), generator=generator)
        recipe = GSLoRARecipe(config, groups, forget_y.unique().tolist(), [], 1.0)
        inputs = {"retain_pixel_values": retain_x, "retain_labels": retain_y, "forget_pixel_values": forget_x,
                  "forget_labels": forget_y}
        state = TrainingState()

        def official_step():
            official.zero_grad(set_to_none=True)
            loss_remain = F.cross_entropy(head(official(retain_x)), retain_y)
            loss_forget = F.relu(config.bound - F.cross_entropy(head(official(forget_x)), forget_y))
            loss = (loss_forget * config.beta + loss_remain + engine.get_structure_loss(official) * config.alpha)
            loss.backward()
            return loss

        def ours_step():
            ours.zero_grad(set_to_none=True)
            loss = recipe.compute_loss(ours, inputs, None, state)
            loss.backward()
            return loss

        losses = {OFFICIAL: official_step().detach(), "ours": ours_step().detach()}
        gradients = [max((a.grad - b.grad).abs().max().item() for a, b in zip(mine, theirs))
                     for mine, theirs in zip(groups, official_groups)]
        diff = max((losses["ours"] - losses[OFFICIAL]).abs().item(), *gradients)
        flops = count_flops(ours_step)
        c = _GS_LORA_VITS[preset]
        yield Row(f"{preset} ({112 // c['patch_size']}^2 patches, {c['dim']} wide) train step (forward + backward, "
                  f"no optimiser), batch {batch} retain + {batch} forget", 2 * batch,
                  {OFFICIAL: official_step, "ours": ours_step}, {"ours": diff}, flops,
                  goal="ours >= official (one forward of both batches; peft LoRA)")


# --- READ -------------------------------------------------------------------------------------------------------------

_READ_IMAGE_SIZES = {"read-7b": (480, 640)}  # preset -> the (height, width) of the image being segmented


def _read_import(repository: Path):
    """The official `model.READ` (READForCausalLM, whose methods hold SasP) and its `segment_anything` modules.
    model/READ.py imports the whole LLaVA package: its MPT language model (einops, and Bloom internals that
    transformers 5 removed) becomes a placeholder, and its Llama one registers the model type "llava" with the Auto
    classes, which transformers 5 owns: the registration is skipped during the import. OpenCV, matplotlib (debug
    drawing) and torchvision (SAM's automatic mask generator and resize transform) become placeholders when missing."""
    from unittest import mock

    import transformers

    if not (repository / "model" / "READ.py").is_file():
        raise FileNotFoundError(f"{repository / 'model' / 'READ.py'} does not exist: pass the root of a clone of "
                                "rui-qian/READ")
    mpt = types.ModuleType("model.llava.model.language_model.llava_mpt")
    mpt.__file__ = str(repository / "model" / "llava" / "model" / "language_model" / "llava_mpt.py")  # never run
    mpt.LlavaMPTForCausalLM = mpt.LlavaMPTConfig = None
    sys.modules[mpt.__name__] = mpt
    optional = {"cv2": (), "matplotlib.pyplot": (), "torchvision.ops.boxes": ("batched_nms", "box_area"),
                "torchvision.transforms.functional": ("resize", "to_pil_image")}
    try:
        with mock.patch.object(transformers.AutoConfig, "register", lambda *a, **k: None), \
                mock.patch.object(transformers.AutoModelForCausalLM, "register", lambda *a, **k: None):
            read = import_official(repository, ".", "model.READ", optional=optional)
    finally:
        _drop_placeholders("cv2", "matplotlib", "torchvision")
    return read, sys.modules["model.segment_anything.modeling"]


def _read_model(preset: str):
    """Our READ with the preset's SasP settings, LM width and SAM prompt encoder / mask decoder; the parts that are
    not run (the LM's layers, CLIP and SAM's image encoder) one narrow layer each."""
    from hfpapers.methods.read import READConfig, READForReasoningSegmentation

    record = hfpapers.get_method("read").presets[preset].config
    llava, sam = record["llava_config"], record["sam_config"]
    vision, text = llava["vision_config"], llava["text_config"]
    tiny = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1}
    config = READConfig(**{
        **record, "lora_r": 0, "seg_token_index": 2,
        "llava_config": {**llava, "image_token_index": 1, "image_seq_length": vision["image_size"] ** 2
                         // vision["patch_size"] ** 2,
                         "vision_config": {**vision, **tiny, "projection_dim": 16},
                         "text_config": {**text, "vocab_size": 3, "intermediate_size": 16, "num_hidden_layers": 1,
                                         "num_key_value_heads": 1,
                                         "num_attention_heads": text["hidden_size"] // 128}},
        "sam_config": {**sam, "vision_config": {**sam["vision_config"], "hidden_size": 16, "num_hidden_layers": 1,
                                                "num_attention_heads": 1, "mlp_dim": 16,
                                                "global_attn_indexes": [0]}}})
    return READForReasoningSegmentation(config).eval()


@official_adapter("read")
def read_rows(repository: Path, args) -> Iterator[Row]:
    """What READ adds after the language model, for one image and one `[SEG]` (eval, inference_mode), from the LM's
    last-layer states: the `[SEG]`-image similarity, Similarity-as-Points with Discrete-to-Continuous, the `[SEG]`
    projection, SAM's prompt encoder (points + `[SEG]` token) and mask decoder, the masks resized to the image. The
    official `READForCausalLM` methods `compute_similarity_map`, `similarity_map_to_points` (its READ-7B constants:
    30 points, t 0.8 / 0.2, 24 -> 12 grid) and `generate_pred_masks`, called with a stand-in `self` that holds only
    SAM (the LLaVA LM is not built), against our `segment_from_states`. The official SAM prompt encoder and mask
    decoder are built as `build_sam_vit_h` builds them, with random weights, converted into ours
    (`convert_sam_state_dict`); the projection is `initialize_read_modules`' Sequential, with our weights. Neither
    SAM's image encoder (the image embedding is given) nor the LM runs; states and the image embedding are random.
    Preset read-7b: 576 image states x 4096, a 480 x 640 image. The difference column: the larger of the points' and
    the mask logits' differences (the point labels must agree)."""
    from hfpapers.methods.read.convert_read import convert_sam_state_dict
    from hfpapers.methods.read.modeling_read import resize_longest_side

    official, sam_modules = _read_import(repository)
    for preset in [p for p in _READ_IMAGE_SIZES if p in args.presets] if args.presets else ["read-7b"]:
        torch.manual_seed(0)
        ours = _read_model(preset)
        c = ours.config
        height, width = _READ_IMAGE_SIZES[preset]
        # build_sam_vit_h's prompt encoder and mask decoder; the image encoder only lends its input size
        size, patch = c.sam_config.vision_config.image_size, c.sam_config.vision_config.patch_size
        prompt_dim = c.sam_config.prompt_encoder_config.hidden_size
        sam = sam_modules.Sam(
            image_encoder=types.SimpleNamespace(img_size=size),
            prompt_encoder=sam_modules.PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(size // patch,) * 2,
                                                     input_image_size=(size, size), mask_in_chans=16),
            mask_decoder=sam_modules.MaskDecoder(
                num_multimask_outputs=3, transformer=sam_modules.TwoWayTransformer(
                    depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8),
                transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=256)).eval()
        converted, unmapped = convert_sam_state_dict(sam.state_dict())
        missing, unexpected = ours.sam.load_state_dict(converted, strict=False)
        if unmapped or unexpected or any(not k.startswith("vision_encoder.") for k in missing):
            raise RuntimeError(f"SAM weights did not map onto ours: {unmapped + unexpected + missing}")
        hidden = c.llava_config.text_config.hidden_size
        projection = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(inplace=True),
                                         torch.nn.Linear(hidden, c.out_dim), torch.nn.Dropout(0.0))
        projection.load_state_dict(ours.text_hidden_fcs.state_dict())
        stand_in = types.SimpleNamespace(model=types.SimpleNamespace(visual_model=sam), device=torch.device("cpu"))

        # One row: <s>, the image tokens, a question, the state that predicts [SEG], [SEG].
        grid = c.image_grid
        ids = torch.tensor([[0] + [c.llava_config.image_token_index] * grid**2 + [0] * 8 + [c.seg_token_index]])
        generator = torch.Generator().manual_seed(1)
        states = torch.randn(1, ids.shape[1], hidden, generator=generator)
        image_embedding = torch.randn(1, prompt_dim, size // patch, size // patch, generator=generator)
        sizes = torch.tensor([[height, width]])
        input_size = resize_longest_side(height, width, size)

        def official_call():
            similarity = official.READForCausalLM.compute_similarity_map(None, states[:, 1:1 + grid**2],
                                                                         states[0, -2:-1])
            points, labels = official.READForCausalLM.similarity_map_to_points(None, similarity[0, :, 0],
                                                                               (height, width))
            mask = official.READForCausalLM.generate_pred_masks(
                stand_in, [projection(states[0, -2:-1])], image_embedding, [(input_size, (height, width))], None,
                [points[None]], [labels[None]], None, None)[0][0]
            return points, labels, mask

        def ours_call():
            out = ours.segment_from_states(states, ids, image_embedding, sizes)
            return out["points"][0], out["point_labels"][0], out["pred_masks"][0]

        with torch.inference_mode():
            (points, labels, mask), (our_points, our_labels, our_mask) = official_call(), ours_call()
            flops = count_flops(ours_call)
        if not torch.equal(labels, our_labels.to(labels.dtype)):
            raise RuntimeError(f"the point labels differ: official {labels.tolist()}, ours {our_labels.tolist()}")
        diff = max((our_points - points).abs().max().item(), (our_mask - mask).abs().max().item())
        yield Row(f"{preset} SasP + SAM decoder, {grid}x{grid} states x {hidden}, {c.num_points} points, "
                  f"{height}x{width} image", 1, {OFFICIAL: official_call, "ours": ours_call}, {"ours": diff},
                  flops, goal="ours >= official")


# --- Pooling And Attention (llm-embedding) ----------------------------------------------------------------------------


@official_adapter("llm-embedding")
def llm_embedding_rows(repository: Path, args) -> Iterator[Row]:
    """The multi-layer trainable pooler of Models 3 and 5 alone (eval, inference_mode): 768 latents query one state
    per decoder layer, 32 heads x 2048, GEGLU x4, at the decoder's width (default preset qwen2-0.5b-model-5: 24 x
    896 in). The official `PerceiverResampler` (pooling_layers/MultiLayersTrainablePooling.py, built as
    model_loaders/model5.py builds it: every size the decoder's hidden size, 32 layer rows of which the first
    num_layers are used) against our `TrainablePooler`, in fp32 and under bf16 autocast; the difference column is
    the pooled (L2-normalised) embedding's. The decoder is not run: the per-layer token means it would feed the
    pooler (of a 512-token input in the paper's setting; the sequence length does not reach the pooler) are random
    states."""
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


# --- Neural Collapse in Deep Linear Networks (nc-deep-linear) -------------------------------------------------------


@contextlib.contextmanager
def _cuda_is_identity():
    """The official NC functions move the tensors they build with `.cuda()` (they were written for one GPU): inside
    the block `Tensor.cuda` returns the tensor itself, so that they run where the features are."""
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def _nc_official_metrics(script, model, Y, targets, s_array, feature_decay: float, depth: int) -> torch.Tensor:
    """What synthetic_experiment_imbalanced.py measures after every step (its `main` loop, transcribed: the product
    list W_list, then its compute_* functions): NC1 of H; NC2_W and NC3 (W against the scaled class means) of
    W_M..W_1; NC2_H of H's class means; NC3 (W H̄) of W_M against its input."""
    with _cuda_is_identity():
        W_list = [model.fc[-1].weight.clone()]
        for layer in reversed(model.fc[:-1]):
            W_list.append(W_list[-1] @ layer.weight)
        mu_G, mu_c, _, features, _ = script.compute_info(model, Y, targets)
        sigma_w = script.compute_Sigma_W(features[-1], mu_c[-1], targets)
        sigma_b = script.compute_Sigma_B(mu_c[-1], mu_G[-1])
        return torch.tensor([script.np.trace(sigma_w @ script.scilin.pinv(sigma_b)) / len(mu_c[-1]),
                             script.compute_NC2_W(W_list[-1], s_array, depth),
                             script.compute_NC2_H(mu_c[-1], s_array, feature_decay, depth),
                             script.compute_NC3_WH(W_list[0], mu_c[0], s_array, feature_decay, depth),
                             script.compute_NC3_W_sub_H(W_list[-1], mu_c[-1], s_array, feature_decay, depth)],
                            dtype=torch.float64)


@official_adapter("nc-deep-linear")
def nc_deep_linear_rows(repository: Path, args) -> Iterator[Row]:
    """The imbalanced deep linear UFM of the official synthetic_experiment_imbalanced.py (MSE, no bias, class counts
    [200, 100, 50, 50]) against ours, for every depth M of each preset, from the same random H and W_1..W_M:
    (1) a train step as the official loop takes it (its `SyntheticModel` loss, backward, SGD with momentum 0.9;
    ours: `ufm_objective` in float32 and in float64, the precision `solve_ufm` works in), the difference column
    the largest parameter difference after 3 steps; (2) the NC metrics of one iterate (the official loop's
    measurement: its compute_info / compute_Sigma_* / compute_NC* on the float32 model, with its sympy closed form
    s_k; ours: `ufm_layer_metrics` as `ufm_arms` records it, on the same weights in float64, every layer measured),
    the difference column the largest difference of NC1, NC2_W, NC2_H, NC3 (W H̄) and NC3 (W vs H̄). The metrics
    row is left out above d = 512: the official compute_Sigma_W holds n_k x d x d outer products (3.4 GB at d =
    2048). items = UFM samples. At the README's d = 2048, lr 0.1 diverges for M >= 3 (the official loss is inf
    by the 5th step, as ours): their rows time steps on non-finite values, which cost the same on a CPU, so our
    step is timed without solve_ufm's divergence check (a scalar test)."""
    import io

    from hfpapers.methods.nc_deep_linear.config import NcDeepLinearConfig
    from hfpapers.methods.nc_deep_linear.deep_linear import UnconstrainedFeatures
    from hfpapers.methods.nc_deep_linear.experiments import ufm_layer_metrics
    from hfpapers.methods.nc_deep_linear.ufm import ufm_labels, ufm_objective

    for name in [n for n in sys.modules if n == "utils" or n.startswith("utils.")]:
        del sys.modules[name]  # another repository's `utils`: the script imports the clone's utils.py
    script = import_official(repository, ".", "synthetic_experiment_imbalanced")
    record = hfpapers.get_method("nc-deep-linear")
    for preset in presets_for("nc-deep-linear", args, ("fast", "ufm-balanced")):
        c = NcDeepLinearConfig(**record.presets[preset].config)
        counts = c.imbalanced_counts
        script.NUM_CLASS_SAMPLES, script.NUM_SAMPLES = list(counts), sum(counts)  # the script's constants
        labels = ufm_labels(counts)
        Y = F.one_hot(labels).float()
        decays = dict(weight_decay=c.weight_decay, feature_decay=c.feature_decay)
        for depth in c.depths:
            torch.manual_seed(c.seed)
            official = script.SyntheticModel(c.hidden, len(counts), depth, len(labels), **decays)
            state = {k.replace("fc.", "linear.", 1): v for k, v in official.state_dict().items()}
            ours = {}
            for dtype in (torch.float32, torch.float64):
                ours[dtype] = UnconstrainedFeatures(len(labels), c.hidden, len(counts), depth, dtype=dtype)
                ours[dtype].load_state_dict(state)

            def official_step(model=official, optimizer=torch.optim.SGD(official.parameters(), lr=c.learning_rate,
                                                                        momentum=c.momentum)):
                optimizer.zero_grad()
                _, loss, _ = model(Y)
                loss.backward()
                optimizer.step()

            def ours_step(model, optimizer):  # solve_ufm's iteration (less its divergence check: see above)
                optimizer.zero_grad(set_to_none=True)
                ufm_objective(model, labels, "mse", **decays).backward()
                optimizer.step()

            steps = {OFFICIAL: official_step}
            for dtype, label in ((torch.float32, "ours float32"), (torch.float64, "ours float64")):
                optimizer = torch.optim.SGD(ours[dtype].parameters(), lr=c.learning_rate, momentum=c.momentum)
                steps[label] = lambda m=ours[dtype], o=optimizer: ours_step(m, o)
            for _ in range(3):
                for step in steps.values():
                    step()
            reference = {k.replace("fc.", "linear.", 1): v for k, v in official.state_dict().items()}
            diffs = {label: max((v.float() - reference[k]).abs().max().item() for k, v in m.state_dict().items())
                     for label, m in zip(list(steps)[1:], ours.values())}
            with torch.no_grad():
                flops = 3 * count_flops(lambda: ours[torch.float32]())
            size = f"N = {len(labels)} {list(counts)}, d = {c.hidden}, M = {depth}"
            yield Row(f"{preset}: UFM train step (SGD, full batch), {size}", len(labels), steps, diffs, flops,
                      goal="ours float32 no slower than official (the same operations)")
            if c.hidden > 512:
                continue

            with contextlib.redirect_stdout(io.StringIO()):  # compute_s prints its result
                s_array = script.compute_s(c.weight_decay, c.feature_decay, depth, device="cpu")
            measured = copy.deepcopy(ours[torch.float64])
            measured.load_state_dict({k.replace("fc.", "linear.", 1): v for k, v in official.state_dict().items()})

            def ours_metrics(model=measured):
                layers = ufm_layer_metrics(model, labels, frame="general-orthogonal", counts=counts, **decays)
                return torch.tensor([layers[0]["nc1"], layers[0]["nc2_w"], layers[0]["nc2_h"], layers[-1]["nc3_wh"],
                                     layers[0]["nc3"]], dtype=torch.float64)

            variants = {OFFICIAL: lambda m=official, s=s_array, d=depth: _nc_official_metrics(
                script, m, Y, labels, s, c.feature_decay, d), "ours": ours_metrics}
            with torch.no_grad():
                diffs = max_abs_diff({name: fn() for name, fn in variants.items()})
            yield Row(f"{preset}: NC metrics of one iterate (ours measures each of the M layers, the official "
                      f"NC1 of H only), {size}", len(labels), variants, diffs,
                      goal="ours >= official, the official numbers within 1e-5")


# --- R-AMT ------------------------------------------------------------------------------------------------------------

_RAMT_MASKED_OUT = 0.0256  # the share of masked weights R-AMT removes (the paper's mean over 11 datasets)
_RAMT_BATCH = {"tiny": 32, "vit-b16": 2}  # the paper's batch of 32; 2 images of 224 px keep a CPU run short


def _ramt_import(repository: Path):
    """The official `MaskVisionTransformer` (code/modules/visiontransformer.py, its masked layers in
    modules/masklayers.py) and `RegLoss` (code/loss/reg_loss.py): torch only. The clone's `clip/__init__.py`
    imports its loader and tokenizer (torchvision, PIL, ftfy, the weight download), which the encoder does not use:
    `clip` is a bare package over the clone's folder while they import, so that only `clip.model` (LayerNorm,
    QuickGELU) runs."""
    root = repository / "code"
    if not (root / "modules" / "masklayers.py").is_file():
        raise FileNotFoundError(f"{root / 'modules' / 'masklayers.py'} does not exist: pass the root of a clone of "
                                "wuw2019/R-AMT")
    _bare_package("clip", root / "clip")
    try:
        encoder = import_official(repository, "code", "modules.visiontransformer").MaskVisionTransformer
        reg_loss = import_official(repository, "code", "loss.reg_loss").RegLoss
    finally:
        for name in [n for n in sys.modules if n == "clip" or n.startswith("clip.")]:
            del sys.modules[name]  # the bare package goes again: it is not the real clip
    return encoder, reg_loss


def _ramt_masked_pairs(official, vision) -> list[tuple]:
    """(our MaskedLayer, the official module holding the same weight, its weight and bias attributes, the rows of
    them it holds) for every mask: the official attention stacks q, k, v in one `in_proj_weight` with one mask."""
    pairs = [(vision.embeddings.patch_embedding, official.conv1, "weight", "bias", slice(None))]
    for block, layer in zip(official.transformer.resblocks, vision.encoder.layers, strict=True):
        width = block.attn.embed_dim
        pairs += [(getattr(layer.self_attn, f"{p}_proj"), block.attn, "in_proj_weight", "in_proj_bias",
                   slice(i * width, (i + 1) * width)) for i, p in enumerate("qkv")]
        pairs.append((layer.self_attn.out_proj, block.attn.out_proj, "weight", "bias", slice(None)))
    return pairs


@torch.no_grad()
def _ramt_load_official(official, clip) -> None:
    """Our CLIP image encoder's weights and masks into the official one, as the official `MASKCLIP.make_model`
    copies OpenAI CLIP's (its masked layers hold their weights as plain tensors, outside the state dict)."""
    vision = clip.vision_model
    for ours, theirs, weight, bias, rows in _ramt_masked_pairs(official, vision):
        getattr(theirs, weight)[rows] = ours.base_layer.weight
        if ours.base_layer.bias is not None:
            getattr(theirs, bias)[rows] = ours.base_layer.bias
        theirs.mask_real[rows] = ours.mask_real
    official.class_embedding.copy_(vision.embeddings.class_embedding)
    official.positional_embedding.copy_(vision.embeddings.position_embedding.weight)
    official.proj.copy_(clip.visual_projection.weight.T)
    modules = [(official.ln_pre, vision.pre_layrnorm), (official.ln_post, vision.post_layernorm)]
    for block, layer in zip(official.transformer.resblocks, vision.encoder.layers, strict=True):
        modules += [(block.ln_1, layer.layer_norm1), (block.ln_2, layer.layer_norm2), (block.mlp.c_fc, layer.mlp.fc1),
                    (block.mlp.c_proj, layer.mlp.fc2)]
    for theirs, ours in modules:
        theirs.load_state_dict(ours.state_dict())


@official_adapter("r-amt")
def r_amt_rows(repository: Path, args) -> Iterator[Row]:
    """CLIP's image encoder with R-AMT's masks (the official `MASK` config: q, k, v, out_proj of every block and the
    patch embedding, threshold 5e-3): the official `MaskVisionTransformer` against ours (`MaskTunedCLIP`), with our
    random CLIP weights copied into the official encoder (no OpenAI weights here; the same shapes, the MLP 4 x wide
    as in CLIP and the official block) and the same
    masks, 2.56 % of each weight masked out at random. (1) Forward (eval, inference_mode) to the projected image
    embedding: official, ours, and our `merge()`d copy (masks folded into the weights: a plain CLIP). (2) A mask-
    tuning step in train mode (the straight-through binariser): the zero-shot logits against random unit class
    embeddings (the official `MASKCLIP.forward`, transcribed: it lives in trainers/masktuning.py, which needs dassl),
    cross-entropy + 1e-4 sum ||M_real||_2 (official `RegLoss`), backward to the masks, Adam (lr 8e-5); the
    difference column: the largest difference of the mask gradients of one step. R-AMT's teacher forward and
    gradient dropout are methods of the dassl trainer and are not in the step."""
    from hfpapers.methods.r_amt.adapters import MaskTunedCLIP

    official_encoder, reg_loss = _ramt_import(repository)
    for preset in presets_for("r-amt", args, ("tiny",)):
        values = hfpapers.get_method("r-amt").presets[preset].config
        vision = values["base"]["vision_config"]
        # the official block's MLP is 4 x wide (CLIP's); the tiny preset's 2 x becomes 4 x here
        base = {**values["base"], "vision_config": {**vision, "intermediate_size": 4 * vision["hidden_size"]}}
        torch.manual_seed(0)
        ours = MaskTunedCLIP.from_configs(base, values["adapter"])
        clip, adapter = ours.base_model, ours.mask_config
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in ours.masked_layers().values():
                kept = torch.rand(layer.mask_real.shape, generator=generator) >= _RAMT_MASKED_OUT
                layer.mask_real.copy_(kept * adapter.mask_scale)
        c = clip.config.vision_config
        official = official_encoder(c.image_size, c.patch_size, c.hidden_size, c.num_hidden_layers,
                                    c.num_attention_heads, clip.config.projection_dim, mask_init="1s",
                                    mask_scale=adapter.mask_scale, threshold=adapter.threshold, mask_mlp=False)
        _ramt_load_official(official, clip)
        official.eval(), ours.eval()
        merged = copy.deepcopy(ours).merge()
        batch = args.batch_size or _RAMT_BATCH.get(preset, 32)
        x = torch.randn(batch, 3, c.image_size, c.image_size, generator=generator)
        variants = {OFFICIAL: lambda: official(x),
                    "ours": lambda: clip.get_image_features(pixel_values=x).pooler_output,
                    "ours merged": lambda: merged.get_image_features(pixel_values=x).pooler_output}
        with torch.inference_mode():
            diffs = max_abs_diff({name: fn() for name, fn in variants.items()})
            flops = count_flops(lambda: clip.get_image_features(pixel_values=x))
        size = f"{c.image_size}px, patches of {c.patch_size}, {c.num_hidden_layers} x {c.hidden_size}"
        yield Row(f"{preset} masked image encoder forward, {size}, batch {batch}", batch, variants, diffs, flops,
                  goal="ours >= official; merged = plain CLIP")

        # The mask-tuning step, from the same weights and masks (only the masks train, as MaskTuning.build_model).
        official.train(), ours.train()
        for name, param in official.named_parameters():
            param.requires_grad_("mask_real" in name)
        classes = F.normalize(torch.randn(10, clip.config.projection_dim, generator=generator), dim=-1)
        labels = torch.randint(10, (batch,), generator=generator)
        ours.class_embeddings = classes
        scale = clip.logit_scale.detach()

        def official_loss():
            features = official(x)
            features = features / features.norm(dim=-1, keepdim=True)
            loss = F.cross_entropy(scale.exp() * features @ classes.t(), labels)
            return loss + 1e-4 * sum(reg_loss(p, 2) for n, p in official.named_parameters() if "mask_real" in n)

        def ours_loss():
            return F.cross_entropy(ours(pixel_values=x).logits, labels) + 1e-4 * ours.mask_penalty()

        def step(loss, optimizer):
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()

        official_loss().backward()
        step_flops = count_flops(lambda: ours_loss().backward())  # the backward reaches the masks, not the MLP
        diff = max((ours_layer.mask_real.grad - theirs.mask_real.grad[rows]).abs().max().item()
                   for ours_layer, theirs, *_, rows in _ramt_masked_pairs(official, clip.vision_model))
        optimizers = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=8e-5)
                      for m in (official, ours)]
        steps = {OFFICIAL: lambda: step(official_loss, optimizers[0]), "ours": lambda: step(ours_loss, optimizers[1])}
        yield Row(f"{preset} mask-tuning train step (CE + mask L2, Adam), {size}, batch {batch}", batch, steps,
                  {"ours": diff}, step_flops, goal="ours >= official")


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
