"""FTWT: targets, loss and predictors against hand-made examples; the masked and the sparse execution against a
naive masked forward written from the state dict; executed MACs against a naive count; the paper presets'
parameter counts and FLOPs; the recipe's schedule; ResNet weights; refused settings."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import ResNetConfig, ResNetForImageClassification, pipeline

import hfpapers
from hfpapers.engine import TrainingState
from hfpapers.methods.ftwt import (FTWTConfig, FTWTForImageClassification, MaskPredictor, ground_truth_mask,
                                   mask_loss, uniform_ground_truth_mask)
from hfpapers.methods.ftwt.recipe import FTWTRecipe

REPO = Path(__file__).resolve().parents[1]
TINY_RESNET = {"embedding_size": 4, "hidden_sizes": [4, 8, 8], "depths": [1, 2, 1], "layer_type": "basic",
               "downsample_in_first_stage": False}


def maps(scores) -> torch.Tensor:
    """(batch, channels, 2, 2) activations whose per-filter max |value| is `scores` (one sign flipped: the
    criterion reads absolute values)."""
    scores = torch.tensor(scores, dtype=torch.float32)
    out = torch.zeros(*scores.shape, 2, 2)
    out[..., 0, 0] = -scores
    out[..., 1, 1] = scores / 2
    return out


def test_mass_target_keeps_the_top_filters_within_the_mass_threshold():
    # shares 0.4, 0.3, 0.2, 0.1 (in a shuffled order), cumulative 0.4, 0.7, 0.9, 1.0
    x = maps([[2.0, 4.0, 1.0, 3.0]])
    assert ground_truth_mask(x, 0.7).tolist() == [[0, 1, 0, 1]]  # 0.7 - 0.7 = 0 is within 1e-5
    assert ground_truth_mask(x, 0.69).tolist() == [[0, 1, 0, 0]]
    assert ground_truth_mask(x, 0.3).tolist() == [[0, 0, 0, 0]]  # the top filter alone holds more than r
    assert ground_truth_mask(x, 0.95).tolist() == [[1, 1, 0, 1]]
    # r = 1 drops only dead filters (share <= 1e-5); an all-zero image keeps everything
    x = maps([[5.0, 0.0, 1.0, 1e-6], [0.0, 0.0, 0.0, 0.0]])
    assert ground_truth_mask(x, 1.0).tolist() == [[1, 0, 1, 0], [1, 1, 1, 1]]
    assert ground_truth_mask(x, 0.9).tolist()[1] == [1, 1, 1, 1]


def test_uniform_target_drops_the_lowest_filters():
    x = maps([[2.0, 4.0, 1.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    assert uniform_ground_truth_mask(x, 0.5).tolist() == [[0, 1, 0, 1], [0, 0, 1, 1]]
    assert uniform_ground_truth_mask(x, 0.0).tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]  # dead filters go anyway


def test_mask_loss_is_the_mean_over_units_of_filter_sums_of_batch_means():
    # logits 0: every entry costs log 2; units of 2 and 4 filters -> (2 log 2 + 4 log 2) / 2
    zeros = [torch.zeros(3, 2), torch.zeros(3, 4)]
    assert mask_loss(zeros, [torch.ones(3, 2), torch.zeros(3, 4)]).item() == pytest.approx(3 * math.log(2))
    # one unit, batch of 2, one filter: logits 2 (target 1) and -1 (target 1): mean of log(1 + e^-l)
    loss = mask_loss([torch.tensor([[2.0], [-1.0]])], [torch.ones(2, 1)])
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2)


def test_predictor_is_pooling_softmax_and_a_1x1_convolution():
    torch.manual_seed(0)
    predictor = MaskPredictor(3, 2)
    x = torch.randn(2, 3, 4, 5)
    pooled = x.mean(dim=(2, 3))
    probs = pooled.exp() / pooled.exp().sum(1, keepdim=True)
    expected = probs @ predictor.conv.weight[:, :, 0, 0].T + predictor.conv.bias
    torch.testing.assert_close(predictor(x), expected)


def randomised(model, predictor_scale=30.0, seed=0):
    """Random BN statistics and strong predictors, so masks differ between images and some filters are off."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(n, generator=generator) * 0.3 + 1)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.3)
        for predictor in model.ftwt.mask_predictors:
            predictor.conv.weight.copy_(torch.randn(predictor.conv.weight.shape, generator=generator) * predictor_scale)
            predictor.conv.bias.copy_(torch.randn(predictor.conv.bias.shape, generator=generator))
    return model.eval()


def naive_forward(model, x):
    """The masked network from the state dict with plain ops, one image at a time; also counts the MACs of the
    filters that run over the input channels that can be non-zero."""
    s, config = model.state_dict(), model.config

    def unit(prefix, predictor, h, live, act=True):
        pooled = h.mean(dim=(2, 3))
        probs = torch.softmax(pooled, 1)
        logits = probs @ s[f"ftwt.mask_predictors.{predictor}.conv.weight"][:, :, 0, 0].T \
            + s[f"ftwt.mask_predictors.{predictor}.conv.bias"]
        keep = torch.sigmoid(logits)[0] > 0.5
        w = s[f"{prefix}.convolution.weight"]
        out = F.conv2d(h, w, s.get(f"{prefix}.convolution.bias"), stride=stride_of(prefix), padding=w.shape[-1] // 2)
        out = F.batch_norm(out, s[f"{prefix}.normalization.running_mean"], s[f"{prefix}.normalization.running_var"],
                           s[f"{prefix}.normalization.weight"], s[f"{prefix}.normalization.bias"], eps=1e-5)
        out = out.relu() if act else out
        macs = int(keep.sum()) * int(live.sum()) * w.shape[-1] ** 2 * out.shape[-2] * out.shape[-1]
        return out * keep[None, :, None, None], keep, macs

    strides = {}

    def stride_of(prefix):
        return strides.get(prefix, 1)

    logits, macs_all = [], []
    for image in x:
        h, live, macs, p = image[None], torch.ones(3, dtype=torch.bool), 0, 0
        if config.backbone == "vgg":
            for si, stage in enumerate(config.vgg_stages):
                for li in range(len(stage)):
                    h, live, m = unit(f"ftwt.stages.{si}.layers.{li}", p, h, live)
                    macs, p = macs + m, p + 1
                h = F.max_pool2d(h, 2)
        else:
            h, live, m = unit("ftwt.embedder.embedder", 0, h, live)
            macs, p = macs + m, 1
            for si, depth in enumerate(config.resnet_config.depths):
                for bi in range(depth):
                    prefix = f"ftwt.encoder.stages.{si}.layers.{bi}"
                    down = si > 0 and bi == 0
                    strides[f"{prefix}.layer.0"] = 2 if down else 1
                    identity, identity_live = h, live
                    if down:  # zero-pad shortcut: 2x2 average pooling, zero channels
                        extra = config.resnet_config.hidden_sizes[si] - h.shape[1]
                        identity = F.pad(F.avg_pool2d(h, 2), (0, 0, 0, 0, 0, extra))
                        identity_live = torch.cat([live, torch.zeros(extra, dtype=torch.bool)])
                    h, live, m1 = unit(f"{prefix}.layer.0", p, h, live)
                    h, live, m2 = unit(f"{prefix}.layer.1", p + 1, h, live, act=False)
                    h, live, macs, p = (h + identity).relu(), live | identity_live, macs + m1 + m2, p + 2
        pooled = h.mean(dim=(2, 3))
        logits.append(pooled @ s["classifier.weight"].T + s["classifier.bias"])
        macs_all.append(macs + int(live.sum()) * config.num_labels)
    return torch.cat(logits), macs_all


@pytest.fixture(scope="module", params=["resnet", "vgg"])
def tiny_model(request):
    torch.manual_seed(0)
    extra = ({"resnet_config": TINY_RESNET} if request.param == "resnet"
             else {"backbone": "vgg", "vgg_stages": [[6], [8, 8], [8]]})
    return randomised(FTWTForImageClassification(FTWTConfig(image_size=16, num_labels=5, **extra)))


def test_masked_and_sparse_execution_equal_a_naive_masked_forward(tiny_model):
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected, expected_macs = naive_forward(tiny_model, x)
    with torch.no_grad():
        masked = tiny_model(x)
        sparse = tiny_model(x, sparse=True)
    torch.testing.assert_close(masked.logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sparse.logits, expected, atol=1e-4, rtol=1e-4)
    assert masked.macs.tolist() == expected_macs == sparse.macs.tolist()
    # the check means something: masks differ between images, and filters are skipped
    per_image = {tuple(torch.cat([m[i] for m in masked.masks]).tolist()) for i in range(6)}
    assert len(per_image) > 1
    assert 0 < min(expected_macs) and max(expected_macs) < tiny_model.dense_macs()
    for a, b in zip(masked.masks, sparse.masks):
        assert torch.equal(a, b)


def test_a_unit_with_every_filter_off_runs_sparse(tiny_model):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    bias = tiny_model.ftwt.mask_predictors[1].conv.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.fill_(-1e4)
        try:
            expected, expected_macs = naive_forward(tiny_model, x)
            sparse = tiny_model(x, sparse=True)
        finally:
            bias.copy_(saved)
    torch.testing.assert_close(sparse.logits, expected, atol=1e-4, rtol=1e-4)
    assert sparse.macs.tolist() == expected_macs
    assert sparse.masks[1].sum() == 0


def test_masking_off_is_the_dense_network_and_counts_every_mac(tiny_model):
    tiny_model.config.masking = False
    try:
        with torch.no_grad():
            out = tiny_model(torch.randn(2, 3, 16, 16))
        with pytest.raises(ValueError, match="needs config.masking=True"):
            tiny_model(torch.randn(2, 3, 16, 16), sparse=True)
    finally:
        tiny_model.config.masking = True
    assert out.macs.tolist() == [tiny_model.dense_macs()] * 2


# Published sizes: the official CIFAR models (thop, cifar.py `nw_profile`: 125.5M / 313.5M MACs) and the
# torchvision ResNets; the predictors come on top.
PAPER_COUNTS = {"resnet56-cifar10": 853_018, "vgg16-bn-cifar10": 14_728_266, "resnet18-imagenet": 11_689_512,
                "resnet34-imagenet": 21_797_672}


@pytest.mark.parametrize("preset", PAPER_COUNTS)
def test_paper_presets_have_the_published_backbone_parameter_counts(preset):
    with torch.device("meta"):
        model = hfpapers.create_model("ftwt", preset=preset)
    backbone = sum(p.numel() for n, p in model.named_parameters() if ".mask_predictors." not in n)
    assert backbone == PAPER_COUNTS[preset]


def test_cifar_presets_have_the_official_dense_macs():
    torch.manual_seed(0)
    assert hfpapers.create_model("ftwt", preset="resnet56-cifar10").dense_macs() == pytest.approx(125.5e6, rel=1e-3)
    # thop's 313.5M also counts the max pools (0.3M), which are not multiply-accumulates
    assert hfpapers.create_model("ftwt", preset="vgg16-bn-cifar10").dense_macs() == 313_201_664


def test_recipe_switches_the_mask_loss_off_and_gives_the_predictors_their_own_rate():
    recipe = FTWTRecipe(cooldown=0.5)
    assert [recipe.mask_weight(TrainingState(num_epochs=5, epoch=e)) for e in range(5)] == [1, 1, 0, 0, 0]
    model = hfpapers.create_model("ftwt", preset="tiny")
    optimizer = recipe.build_optimizer(model, type("Args", (), {"learning_rate": 0.01, "weight_decay": 5e-4})())
    backbone, predictors = optimizer.param_groups
    assert (predictors["lr"], predictors["weight_decay"]) == (0.1, 0.0)
    assert {id(p) for p in predictors["params"]} == {id(p) for p in model.ftwt.mask_predictors.parameters()}
    assert (backbone["lr"], backbone["weight_decay"]) == (0.01, 5e-4)


def test_decoupled_mask_loss_trains_only_the_predictors():
    torch.manual_seed(0)
    model = hfpapers.create_model("ftwt", preset="tiny").train()
    model(torch.randn(4, 3, 16, 16)).mask_loss.backward()
    # the task gradient never reaches the predictors (the mask has none, as in the official code); this loss does
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.ftwt.mask_predictors.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if "mask_predictors" not in n)
    joint = hfpapers.create_model("ftwt", preset="tiny", mask_mode="joint").train()
    joint(torch.randn(4, 3, 16, 16)).mask_loss.backward()
    assert joint.ftwt.embedder.embedder.convolution.weight.grad.abs().sum() > 0


def test_resnet_weights_load_and_run_unchanged_without_masks():
    torch.manual_seed(0)
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                       layer_type="basic", num_labels=3)).eval()
    ftwt = FTWTForImageClassification.from_resnet(resnet, image_size=32, masking=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ftwt(x).logits, resnet(x).logits)
    with pytest.raises(ValueError, match="needs a transformers ResNetModel.*got Linear"):
        FTWTForImageClassification.from_resnet(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(("values", "message"), [
    ({"pruning_ratio": 1.0}, r"pruning_ratio .* must lie in \[0, 1\), got 1.0"),
    ({"pruning_ratio": -0.1}, r"pruning_ratio .* must lie in \[0, 1\), got -0.1"),
    ({"mass_threshold": 0.0}, r"mass_threshold .* must lie in \(0, 1\], got 0.0"),
    ({"mass_threshold": 1.5}, r"mass_threshold .* must lie in \(0, 1\], got 1.5"),
    ({"backbone": "vit"}, r"backbone must be one of \('resnet', 'vgg'\), got 'vit'"),
    ({"backbone": "vgg", "vgg_stages": []}, "vgg_stages must be a non-empty list"),
    ({"resnet_config": {"layer_type": "bottleneck"}}, "zero-pad.*use 'projection'"),
    ({"mask_mode": "both"}, "mask_mode must be one of"),
    ({"gt_type": "l1"}, "gt_type must be one of"),
])
def test_bad_settings_are_one_clear_error(values, message):
    with pytest.raises(StrictDataclassError, match=message):
        FTWTConfig(**values)


def test_sparse_execution_in_training_mode_is_refused():
    model = hfpapers.create_model("ftwt", preset="tiny").train()
    with pytest.raises(ValueError, match="call model.eval"):
        model(torch.randn(1, 3, 16, 16), sparse=True)


def test_tiny_preset_trains_through_the_engine_and_serves_the_pipeline(tmp_path):
    from PIL import Image

    from hfpapers.engine import train

    result = train("ftwt", str(tmp_path), dataset_kwargs={"num_train": 128, "num_test": 64}, num_epochs=2,
                   dense_epochs=1, progress_bar=False)
    # epoch 1 dense, epoch 2 masked: the eval of the masked network skips filters
    reductions = [row["eval_flops_reduction"] for row in result.history if "eval_flops_reduction" in row]
    assert reductions[0] == 0 and 0 < reductions[-1] < 1
    classify = pipeline("image-classification", model=str(tmp_path))
    assert classify.model.config.masking
    scores = classify(Image.new("RGB", (40, 30), (200, 30, 30)))
    assert len(scores) == 5 and 0 <= scores[0]["score"] <= 1


def _reproduction():
    spec = importlib.util.spec_from_file_location("ftwt_reproduce", REPO / "evaluation" / "reproduce" / "ftwt.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_reproduction_static_pruning_keeps_the_largest_l1_filters_and_matches_flops():
    reproduce = _reproduction()
    torch.manual_seed(0)
    model = FTWTForImageClassification(FTWTConfig(**reproduce.MODEL, num_labels=4))
    with torch.no_grad():  # a hand-made unit: filter L1 norms 4, 1, 3, 2, 0.5, ... of the stem
        stem = model.ftwt.embedder.embedder.convolution.weight
        stem.zero_()
        for i, norm in enumerate([4.0, 1.0, 3.0, 2.0]):
            stem[i, 0, 0, 0] = norm
    keep = reproduce.l1_keep_masks(model, 13 / 16)  # 16 filters, 3 kept
    assert keep[0][:4].tolist() == [True, False, True, True] and keep[0].sum() == 3
    probe = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    dense = model.dense_macs()
    ratio = reproduce.match_static_ratio(model, 0.6 * dense, probe)
    reproduce.make_static(model, reproduce.l1_keep_masks(model, ratio))
    macs, _ = reproduce.mean_macs(model, probe)
    assert macs == pytest.approx(0.6 * dense, rel=0.05)
    with torch.no_grad():
        out = model(probe)
    assert all(torch.equal(m[0], m[1]) for m in out.masks)  # static: the same filters for every image


def test_mask_hamming_is_the_mean_over_image_pairs_of_the_share_of_differing_filters():
    reproduce = _reproduction()
    masks = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.float32)
    # pairs (0,1) 2/3, (0,2) 1/3, (0,3) 0, (1,2) 1, (1,3) 2/3, (2,3) 1/3: mean 3/6
    assert reproduce.mean_pairwise_hamming(masks) == pytest.approx(0.5)
    assert reproduce.mean_pairwise_hamming(masks[[0, 3]]) == 0


def test_reproduction_fine_tunes_ftwt_masked_from_the_first_step_as_long_as_static(tmp_path):
    """One seeded miniature of the reproduction: both arms run masked from their first epoch (the official code
    trains FTWT gated from the pretrained baseline, with no dense warm-up), on the same schedule, at matched FLOPs."""
    reproduce = _reproduction()
    ftwt, static = reproduce.ARMS["ftwt"], reproduce.ARMS["static"]
    assert FTWTRecipe(**ftwt).callbacks() == [] and FTWTRecipe(**ftwt).cooldown == 0.5
    # the arms differ only in what concerns the predictors: epochs, rates and steps are shared
    assert set(ftwt) | set(static) <= {"dense_epochs", "cooldown", "mask_loss_weight", "mask_learning_rate"}
    result = reproduce.run(tmp_path, seed=0, thresholds=(0.8,), base_epochs=2, finetune_epochs=2,
                           num_train=256, num_test=64, log=lambda *_: None)
    arm = result["arms"][0]
    assert min(arm["first_epoch_reductions"]) > 0.05
    assert arm["static_reduction"] == pytest.approx(arm["ftwt_reduction"], abs=0.05)
    diversity = arm["mask_diversity"]
    assert 0 < diversity["target_hamming"] <= 0.5 and 0 <= diversity["predicted_hamming"] <= 0.5
    assert diversity["agreement"] <= 1 and 0.5 <= diversity["constant_agreement"] <= 1
