"""READ against the contract of built-in transformers models: outputs, embeddings accessors, SDPA / eager,
inits on missing keys, [SEG] typed into the question, bad inputs."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from test_read import batch_of, processor, scenes, tiny_model  # noqa: F401 (fixtures)


def test_outputs_tuples_hidden_states_and_text_config(scenes, processor):
    model = tiny_model().eval()
    model.set_attn_implementation("eager")  # attention weights come from the eager path, as in transformers
    batch = batch_of(processor, scenes["test"].select(range(2)))
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        plain = model.llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], output_hidden_states=True)
        as_tuple = model(**batch, return_dict=False)
        embeds = model.get_input_embeddings()(batch["input_ids"])
        from_embeds = model(**batch, inputs_embeds=embeds)
    assert len(out.hidden_states) == len(plain.hidden_states) and len(out.attentions) == 2
    torch.testing.assert_close(out.hidden_states[-1], plain.hidden_states[-1])
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    torch.testing.assert_close(from_embeds.logits, out.logits)
    assert model.config.get_text_config() is model.config.llava_config.text_config


def test_resize_keeps_the_seg_row_and_refuses_to_drop_it():
    model = tiny_model()
    seg = model.config.seg_token_index
    row = model.get_input_embeddings().weight[seg].detach().clone()
    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(old + 8)
    assert model.get_input_embeddings().num_embeddings == old + 8 == model.config.get_text_config().vocab_size
    assert torch.equal(model.get_input_embeddings().weight[seg], row)
    assert model.llava.get_output_embeddings().weight.shape[0] == old + 8
    with pytest.raises(ValueError, match=r"drops the \[SEG\] row"):
        model.resize_token_embeddings(seg)


def test_sdpa_and_eager_load_and_agree(tmp_path, scenes, processor):
    tiny_model().save_pretrained(tmp_path)
    batch = batch_of(processor, scenes["test"].select(range(2)))
    out = {}
    for implementation in ("sdpa", "eager"):
        model = AutoModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.llava.config.text_config._attn_implementation == implementation
        with torch.no_grad():
            out[implementation] = model(**batch)
    torch.testing.assert_close(out["sdpa"].logits, out["eager"].logits, atol=1e-5, rtol=1e-5)


def test_missing_projection_and_clip_keys_get_their_own_inits(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("text_hidden_fcs") and "vision_tower" not in k},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = AutoModel.from_pretrained(tmp_path)
    for linear in (model.text_hidden_fcs[0], model.text_hidden_fcs[2]):  # PyTorch's Linear init
        bound = linear.in_features ** -0.5
        assert linear.weight.abs().max() <= bound and linear.bias.abs().max() <= bound and linear.bias.std() > 0
    vision = model.llava.model.vision_tower.config
    q_proj = model.llava.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight
    clip_std = vision.hidden_size ** -0.5 * (2 * vision.num_hidden_layers) ** -0.5  # CLIP's in_proj_std
    assert abs(q_proj.std().item() - clip_std) < 0.15 * clip_std


def test_lora_b_stays_zero_after_init():
    model = tiny_model(lora_r=4)
    model.initialize_weights()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.equal(p, torch.zeros_like(p)) for p in lora_b)


def test_a_seg_typed_into_the_question_is_refused_and_never_read(scenes, processor):
    with pytest.raises(ValueError, match=r"contains '\[SEG\]'"):
        processor.prompt("segment [SEG] now")
    model = tiny_model().eval()
    model.llava.generation_config.suppress_tokens = [model.config.seg_token_index]  # the answer has no [SEG]
    image = Image.new("RGB", (64, 64))
    prompt = processor.prompt("segment the red circle .").replace("segment", "[SEG]", 1)  # bypassing prompt()
    encoded = processor(images=[image], text=[prompt])
    assert (encoded["input_ids"] == model.config.seg_token_index).sum() == 1
    out = model.segment(**encoded, max_new_tokens=3)
    assert out["pred_masks"] == [None]


def _inputs(processor, **changes):
    encoded = dict(processor(images=[Image.new("RGB", (40, 30))], text=[processor.prompt("segment it .")]))
    encoded.update(changes)
    return encoded


def test_float64_pixels_are_accepted_and_bad_images_refused(processor):
    model = tiny_model().eval()
    encoded = _inputs(processor)
    with torch.no_grad():
        expected = model(**encoded).logits
        doubled = model(**{**encoded, "pixel_values": encoded["pixel_values"].double()}).logits
    torch.testing.assert_close(doubled, expected)
    with pytest.raises(ValueError, match="aspect ratio must be at most 16:1"):
        processor(images=[Image.new("RGB", (5000, 3))], text=[processor.prompt("segment it .")])
    with pytest.raises(ValueError, match="empty list of images"):
        processor(images=[], text=[])
    with pytest.raises(ValueError, match="non-empty string"):
        processor.prompt("   ")
    one_pixel = processor(images=[Image.new("RGB", (1, 1))], text=[processor.prompt("segment it .")])
    with torch.no_grad():
        assert model(**one_pixel).logits.isfinite().all()


def test_the_folder_ships_its_pipeline_and_runs_it_where_hfpapers_cannot_be_imported(tmp_path, processor):
    """config.json names the pipeline code saved beside the model (`custom_pipelines`): without hfpapers,
    pipeline(..., trust_remote_code=True) runs it and segments as the in-process pipeline does. With hfpapers,
    the registered pipeline still serves the task without trust_remote_code."""
    import json

    import numpy as np
    from transformers import pipeline

    from test_contract import run_without_hfpapers

    folder = tmp_path / "read"
    tiny_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"] == {"reasoning-segmentation": {
        "impl": "pipeline_read.ReasoningSegmentationPipeline", "pt": ["AutoModel"]}}
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    # Every token but [SEG] suppressed, so that a random LM answers [SEG] and the mask is decoded.
    code = ("import json\nfrom transformers import pipeline\n"
            f"seg = pipeline('reasoning-segmentation', model={str(folder)!r}TRUST)\n"
            "config = seg.model.config\n"
            "seg.model.llava.generation_config.suppress_tokens = [\n"
            "    i for i in range(seg.model.get_input_embeddings().num_embeddings) if i != config.seg_token_index]\n"
            f"out = seg({str(tmp_path / 'a.png')!r}, 'segment the red circle .', max_new_tokens=2)\n"
            "print(type(seg).__module__.split('.')[0], json.dumps({'text': out['text'], 'points': out['points'],\n"
            "    'mask': out['mask'].tolist(), 'similarity_map': out['similarity_map'].tolist()}))\n")
    here = {}
    exec(code.replace("TRUST", ""), {"print": lambda *args: here.update(where=args[0], out=json.loads(args[1]))})
    where, out = run_without_hfpapers(code.replace("TRUST", ", trust_remote_code=True"), folder).split(" ", 1)
    out = json.loads(out)
    assert (here["where"], where) == ("hfpapers", "transformers_modules")
    assert here["out"]["text"] == out["text"] and "[SEG]" in out["text"]
    assert np.array(out["mask"]).shape == (40, 56) and out["mask"] == here["out"]["mask"]
    assert out["points"] == here["out"]["points"]
    np.testing.assert_allclose(out["similarity_map"], here["out"]["similarity_map"], atol=1e-6)
