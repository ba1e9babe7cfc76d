"""EfficientViM: the HSM-SSD against a per-token loop of the paper's equations, the published sizes, the fusion
head, any resolution, fuse(), and the recipe's pieces."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import hfpapers
from hfpapers.engine import TrainingState
from hfpapers.methods.efficientvim.modeling_efficientvim import EfficientViMBlock, HiddenStateMixerSSD
from hfpapers.methods.efficientvim.recipe import EfficientViMRecipe, mix_batch, soft_target_cross_entropy

# Official models at 1000 classes: parameters, and multiply-accumulates under torch.utils.flop_counter
# (the official modules measured with the same counter at 224/224/224/256 px).
PUBLISHED = {"M1": (6_679_458, 236.4e6), "M2": (13_903_842, 352.2e6), "M3": (16_604_174, 651.7e6),
             "M4": (19_606_505, 1105.0e6)}


def perturbed(model, seed=0):
    """Random non-trivial values for every float parameter and buffer (gates, norms, BN statistics)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                t.copy_(t.abs() + 0.5 if "running_var" in name else t + 0.1 * torch.randn(t.shape, generator=g))
    return model


@pytest.mark.parametrize("preset", PUBLISHED)
def test_presets_have_the_official_parameters_and_macs(preset):
    params, macs = PUBLISHED[preset]
    model = hfpapers.create_model("efficientvim", preset=preset).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    size = model.config.image_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, size, size))
    assert counter.get_total_flops() / 2 == pytest.approx(macs, abs=0.05e6)


def naive_hsm_ssd(mixer: HiddenStateMixerSSD, x: torch.Tensor, height: int, width: int):
    """Paper Eq. 8-10 token by token: the (B, C, dt) projections, a per-state softmax over tokens,
    h_n = sum_l A[n,l] B[n,l] x_l, gating in hidden-state space, then y_l = sum_n C[n,l] h_n."""
    (batch, channels, tokens), n_state = x.shape, mixer.state_dim
    proj = mixer.BCdt_proj.conv.weight[:, :, 0]  # (3N, C)
    BCdt = torch.einsum("oc,bcl->bol", proj, x).reshape(batch, 3 * n_state, height, width)
    BCdt = F.conv2d(BCdt, mixer.dw.conv.weight, padding=1, groups=3 * n_state).flatten(2)
    Bm, Cm, dt = BCdt[:, :n_state], BCdt[:, n_state:2 * n_state], BCdt[:, 2 * n_state:]
    y = torch.zeros(batch, channels, tokens, dtype=x.dtype)
    hs = torch.zeros(batch, channels, n_state, dtype=x.dtype)
    for b in range(batch):
        for n in range(n_state):
            logits = [dt[b, n, l] + mixer.A[n] for l in range(tokens)]
            denom = sum(math.exp(v.item()) for v in logits)
            for l in range(tokens):
                hs[b, :, n] += math.exp(logits[l].item()) / denom * Bm[b, n, l] * x[b, :, l]
    hz = torch.einsum("oc,bcn->bon", mixer.hz_proj.conv.weight[:, :, 0], hs)
    inner = hz.shape[1] // 2  # ssd_expand * C
    h, z = hz[:, :inner], hz[:, inner:]
    h = torch.einsum("oc,bcn->bon", mixer.out_proj.conv.weight[:, :, 0], h * z * torch.sigmoid(z) + h * mixer.D)
    for b in range(batch):
        for l in range(tokens):
            for n in range(n_state):
                y[b, :, l] += h[b, :, n] * Cm[b, n, l]
    return y.reshape(batch, channels, height, width), h


@pytest.mark.parametrize("ssd_expand", [1.0, 2.0, 0.5])
def test_hsm_ssd_matches_a_per_token_loop_of_the_equations(ssd_expand):
    torch.manual_seed(0)
    mixer = perturbed(HiddenStateMixerSSD(dim=6, state_dim=3, ssd_expand=ssd_expand)).double()
    # the official hz_proj reads the 6-channel hidden state and writes 2 * ssd_expand * 6 channels
    assert mixer.hz_proj.conv.weight.shape == (int(12 * ssd_expand), 6, 1)
    with torch.no_grad():
        mixer.A.uniform_(1, 16)
    x = torch.randn(2, 6, 4 * 5, dtype=torch.float64)
    y, h = mixer(x, 4, 5)
    y_ref, h_ref = naive_hsm_ssd(mixer, x, 4, 5)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, y_ref)


def test_gating_runs_on_n_hidden_tokens_whatever_the_image_size():
    """The paper's point: the projections after compression see N tokens, so their cost does not grow with H*W."""
    mixer = HiddenStateMixerSSD(dim=8, state_dim=5, ssd_expand=1.0)
    seen = []
    mixer.hz_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    mixer.out_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    costs = []
    for h, w in ((4, 4), (8, 12)):
        with FlopCounterMode(display=False) as counter:
            mixer.hz_proj(torch.randn(1, 8, 5))
        costs.append(counter.get_total_flops())
        _, state = mixer(torch.randn(1, 8, h * w), h, w)
        assert state.shape == (1, 8, 5)
    assert all(shape[-1] == 5 for shape in seen) and costs[0] == costs[1]


def test_fusion_weights_are_a_softmax_over_the_four_heads():
    torch.manual_seed(0)
    model = perturbed(hfpapers.create_model("efficientvim", preset="tiny", num_labels=3)).eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(pixel_values=x, output_hidden_states=True)
    features = [norm(h).mean(-1) for norm, h in zip(model.norm, out.stage_hidden_states)]
    features.append(model.norm[3](model.efficientvim(pixel_values=x).last_hidden_state).mean((2, 3)))
    w = model.weights.exp() / model.weights.exp().sum()
    expected = sum(w[i] * (features[i] @ model.heads[i].weight.T + model.heads[i].bias) for i in range(4))
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


def test_distilled_model_averages_its_heads_in_eval_only():
    torch.manual_seed(0)
    model = perturbed(hfpapers.create_model("efficientvim", preset="tiny", num_labels=3, distillation=True))
    x = torch.randn(2, 3, 64, 64)

    def class_head_logits():
        body = model.efficientvim(pixel_values=x)
        features = [norm(h).mean(-1) for norm, h in zip(model.norm, body.stage_hidden_states)]
        features.append(model.norm[3](body.last_hidden_state).mean((2, 3)))
        return model._fused_logits(features, model.heads, model.weights)

    with torch.no_grad():
        for training in (False, True):
            model.train(training)
            out, expected = model(pixel_values=x), class_head_logits()
            if not training:
                expected = (expected + out.distillation_logits) / 2
            torch.testing.assert_close(out.logits, expected)


def test_non_square_inputs_and_per_stage_outputs():
    model = hfpapers.create_model("efficientvim", preset="tiny", num_labels=3).eval()
    out = model(pixel_values=torch.randn(2, 3, 64, 128), output_hidden_states=True)
    assert out.logits.shape == (2, 3)
    assert [tuple(f.shape[-2:]) for f in out.hidden_states] == [(4, 8), (2, 4), (1, 2)]
    assert [tuple(h.shape) for h in out.stage_hidden_states] == [(2, 32, 16), (2, 48, 9), (2, 64, 4)]


@pytest.mark.parametrize(("height", "width"), [(50, 70), (72, 64), (17, 33), (1, 1)])
def test_any_size_runs_with_grids_rounded_up(height, width):
    """Every stride-2 3x3 conv (padding 1) maps a side n to ceil(n / 2), as the official model (which takes square
    inputs of any side): stage grids are ceil(H / 16), ceil(H / 32), ceil(H / 64)."""
    torch.manual_seed(0)
    model = perturbed(hfpapers.create_model("efficientvim", preset="tiny", num_labels=3)).eval()
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
        fused = copy.deepcopy(model).fuse()(pixel_values=x).logits
    grids = [(math.ceil(height / 2 ** k), math.ceil(width / 2 ** k)) for k in (4, 5, 6)]
    assert [tuple(f.shape[-2:]) for f in out.hidden_states] == grids
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(fused, out.logits, atol=1e-5, rtol=1e-5)


def test_a_zero_size_image_is_refused():
    """(The bad inputs every image classifier refuses are in tests/test_contract.py.)"""
    model = hfpapers.create_model("efficientvim", preset="tiny").eval()
    with pytest.raises(ValueError, match=r"at least 1x1 pixels.*got shape \(1, 3, 0, 64\)"):
        model(pixel_values=torch.zeros(1, 3, 0, 64))


def test_float64_and_float16_pixels_are_cast_to_the_model_dtype():
    model = hfpapers.create_model("efficientvim", preset="tiny", num_labels=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for dtype in (torch.float64, torch.float16):
            got = model(pixel_values=x.to(dtype)).logits
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, model(pixel_values=x.to(dtype).float()).logits)


def test_classifier_without_classes_is_refused():
    with pytest.raises(Exception, match="num_labels must be at least 1.*got 0"):
        hfpapers.create_model("efficientvim", preset="tiny", num_labels=0)


def test_loss_follows_problem_type_and_config_output_hidden_states():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64)
    model = hfpapers.create_model("efficientvim", preset="tiny", num_labels=4).eval()
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    out = model(pixel_values=x, labels=targets)
    p = out.logits.sigmoid()
    torch.testing.assert_close(out.loss, -(targets * p.log() + (1 - targets) * (1 - p).log()).mean())
    regression = hfpapers.create_model("efficientvim", preset="tiny", num_labels=1).eval()
    values = torch.tensor([0.5, -1.0, 2.0])
    out = regression(pixel_values=x, labels=values)
    torch.testing.assert_close(out.loss, ((out.logits[:, 0] - values) ** 2).mean())
    regression.config.output_hidden_states = True
    out = regression(pixel_values=x)
    assert len(out.hidden_states) == 3 and len(out.stage_hidden_states) == 3
    assert regression(pixel_values=x, output_hidden_states=False).hidden_states is None


def test_missing_batch_norm_state_is_initialised_including_step_counters(tmp_path):
    from safetensors.torch import load_file, save_file

    model = hfpapers.create_model("efficientvim", preset="tiny", num_labels=3)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = type(model).from_pretrained(tmp_path)
    norms = [m for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 0 for m in norms)
    assert all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in norms)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients_and_batch_norm_statistics(use_reentrant):
    torch.manual_seed(0)
    model = perturbed(hfpapers.create_model("efficientvim", preset="tiny", num_labels=3)).train()
    start = copy.deepcopy(model.state_dict())
    x, labels = torch.randn(4, 3, 64, 48), torch.tensor([0, 1, 2, 1])

    def step():
        model.load_state_dict(start)
        model.zero_grad()
        model(pixel_values=x, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, copy.deepcopy(model.state_dict())

    plain, plain_state = step()
    # transformers v5's name of gradient_checkpointing_enable()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    recomputed = []
    model.efficientvim.stages[0].blocks[0].mixer.register_forward_hook(lambda *_: recomputed.append(1))
    checkpointed, checkpointed_state = step()
    assert len(recomputed) == 2  # the block ran again in the backward pass: it was checkpointed
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    # the recomputation must not update the BatchNorm running statistics a second time
    for name, value in plain_state.items():
        torch.testing.assert_close(checkpointed_state[name], value, msg=name)


def test_fuse_keeps_outputs_and_refuses_to_train_or_save(tmp_path):
    torch.manual_seed(0)
    model = perturbed(hfpapers.create_model("efficientvim", preset="tiny", num_labels=5)).eval()
    with pytest.raises(ValueError, match="call model.eval"):
        copy.deepcopy(model).train().fuse()
    fused = copy.deepcopy(model).fuse()
    x = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(fused(pixel_values=x).logits, model(pixel_values=x).logits, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with pytest.raises(ValueError, match="fused for inference"):
        fused.save_pretrained(tmp_path)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.bfloat16, 0.1)])
def test_fuse_keeps_the_dtype_of_the_weights(dtype, tolerance):
    torch.manual_seed(0)
    model = perturbed(hfpapers.create_model("efficientvim", preset="tiny", num_labels=5)).eval().to(dtype)
    fused = copy.deepcopy(model).fuse()
    assert {p.dtype for p in fused.parameters()} == {dtype}
    x = torch.randn(2, 3, 64, 80, dtype=dtype)
    with torch.no_grad():
        got, expected = fused(pixel_values=x).logits, model(pixel_values=x).logits
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected.double(), atol=tolerance, rtol=tolerance)


def test_block_gates_are_convex_mixes():
    """With every branch returning zero, each gate scales x by (1 - sigmoid(alpha)), four times."""
    config = hfpapers.create_model("efficientvim", preset="tiny").config
    block = EfficientViMBlock(8, 4, config)
    for branch in (block.dwconv1, block.dwconv2, block.ffn.fc2):
        torch.nn.init.zeros_(branch.conv.weight)
        branch.norm = None
    torch.nn.init.zeros_(block.mixer.out_proj.conv.weight)
    with torch.no_grad():
        block.alpha.copy_(torch.randn(4, 8))
    x = torch.randn(1, 8, 4, 4)
    expected = x * (1 - block.alpha.sigmoid()).prod(0).view(1, 8, 1, 1)
    torch.testing.assert_close(block(x)[0], expected)


def test_mixup_and_cutmix_targets():
    images = torch.arange(2 * 1 * 4 * 4.0).reshape(2, 1, 4, 4)
    labels = torch.tensor([0, 2])
    # Mixup only: targets are the smoothed one-hots blended with the reversed batch by the same lambda.
    mixed, targets = mix_batch(images, labels, 3, torch.Generator().manual_seed(0), 0.8, 0.0, 0.5, 0.1)
    lam = ((mixed[0] - images[1]) / (images[0] - images[1])).mean().item()
    smooth = torch.tensor([[0.1 / 3 + 0.9, 0.1 / 3, 0.1 / 3], [0.1 / 3, 0.1 / 3, 0.1 / 3 + 0.9]])
    torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.flip(0))
    # CutMix only: the target weight equals the share of pixels that still come from the image itself.
    cut, targets = mix_batch(images, labels, 3, torch.Generator().manual_seed(3), 0.0, 1.0, 0.5, 0.0)
    own = (cut[0] == images[0]).float().mean().item()
    torch.testing.assert_close(targets[0], torch.tensor([own, 0.0, 1 - own]))
    assert torch.allclose(targets.sum(-1), torch.ones(2))


def test_schedule_warms_up_decays_and_cools_down():
    recipe = EfficientViMRecipe(warmup_epochs=2, cooldown_epochs=1, warmup_lr=1e-4, min_lr=1e-3)
    args = type("Args", (), {"learning_rate": 1e-2, "num_epochs": 6})()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    scheduler = recipe.build_scheduler(optimizer, args, total_steps=60, steps_per_epoch=10)
    lrs = []
    for _ in range(60):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[10] == pytest.approx(1e-4 + (1e-2 - 1e-4) / 2)
    assert lrs[20] == pytest.approx(1e-2)
    assert lrs[35] == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + math.cos(math.pi * 15 / 30)))
    assert lrs[50:] == pytest.approx([1e-3] * 10)


def test_weight_decay_groups_follow_the_official_rule():
    model = hfpapers.create_model("efficientvim", preset="tiny")
    args = type("Args", (), {"learning_rate": 1e-3, "weight_decay": 0.05})()
    decay, no_decay = EfficientViMRecipe().build_optimizer(model, args).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "efficientvim.stages.0.blocks.0.alpha" in decayed and "norm.3.weight" in decayed
    assert not any(n.endswith(".bias") or n.endswith("mixer.A") or n == "weights" for n in decayed)
    assert no_decay["weight_decay"] == 0.0


def test_soft_target_cross_entropy_equals_hard_ce_for_one_hot_targets():
    logits, labels = torch.randn(4, 5), torch.tensor([0, 3, 1, 4])
    torch.testing.assert_close(soft_target_cross_entropy(logits, F.one_hot(labels, 5).float()),
                               F.cross_entropy(logits, labels))


def test_hard_distillation_from_a_teacher_folder(tmp_path):
    """DeiT hard distillation: (1 - a) * soft CE on the class head + a * CE of the distillation head against the
    teacher's arg-max, the teacher loaded from a folder by id/path and seeing the same augmented images."""
    torch.manual_seed(0)
    teacher = perturbed(hfpapers.create_model("efficientvim", preset="tiny", num_labels=3)).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    student = perturbed(hfpapers.create_model("efficientvim", preset="tiny", num_labels=3, distillation=True), 1)
    recipe = EfficientViMRecipe(teacher=str(tmp_path / "teacher"), mixup_alpha=0.0, cutmix_alpha=0.0,
                                random_erasing=0.0, crop_scale=(1.0, 1.0), label_smoothing=0.0)
    batch = {"pixel_values": torch.randn(4, 3, 64, 64), "labels": torch.tensor([0, 1, 2, 1])}
    student.train()  # BatchNorm on batch statistics: the same images give the same outputs again below
    loss = recipe.compute_loss(student, batch, torch.Generator().manual_seed(5), TrainingState())
    gen = torch.Generator().manual_seed(5)
    from hfpapers.augment import horizontal_flip, random_resized_crop
    images = horizontal_flip(random_resized_crop(batch["pixel_values"], (1.0, 1.0), (3 / 4, 4 / 3), gen), gen)
    with torch.no_grad():
        out = student(pixel_values=images)  # in training mode `logits` is the class head alone
        teacher_labels = teacher(pixel_values=images).logits.argmax(-1)
    expected = 0.5 * F.cross_entropy(out.logits, batch["labels"]) + 0.5 * F.cross_entropy(
        out.distillation_logits, teacher_labels)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs a model with a distillation head"):
        recipe.compute_loss(teacher, batch, torch.Generator().manual_seed(5), TrainingState())
