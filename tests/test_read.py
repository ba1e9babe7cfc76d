"""READ: Similarity-as-Points step by step against hand-worked maps, the losses against closed forms, the model on
tiny LLaVA + SAM configs, the processor, pipeline, saving and training."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hfpapers
from hfpapers.methods.read.modeling_read import SimilarityAsPoints, dice_loss, sigmoid_ce_loss


def sasp(grid, down_sample=1, num_points=30, clip_size=4, t_pos=0.8, t_neg=0.2):
    return SimilarityAsPoints(grid, clip_size, t_pos, t_neg, num_points, down_sample)


# --- Similarity-as-Points -------------------------------------------------------------------------------------


def test_points_are_ordered_positive_negative_neutral_and_truncated():
    # Normalised values i/15 on a 4x4 grid: >= 0.8 -> cells 12..15, <= 0.2 -> cells 0..3, the rest neutral.
    points, labels = sasp(4, num_points=10).select_points(torch.arange(16.0), 8, 8)
    assert labels.tolist() == [1, 1, 1, 1, 0, 0, 0, 0, -1, -1]
    # Cell centres of an 8x8 image (2 pixels per cell): positives by descending value, negatives ascending.
    assert points.tolist() == [[7, 7], [5, 7], [3, 7], [1, 7], [1, 1], [3, 1], [5, 1], [7, 1], [1, 3], [3, 3]]


def test_a_wide_image_pads_the_map_and_never_picks_the_padding():
    # 2x2 map, image 4 high x 8 wide: the centre crop is padded by one cell of -1 on the left and the right.
    points, labels = sasp(2).select_points(torch.tensor([0.0, 1.0, 0.5, 0.1]), 4, 8)
    assert labels.tolist() == [1, 0, 0, -1]
    # padded row-major cells 2 (1.0), 1 (0.0), 6 (0.1), 5 (0.5); each cell is 2x2 pixels
    assert points.tolist() == [[5, 1], [3, 1], [5, 3], [3, 3]]


def test_down_sampling_averages_blocks_before_normalising():
    raw = torch.tensor([[-1.0, 1.0, 8.0, 12.0],
                        [1.0, -1.0, 10.0, 10.0],
                        [4.0, 4.0, 2.0, 2.0],
                        [0.0, 8.0, 2.0, 2.0]])  # block means 0, 10 / 4, 2 -> normalised 0, 1 / 0.4, 0.2
    points, labels = sasp(4, down_sample=2).select_points(raw.reshape(-1), 8, 8)
    assert labels.tolist() == [1, 0, 0, -1]
    assert points.tolist() == [[6, 2], [2, 2], [6, 6], [2, 6]]


def test_a_flat_map_gives_only_neutral_points():
    points, labels = sasp(2).select_points(torch.full((4,), 3.0), 4, 4)
    assert labels.tolist() == [-1] * 4 and not torch.isnan(points).any()


def test_similarity_map_is_the_bilinear_upsampling_padded_to_the_aspect_ratio():
    square = sasp(2).similarity_map(torch.tensor([0.0, 1.0, 0.0, 1.0]), 4, 4)
    torch.testing.assert_close(square, torch.tensor([[0.0, 0.25, 0.75, 1.0]] * 4))
    wide = sasp(2).similarity_map(torch.tensor([0.0, 1.0, 0.0, 1.0]), 4, 8)
    torch.testing.assert_close(wide, torch.tensor([[0.0, 0.0, 0.0, 0.25, 0.75, 1.0, 0.0, 0.0]] * 4))


def test_discrete_to_continuous_matches_a_pixel_loop():
    generator = torch.Generator().manual_seed(0)
    sm = torch.rand(5, 6, generator=generator, dtype=torch.float64)
    points = torch.tensor([[1.0, 2.0], [5.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    probs = [[math.exp(sm[y, x]) for x in range(6)] for y in range(5)]
    total = sum(map(sum, probs))
    expected = []
    for px, py in points.tolist():
        weights = {(x, y): math.exp(-((x - px) ** 2 + (y - py) ** 2)) * probs[y][x] / total
                   for y in range(5) for x in range(6)}
        norm = sum(weights.values())
        expected.append([sum(x * w for (x, _), w in weights.items()) / norm,
                         sum(y * w for (_, y), w in weights.items()) / norm])
    torch.testing.assert_close(SimilarityAsPoints.discrete_to_continuous(sm, points),
                               torch.tensor(expected, dtype=torch.float64))


def test_a_similarity_count_that_does_not_fit_the_grid_is_an_error():
    with pytest.raises(ValueError, match=r"expected 16 image-token similarities \(4x4 grid\), got 9"):
        sasp(4)(torch.zeros(9), 8, 8)


# --- losses ---------------------------------------------------------------------------------------------------


def test_mask_losses_match_closed_forms():
    logits = torch.tensor([[[2.0, -1.0], [0.0, 3.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    bce = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log(2.0), math.log1p(math.exp(-3.0))]
    torch.testing.assert_close(sigmoid_ce_loss(logits, target), torch.tensor([sum(bce) / 4]))
    p = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.0, 3.0)]
    numerator = 2 * (p[0] + p[3]) / 1000 + 1e-6
    denominator = sum(p) / 1000 + 2 / 1000 + 1e-6
    torch.testing.assert_close(dice_loss(logits, target), torch.tensor([1 - numerator / denominator]))


# --- the model ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes():
    from hfpapers.data import build_referring_scenes

    return build_referring_scenes(num_train=8, num_test=4)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return hfpapers.create_model("read", preset="tiny", **overrides)


@pytest.fixture(scope="module")
def processor():
    from hfpapers.methods.read.recipe import load_processor

    return load_processor(tiny_model().config)


def batch_of(processor, split, **kwargs):
    from hfpapers.methods.read.recipe import READRecipe

    recipe = READRecipe(**kwargs)
    rows = recipe.prepare_dataset(split, processor)
    return recipe.collate([rows[i] for i in range(len(rows))])


def test_the_mask_loss_reaches_the_lm_hidden_states_through_the_point_coordinates(scenes, processor):
    model = tiny_model().eval()
    batch = batch_of(processor, scenes["train"].select(range(1)))
    hidden = model.llava(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         output_hidden_states=True).hidden_states[-1].detach().requires_grad_()
    image_states, seg_state = model._image_and_seg_states(hidden, batch["input_ids"], 0)
    points, labels, _ = model.similarity_as_points(image_states @ seg_state, 64, 64)
    embedding = model.text_hidden_fcs(seg_state).detach()  # only the points carry a gradient now
    image_embeddings = model.sam.get_image_embeddings(batch["sam_pixel_values"])
    mask = model.decode_mask(image_embeddings, embedding, 64, 64, points, labels)
    sigmoid_ce_loss(mask[None], batch["masks"][0][None]).sum().backward()
    assert hidden.grad.abs().sum() > 0
    image_rows = batch["input_ids"][0] == model.config.llava_config.image_token_index
    assert hidden.grad[0, image_rows].abs().sum() > 0  # the image-token states, through the similarity map


def test_lisa_mode_prompts_sam_with_the_seg_token_alone(scenes, processor):
    batch = batch_of(processor, scenes["train"].select(range(2)))
    read, lisa = tiny_model(), tiny_model(use_sasp=False)
    lisa.load_state_dict(read.state_dict())
    with torch.no_grad():
        out_read, out_lisa = read(**batch), lisa(**batch)
    torch.testing.assert_close(out_read.logits, out_lisa.logits)
    assert not torch.allclose(out_read.pred_masks[0], out_lisa.pred_masks[0])
    # LISA: mask decoder on [SEG] alone with SAM's no-mask dense embedding
    sam = lisa.sam
    with torch.no_grad():
        embedding = lisa.text_hidden_fcs(lisa._image_and_seg_states(
            lisa.llava(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       output_hidden_states=True).hidden_states[-1], batch["input_ids"], 0)[1])
        dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, 8, 8)
        low_res, _ = sam.mask_decoder(sam.get_image_embeddings(batch["sam_pixel_values"][:1]),
                                      sam.get_image_wide_positional_embeddings(), embedding.reshape(1, 1, 1, -1),
                                      dense, multimask_output=False)
    expected = torch.nn.functional.interpolate(low_res[0], (64, 64), mode="bilinear")[0, 0]
    torch.testing.assert_close(out_lisa.pred_masks[0], expected)


def test_masks_keep_each_image_size(processor):
    from hfpapers.data import build_referring_scenes

    wide = build_referring_scenes(num_train=2, num_test=0, image_size=(48, 80))["train"]
    batch = batch_of(processor, wide)
    with torch.no_grad():
        out = tiny_model()(**batch)
    assert [tuple(m.shape) for m in out.pred_masks] == [(48, 80)] * 2
    assert all(p[:, 0].max() <= 79 and p[:, 1].max() <= 47 for p in out.points)


def test_training_loss_is_the_weighted_sum(scenes, processor):
    out = tiny_model()(**batch_of(processor, scenes["train"].select(range(2))))
    torch.testing.assert_close(out.loss, out.ce_loss + out.mask_bce_loss + out.mask_dice_loss)


def test_rows_without_seg_give_no_mask(scenes, processor):
    batch = batch_of(processor, scenes["train"].select(range(2)))
    batch.pop("masks"), batch.pop("labels")
    batch["input_ids"][1][batch["input_ids"][1] == 5] = 7  # the second answer loses its [SEG]
    with torch.no_grad():
        out = tiny_model()(**batch)
    assert out.pred_masks[0] is not None and out.pred_masks[1] is None and out.points[1] is None


def test_training_rows_need_exactly_one_seg(scenes, processor):
    batch = batch_of(processor, scenes["train"].select(range(2)))
    batch["input_ids"][1][batch["input_ids"][1] == 5] = 7
    with pytest.raises(ValueError, match=r"exactly one \[SEG\] per row; .*\[1, 0\]"):
        tiny_model()(**batch)


def test_an_image_token_count_that_does_not_match_the_vision_config_is_an_error(scenes, processor):
    batch = batch_of(processor, scenes["train"].select(range(1)))
    batch.pop("masks"), batch.pop("labels")
    batch["input_ids"] = batch["input_ids"][:, torch.arange(batch["input_ids"].shape[1]) != 3]
    batch["attention_mask"] = batch["attention_mask"][:, 1:]
    with pytest.raises(ValueError, match=r"each row needs 64 image tokens \(8x8 patches .*got \[63\]"):
        tiny_model()(**batch)


def test_official_trainable_set_and_every_part_gets_a_gradient(scenes, processor):
    from hfpapers.methods.read.recipe import READRecipe

    model = tiny_model(lora_r=2)
    READRecipe().set_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = {"lora": [n for n in trainable if "lora_" in n],
              "seg_row": [n for n in trainable if "trainable_tokens_delta" in n],
              "lm_head": [n for n in trainable if n.startswith("llava.lm_head.")],
              "mask_decoder": [n for n in trainable if n.startswith("sam.mask_decoder.")],
              "projection": [n for n in trainable if n.startswith("text_hidden_fcs.")]}
    assert all(groups.values()) and sum(map(len, groups.values())) == len(trainable)
    assert not any("iou_prediction_head" in n for n in trainable)  # READ's loss has no IoU term
    assert not any(n.startswith(("llava.model.vision_tower", "llava.model.multi_modal_projector", "sam.vision",
                                 "sam.prompt_encoder")) for n in trainable)
    with torch.no_grad():  # LoRA's B starts at zero, which would block A's gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model(**batch_of(processor, scenes["train"].select(range(2)))).loss.backward()
    silent = [n for n, p in model.named_parameters()
              if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not silent


def test_training_everything_of_a_scratch_llava_leaves_no_trainable_weight_without_a_gradient(scenes, processor):
    from hfpapers.methods.read.recipe import READRecipe

    model = tiny_model()
    READRecipe(train_all=True).set_trainable(model)
    model(**batch_of(processor, scenes["train"].select(range(2)))).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("llava.model.vision_tower.encoder.layers.0.")}
    assert not {n for n in trainable if n.startswith("llava.model.vision_tower.encoder.layers.1.")}  # reads layer -2
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


# --- processor, pipeline, saving ----------------------------------------------------------------------------


def test_processor_expands_the_image_token_and_reads_grayscale_images_of_any_size(processor):
    image = Image.fromarray(np.full((30, 90), 128, dtype=np.uint8))  # grayscale, 1:3
    encoded = processor(images=[image], text=[processor.prompt("segment the red circle .")])
    assert (encoded["input_ids"][0] == 4).sum() == 64
    assert encoded["pixel_values"].shape == (1, 3, 64, 64) and encoded["sam_pixel_values"].shape == (1, 3, 64, 64)
    assert encoded["original_sizes"].tolist() == [[30, 90]]
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        processor(images=[image], text=["no image here"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, processor):
    folder = tmp_path_factory.mktemp("read")
    tiny_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_save_and_load_through_the_auto_classes(saved, scenes, processor):
    from transformers import AutoModel, AutoProcessor

    loaded_processor = AutoProcessor.from_pretrained(saved)
    assert type(loaded_processor).__name__ == "READProcessor" and loaded_processor.image_seq_length == 64
    batch = batch_of(loaded_processor, scenes["test"].select(range(2)))
    model, loaded = tiny_model().eval(), AutoModel.from_pretrained(saved).eval()
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert torch.equal(a.logits, b.logits)
    for x, y in zip(a.pred_masks, b.pred_masks):  # equal up to the summation order of loaded weights' layout
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-6)


def test_pipeline_returns_mask_text_points_and_map_and_draws_an_overlay(saved, tmp_path):
    from transformers import pipeline

    from hfpapers.methods.read.pipeline_read import save_overlay

    seg = pipeline("reasoning-segmentation", model=str(saved))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    out = seg(image, "segment the red circle .", max_new_tokens=6)
    assert set(out) == {"mask", "text", "points", "point_labels", "similarity_map", "segmented"}
    assert out["mask"].shape == (40, 70) and out["mask"].dtype == bool
    if out["segmented"]:
        assert out["similarity_map"].shape == (40, 70) and len(out["points"]) == len(out["point_labels"])
    else:  # a random LM rarely says [SEG]: an empty mask, said so
        assert not out["mask"].any() and out["points"] == []
    with pytest.raises(TypeError, match=r"max_new_tokens only, got \['max_tokens'\]"):
        seg(image, "segment the red circle .", max_tokens=6)
    canvas = save_overlay(image, out, str(tmp_path / "overlay.png"))
    assert canvas.size == (140, 40) and Image.open(tmp_path / "overlay.png").format == "PNG"


def test_an_answer_without_seg_gives_an_empty_mask_and_says_so(saved, caplog):
    from transformers import pipeline

    seg = pipeline("reasoning-segmentation", model=str(saved))
    seg.model.llava.generation_config.suppress_tokens = [5]  # the LM can no longer say [SEG]
    out = seg(Image.new("RGB", (64, 64)), "segment the red circle .", max_new_tokens=4)
    assert out == {**out, "segmented": False, "points": [], "point_labels": [], "similarity_map": None}
    assert out["mask"].shape == (64, 64) and not out["mask"].any() and "[SEG]" not in out["text"]


def test_the_saved_folder_loads_without_hfpapers(saved):
    code = f"""
import sys
from pathlib import Path
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "hfpapers" or name.startswith("hfpapers."):
            raise ImportError("hfpapers is blocked")
sys.meta_path.insert(0, Block())
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained({str(saved)!r}, trust_remote_code=True)
processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
print(type(model).__name__, type(processor).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["READForReasoningSegmentation", "READProcessor"]


def test_the_tiny_preset_must_match_the_word_tokenizer():
    from hfpapers.engine import TrainingArguments
    from hfpapers.methods.read.recipe import READRecipe

    with pytest.raises(ValueError, match="does not fit the word tokenizer"):
        READRecipe().build_model(hfpapers.get_method("read").resolve("tiny", {"seg_token_index": 6}), None,
                                 TrainingArguments(output_dir="x"))


@pytest.mark.slow
def test_the_sasp_ablation_trains_both_arms_from_one_sam_and_prints_the_table(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation" / "reproduce"))
    from read_sasp_ablation import reproduce

    results, table = reproduce(str(tmp_path), seeds=(0,), dataset_kwargs={"num_train": 32, "num_test": 8},
                               num_epochs=1, sam_pretrain_epochs=1, per_device_train_batch_size=16)
    assert list(results) == ["READ (SasP points + [SEG])", "LISA ([SEG] only)", "SAM, a click inside + a click outside"]
    assert all(0.0 <= r["giou"] <= 1.0 for runs in results.values() for r in runs)
    # the LISA arm reused the READ arm's SAM instead of training its own
    assert not (tmp_path / "seed0" / "tiny-lisa" / "base-sam").exists()
    from safetensors.torch import load_file

    sam_keys = load_file(tmp_path / "seed0" / "tiny" / "base-sam" / "model.safetensors")
    lisa = load_file(tmp_path / "seed0" / "tiny-lisa" / "model.safetensors")
    name = "vision_encoder.layers.0.attn.qkv.weight"
    assert torch.equal(sam_keys[name], lisa["sam." + name])  # the frozen SAM image encoder, as pretrained
    assert table.startswith("| arm | gIoU | cIoU | positive points on the target |") and (tmp_path / "table.md").exists()


def test_a_local_parquet_dataset_with_other_column_names_trains_through_the_mapping(tmp_path, processor):
    from hfpapers.data import build_referring_scenes, load
    from hfpapers.methods.read.recipe import READRecipe

    scenes = build_referring_scenes(num_train=4, num_test=2)
    for split, part in scenes.items():
        part.rename_columns({"image": "img", "question": "query", "answer": "reply", "mask": "target"}).to_parquet(
            str(tmp_path / f"{split}.parquet"))
    loaded = load(str(tmp_path), required=READRecipe.columns,
                  columns={"image": "img", "question": "query", "answer": "reply", "mask": "target"})
    assert loaded["train"]["question"] == scenes["train"]["question"]
    batch = batch_of(processor, loaded["train"])
    assert torch.equal(batch["masks"][0], batch_of(processor, scenes["train"])["masks"][0])


def test_read_on_pretrained_llava_and_sam_folders_adds_seg_and_trains_the_official_set(tmp_path, scenes):
    """A LLaVA-1.5-style folder (model + LlavaProcessor, no [SEG]) and a SAM folder (model + image processor), as
    from the Hub: `[SEG]` joins the tokenizer and the embeddings, LoRA + the official trainable set, one step."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, SamModel

    from hfpapers.engine import TrainingArguments
    from hfpapers.methods.read.recipe import READRecipe, load_processor, sam_image_processor

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hfpapers.data.referring import vocabulary

    tiny = tiny_model()
    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "user", "assistant", ":"]
    words += [w for w in vocabulary() if w not in words and w != "[SEG]"]  # a base LM without [SEG]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", additional_special_tokens=["<image>"])
    llava = LlavaForConditionalGeneration(tiny.config.llava_config)
    llava.save_pretrained(tmp_path / "llava")
    LlavaProcessor(image_processor=load_processor(tiny.config).image_processor, tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=load_processor(tiny.config).chat_template).save_pretrained(tmp_path / "llava")
    SamModel(tiny.config.sam_config).save_pretrained(tmp_path / "sam")
    sam_image_processor(64).save_pretrained(tmp_path / "sam")

    recipe = READRecipe(base_llava=str(tmp_path / "llava"), base_sam=str(tmp_path / "sam"))
    model, processor = recipe.build_model(hfpapers.get_method("read").resolve("tiny", {"lora_r": 4}), scenes,
                                          TrainingArguments(output_dir="x"))
    assert model.config.seg_token_index == processor.tokenizer.convert_tokens_to_ids("[SEG]") == len(words)
    assert model.config.base_llava == str(tmp_path / "llava")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and not any("vision_tower" in n for n in trainable)
    rows = recipe.prepare_dataset(scenes["train"].select(range(2)), processor)
    loss = model(**recipe.collate([rows[0], rows[1]])).loss
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="needs a pretrained SAM too"):
        READRecipe(base_llava=str(tmp_path / "llava")).build_model(hfpapers.get_method("read").resolve("tiny"),
                                                                   scenes, None)
