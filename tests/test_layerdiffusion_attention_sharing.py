"""LayerDiffuse SD1.5 attention sharing: checked against naive computations on tiny UNets.

Parity with the reference (Forge's `AttentionSharingUnit`, rootonchair's diffusers port) was measured once outside
the repo; these tests pin the same behaviour with independent hand computations.
"""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from hfpapers.methods.layerdiffusion.attention_sharing import (
    AttentionSharingAdapter,
    AttentionSharingProcessor,
    attention_sharing_module_names,
    diffusers_cond_mark,
    load_attention_sharing,
)

TINY = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
            norm_num_groups=32, layers_per_block=1, sample_size=16)
TINY_NAMES = [f"{t}.transformer_blocks.0.attn{k}" for t in
              ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
               "mid_block.attentions.0") for k in (1, 2)]
# rootonchair's LDM -> diffusers map of the 32 SD1.5 modules, in Forge's `module_mapping_sd15` order.
SD15_NAMES = [f"{block}.attentions.{j}.transformer_blocks.0.attn{k}"
              for block, n in (("down_blocks.0", 2), ("down_blocks.1", 2), ("down_blocks.2", 2), ("up_blocks.1", 3),
                               ("up_blocks.2", 3), ("up_blocks.3", 3), ("mid_block", 1))
              for j in range(n) for k in (1, 2)]


@pytest.fixture(scope="module")
def base_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY).eval()


@pytest.fixture
def unet(base_unet):
    return copy.deepcopy(base_unet)


@torch.no_grad()
def randomize(module, scale=0.1):
    for p in module.parameters():
        p.copy_(torch.randn_like(p) * scale)


def unet_inputs(rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 16, 16, generator=g), torch.tensor(500),
            torch.randn(rows, 7, 32, generator=g))


def released_state_dict(unet, frames, rank, control, seed=0):
    """A fake `layer_sd15_*` file: the released key names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for i, name in enumerate(attention_sharing_module_names(unet)):
        attn = unet.get_submodule(name)
        hidden, context = attn.to_q.out_features, attn.to_k.in_features
        p = f"hookers.layers.{i}."
        for f in range(frames):
            for proj, in_features in (("q", hidden), ("k", context), ("v", context), ("out", hidden)):
                shapes[f"{p}to_{proj}_lora.{f}.down.weight"] = (rank, in_features)
                shapes[f"{p}to_{proj}_lora.{f}.up.weight"] = (hidden, rank)
            if control:
                shapes.update({f"{p}control_convs.{f}.0.weight": (256, 256, 3, 3),
                               f"{p}control_convs.{f}.0.bias": (256,),
                               f"{p}control_convs.{f}.2.weight": (hidden, 256, 1, 1),
                               f"{p}control_convs.{f}.2.bias": (hidden,)})
        for t in "iqkvo":
            shapes.update({f"{p}temporal_{t}.weight": (hidden, hidden), f"{p}temporal_{t}.bias": (hidden,)})
        shapes.update({f"{p}temporal_n.weight": (hidden,), f"{p}temporal_n.bias": (hidden,)})
    if control:
        widths = {0: [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)]}
        widths.update({b: [(256, 256)] * 2 for b in (1, 2, 3)})
        for b, convs in widths.items():
            for j, (c_in, c_out) in enumerate(convs):
                shapes.update({f"kwargs_encoder.blocks_{b}.{2 * j}.weight": (c_out, c_in, 3, 3),
                               f"kwargs_encoder.blocks_{b}.{2 * j}.bias": (c_out,)})
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def explicit_attention(q, k, v, heads):
    """Multi-head attention of one sequence, written out: softmax(q_h k_h^T / sqrt(d)) v_h per head."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        w = torch.exp(q[:, s] @ k[:, s].T / d ** 0.5)
        out.append(w / w.sum(-1, keepdim=True) @ v[:, s])
    return torch.cat(out, -1)


def merged(base, lora):
    """`base` with LoRA merged: x -> x (W0 + up down)^T + b."""
    weight = base.weight + lora.up.weight @ lora.down.weight
    return lambda x: x @ weight.T + (0 if base.bias is None else base.bias)


def naive_processor(proc, attn, h, context=None, cond_overwrite=(), cond_mark=None, signal=None):
    """The patched module's output row by row and token by token (frame of row r: r % frames)."""
    frames, (rows, tokens, _) = proc.frames, h.shape
    x = h.clone()
    if signal is not None:  # per-frame control conv of the condition features, added to the input
        for r in range(rows):
            x[r] += proc.control_convs[r % frames](signal)[0].flatten(1).T
    attn_out = torch.zeros_like(h)
    for r in range(rows):
        f = r % frames
        ctx = x[r] if context is None else context[r]
        if context is not None and cond_mark[r] == 0 and f < len(cond_overwrite) and cond_overwrite[f] is not None:
            ctx = cond_overwrite[f][0]
        q = merged(attn.to_q, proc.to_q_lora[f])(x[r])
        k, v = merged(attn.to_k, proc.to_k_lora[f])(ctx), merged(attn.to_v, proc.to_v_lora[f])(ctx)
        attn_out[r] = merged(attn.to_out[0], proc.to_out_lora[f])(explicit_attention(q, k, v, attn.heads))
    y = x + attn_out
    temporal = torch.zeros_like(h)
    for b in range(rows // frames):
        group = slice(b * frames, (b + 1) * frames)
        for t in range(tokens):
            z = proc.temporal_i(proc.temporal_n(y[group, t]))  # the frames of one spatial token
            z = explicit_attention(proc.temporal_q(z), proc.temporal_k(z), proc.temporal_v(z), attn.heads)
            temporal[group, t] = proc.temporal_o(z)
    return (x - h) + attn_out + temporal


def test_module_names_follow_the_reference_order(unet):
    assert attention_sharing_module_names(unet) == TINY_NAMES
    sd15 = UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=8,
                                norm_num_groups=16, sample_size=8)  # SD1.5's block layout, tiny widths
    assert attention_sharing_module_names(sd15) == SD15_NAMES and len(SD15_NAMES) == 32


@torch.no_grad()
def test_zero_lora_and_temporal_o_leave_the_unet_exactly_unchanged(unet):
    x, t, text = unet_inputs(4)
    expected = unet(x, t, text).sample
    adapter = AttentionSharingAdapter.from_unet(unet, frames=2, rank=4)
    randomize(adapter)
    for proc in adapter.processors:
        for lora in [*proc.to_q_lora, *proc.to_k_lora, *proc.to_v_lora, *proc.to_out_lora]:
            lora.up.weight.zero_()
        proc.temporal_o.weight.zero_()
        proc.temporal_o.bias.zero_()
    adapter.install(unet)
    assert torch.equal(unet(x, t, text).sample, expected)


@torch.no_grad()
def test_one_frame_temporal_attention_is_temporal_o_of_v():
    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8, out_bias=True)
    proc = AttentionSharingProcessor(32, 32, frames=1, rank=4)
    for layer in (proc.temporal_i, proc.temporal_n, proc.temporal_q, proc.temporal_k, proc.temporal_v, proc.temporal_o):
        randomize(layer)
    h = torch.randn(3, 10, 32)
    a = attn(h)  # the original attention: zero LoRA-up keeps it
    # softmax over a single frame is 1, so the temporal attention is temporal_o(v(temporal_i(norm(h + a))))
    n = torch.nn.functional.layer_norm(h + a, (32,), proc.temporal_n.weight, proc.temporal_n.bias, eps=1e-6)
    x = (n @ proc.temporal_i.weight.T + proc.temporal_i.bias) @ proc.temporal_v.weight.T + proc.temporal_v.bias
    expected = a + x @ proc.temporal_o.weight.T + proc.temporal_o.bias
    attn.set_processor(proc)
    torch.testing.assert_close(attn(h), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_frame_f_of_the_batch_uses_lora_f(unet, base_unet):
    frames = 3
    adapter = AttentionSharingAdapter.from_unet(unet, frames=frames, rank=4)
    randomize(adapter, 0.05)
    for proc in adapter.processors:  # no temporal mixing: frames are then independent
        proc.temporal_o.weight.zero_()
        proc.temporal_o.bias.zero_()
    adapter.install(unet)
    x, t, text = unet_inputs(2 * frames)
    out = unet(x, t, text).sample
    for f in range(frames):
        by_hand = copy.deepcopy(base_unet)
        for name, proc in zip(TINY_NAMES, adapter.processors):
            attn = by_hand.get_submodule(name)
            for layer, lora in ((attn.to_q, proc.to_q_lora[f]), (attn.to_k, proc.to_k_lora[f]),
                                (attn.to_v, proc.to_v_lora[f]), (attn.to_out[0], proc.to_out_lora[f])):
                layer.weight += lora.up.weight @ lora.down.weight
        rows = slice(f, None, frames)
        torch.testing.assert_close(out[rows], by_hand(x[rows], t, text[rows]).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cross", [False, True], ids=["attn1", "attn2"])
@torch.no_grad()
def test_processor_matches_explicit_loops_over_frames_and_tokens(cross):
    torch.manual_seed(0)
    frames, heads, rows = 3, 4, 12  # 2 pictures x 3 frames, times [uncond, cond]
    attn = Attention(32, cross_attention_dim=16 if cross else None, heads=heads, dim_head=8, out_bias=True)
    proc = AttentionSharingProcessor(32, 16 if cross else 32, frames=frames, rank=4)
    randomize(attn)
    randomize(proc)
    h = torch.randn(rows, 16, 32)
    context = torch.randn(rows, 5, 16) if cross else None
    overwrite = [torch.randn(1, 5, 16), None, torch.randn(1, 5, 16)]  # frame 1 keeps the shared prompt
    mark = diffusers_cond_mark(rows // 2)
    expected = naive_processor(proc, attn, h, context, overwrite, mark)
    got = proc(attn, h, context, cond_overwrite=overwrite, cond_mark=mark)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_control_features_are_added_per_frame():
    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8, out_bias=True)
    proc = AttentionSharingProcessor(32, 32, frames=2, rank=4, use_control=True)
    randomize(attn)
    randomize(proc, 0.02)
    h, signal = torch.randn(4, 16, 32), torch.randn(1, 256, 4, 4)  # a 4x4 feature map: 16 tokens
    expected = naive_processor(proc, attn, h, signal=signal)
    torch.testing.assert_close(proc(attn, h, control_signals={16: signal}), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs its condition image"):
        proc(attn, h)
    with pytest.raises(ValueError, match="no control signal for a 16-token"):
        proc(attn, h, control_signals={64: signal})


def test_cond_mark_follows_forge_and_diffusers_order():
    assert diffusers_cond_mark(2).tolist() == [1, 1, 0, 0]  # [uncond, cond]; 0 marks a conditional row
    assert diffusers_cond_mark(3, do_classifier_free_guidance=False).tolist() == [0, 0, 0]


@torch.no_grad()
def test_cond_overwrite_replaces_the_prompt_of_conditional_rows_only(unet):
    frames = 2
    adapter = AttentionSharingAdapter.from_unet(unet, frames=frames, rank=4)
    randomize(adapter, 0.05)
    adapter.install(unet)
    x, t, text = unet_inputs(2 * frames)  # rows: uncond f0, f1, cond f0, f1
    prompts = [torch.randn(1, 7, 32), torch.randn(1, 7, 32)]
    out = unet(x, t, text, cross_attention_kwargs={"cond_overwrite": prompts,
                                                   "cond_mark": diffusers_cond_mark(frames)}).sample
    replaced = torch.cat([text[:2], prompts[0], prompts[1]])
    torch.testing.assert_close(out, unet(x, t, replaced).sample, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs cond_mark"):
        unet(x, t, text, cross_attention_kwargs={"cond_overwrite": prompts})


def test_batch_not_a_multiple_of_frames_raises(unet):
    AttentionSharingAdapter.from_unet(unet, frames=2, rank=4).install(unet)
    with pytest.raises(ValueError, match="multiple of 2"):
        unet(*unet_inputs(3))


@pytest.mark.parametrize("frames, control", [(1, False), (3, False), (2, True)],
                         ids=["transparent_attn", "joint", "fg2bg"])
@torch.no_grad()
def test_released_state_dict_loads_and_runs(unet, frames, control):
    state_dict = released_state_dict(unet, frames, rank=8, control=control)
    adapter = load_attention_sharing(unet, state_dict)
    assert (adapter.config.frames, adapter.config.rank, adapter.config.use_control) == (frames, 8, control)
    loaded = adapter.state_dict()
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    assert [unet.get_submodule(n).processor for n in TINY_NAMES] == adapter.processors
    kwargs = {}
    if control:
        signals = adapter.encode_control(torch.rand(1, 3, 128, 128))  # 8x the 16x16 latent
        assert {k: v.shape[1] for k, v in signals.items()} == {256: 256, 64: 256, 16: 256, 4: 256}
        kwargs = {"control_signals": signals}
    out = unet(*unet_inputs(2 * frames), cross_attention_kwargs=kwargs).sample
    assert out.shape == (2 * frames, 4, 16, 16) and torch.isfinite(out).all()


def test_load_reports_key_problems(unet):
    good = released_state_dict(unet, frames=2, rank=4, control=False)
    missing = dict(good)
    del missing["hookers.layers.3.temporal_k.bias"]
    with pytest.raises(ValueError, match=r"missing keys: hookers\.layers\.3\.temporal_k\.bias"):
        load_attention_sharing(copy.deepcopy(unet), missing)
    unknown = {**good, "hookers.layers.0.temporal_x.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys: hookers\.layers\.0\.temporal_x\.weight"):
        load_attention_sharing(copy.deepcopy(unet), unknown)
    mis_shaped = {**good, "hookers.layers.1.to_v_lora.1.up.weight": torch.zeros(32, 5)}
    with pytest.raises(ValueError, match=r"shape mismatches: hookers\.layers\.1\.to_v_lora\.1\.up\.weight"):
        load_attention_sharing(copy.deepcopy(unet), mis_shaped)
    sd15_sized = {**good, "hookers.layers.31.temporal_o.bias": torch.zeros(32)}
    with pytest.raises(ValueError, match="patches 32 attention modules, the UNet has 8"):
        load_attention_sharing(copy.deepcopy(unet), sd15_sized)
    with pytest.raises(ValueError, match="not a LayerDiffuse attention-sharing state dict"):
        load_attention_sharing(unet, {"down.weight": torch.zeros(1)})


@torch.no_grad()
def test_save_and_reload_with_the_released_key_names(unet, tmp_path):
    adapter = load_attention_sharing(unet, released_state_dict(unet, frames=3, rank=4, control=False))
    adapter.save_pretrained(tmp_path)
    reloaded = AttentionSharingAdapter.from_pretrained(tmp_path)
    assert reloaded.state_dict().keys() == adapter.state_dict().keys()
    x, t, text = unet_inputs(3)
    expected = unet(x, t, text).sample
    reloaded.install(unet)
    torch.testing.assert_close(unet(x, t, text).sample, expected, atol=0, rtol=0)
