"""READ's training recipe (official `train_read.py`, the same as LISA's `train_ds.py`).

Loss: text cross-entropy + 2 x mask BCE + 0.5 x mask DICE. LoRA r=8, alpha=16, dropout 0.05 on the LM's q_proj and
v_proj; the `[SEG]` embedding row, `lm_head`, SAM's mask decoder and the `[SEG]` projection train; the CLIP tower, the
projector and SAM's image and prompt encoders stay frozen. AdamW at lr 3e-4, betas (0.9, 0.95), no weight decay,
100 warm-up steps then linear decay; batch 2 x 10 accumulation per GPU, bf16.

Without pretrained bases (`base_llava`/`base_sam` unset) there is nothing to adapt. The tiny preset first trains a
SAM from scratch on point prompts of the embedded scenes (`SamPointRecipe`, standing in for SAM's pre-training),
then freezes its encoders as READ does and trains the whole LLaVA from scratch (`train_all`) with the READ loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ...engine import Recipe, warm_start
from .configuration_read import READConfig
from .metrics import ious_from_counts
from .modeling_read import (SEG_TOKEN, READForReasoningSegmentation, dice_loss, postprocess_masks,
                            resize_longest_side, sigmoid_ce_loss)
from .processing_read import READProcessor

IMAGE_TOKEN = "<image>"
# The LLaVA-1.5 conversation ("USER: <image>\n{question} ASSISTANT: {answer}"), for the word-level tokenizer.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }} : {% for part in message['content'] %}"
                 "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}{% endfor %}"
                 "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
_TEMPLATE_WORDS = ["user", "assistant", ":"]


def sam_image_processor(size: int):
    """SAM's preprocessing at input size `size`: longest side resized, ImageNet-normalised, padded square."""
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    return SamImageProcessorPil(size={"longest_edge": size}, pad_size={"height": size, "width": size})


def build_word_tokenizer():
    """The word tokenizer over the embedded scenes' words (`<s> text`, no EOS appended), with `<image>` and
    `[SEG]`: the tokenizer of a LLaVA trained from scratch."""
    from ...data.referring import vocabulary
    from ...data.text import word_tokenizer

    return word_tokenizer(_TEMPLATE_WORDS + vocabulary(), extra_special_tokens=(IMAGE_TOKEN, SEG_TOKEN),
                          append_eos=False, split_punctuation=False)


def load_processor(config: READConfig) -> READProcessor:
    """The base LLaVA's tokenizer (with `[SEG]`), CLIP processor and chat template plus the base SAM's processor;
    for models trained from scratch, the word-level tokenizer and processors at the config's sizes."""
    image_seq_length = config.image_grid ** 2
    if config.base_llava is None:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        size = config.llava_config.vision_config.image_size
        return READProcessor(CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size,
                                                                                          "width": size}),
                             build_word_tokenizer(), sam_image_processor(config.sam_config.vision_config.image_size),
                             chat_template=CHAT_TEMPLATE, image_seq_length=image_seq_length, image_token=IMAGE_TOKEN)
    from transformers import AutoImageProcessor, AutoProcessor

    llava = AutoProcessor.from_pretrained(config.base_llava)
    llava.tokenizer.add_tokens([SEG_TOKEN])
    return READProcessor(llava.image_processor, llava.tokenizer, AutoImageProcessor.from_pretrained(config.base_sam),
                         chat_template=llava.chat_template, image_seq_length=image_seq_length,
                         image_token=llava.image_token)


def _check_word_ids(config: READConfig, tokenizer) -> None:
    """The config of a LLaVA trained from scratch must use the word tokenizer's ids."""
    text = config.llava_config.text_config
    ids = {IMAGE_TOKEN: config.llava_config.image_token_index, SEG_TOKEN: config.seg_token_index,
           "<pad>": text.pad_token_id, "</s>": text.eos_token_id}
    wrong = {token: i for token, i in ids.items() if tokenizer.convert_tokens_to_ids(token) != i}
    if wrong or len(tokenizer) > text.vocab_size:
        raise ValueError(f"the config does not fit the word tokenizer ({len(tokenizer)} tokens, ids "
                         f"{tokenizer.convert_tokens_to_ids(list(ids))} for {list(ids)}): config ids {wrong}, "
                         f"vocab_size {text.vocab_size}")


def encode_examples(processor: READProcessor, images, questions, answers=None) -> dict:
    """Model inputs per example: token rows (the prompt; with answers, prompt + " " + answer + EOS tokenized as one
    text, the prompt's tokens labelled -100 as LLaVA's `preprocess_v1`), CLIP and SAM pixels, original sizes."""
    prompts = [processor.prompt(q) for q in questions]
    encoded = processor(images=list(images), text=prompts)
    rows = {"input_ids": _unpadded(encoded)}
    if answers is not None:
        eos = processor.tokenizer.eos_token
        conversations = processor(text=[f"{p} {a}{eos}" for p, a in zip(prompts, answers)])
        full = _unpadded(conversations)
        rows["labels"] = [[-100] * len(p) + f[len(p):] for p, f in zip(rows["input_ids"], full)]
        rows["input_ids"] = full
    for name in ("pixel_values", "sam_pixel_values", "original_sizes"):
        rows[name] = list(encoded[name])
    return rows


def _unpadded(encoded) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]


def collate_segmentation(examples: list[dict], pad_token_id: int) -> dict:
    """Pad token rows on the right (labels with -100), stack pixels and sizes, keep masks as a list (sizes
    differ)."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": []}
    if "labels" in examples[0]:
        batch["labels"] = []
    for e in examples:
        pad = length - len(e["input_ids"])
        rows = {"input_ids": (list(e["input_ids"]), pad_token_id), "attention_mask": ([1] * len(e["input_ids"]), 0)}
        if "labels" in e:
            rows["labels"] = (list(e["labels"]), -100)
        for name, (row, fill) in rows.items():
            batch[name].append(row + [fill] * pad)
    batch = {name: torch.tensor(rows) for name, rows in batch.items()}
    for name in ("pixel_values", "sam_pixel_values", "original_sizes"):
        batch[name] = torch.stack([e[name] for e in examples])
    if "masks" in examples[0]:
        batch["masks"] = [e["masks"] for e in examples]
    return batch


class SegmentationExamples(torch.utils.data.Dataset):
    def __init__(self, rows: dict):
        self.rows = rows

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def __getitem__(self, index: int) -> dict:
        return {name: values[index] for name, values in self.rows.items()}


def mask_tensor(mask) -> torch.Tensor:
    """A ground-truth mask (PIL or array, any non-zero = object) as a float (H, W) tensor of 0/1."""
    array = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    if array.ndim != 2:
        raise ValueError(f"a mask must be one (H, W) channel, got shape {array.shape}")
    return torch.from_numpy((array > 0).astype(np.float32))


def intersection_union(pred_masks: list, masks: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example intersection and union of binarised predictions (logit > 0; None = empty) with the truth."""
    inter, union = [], []
    for pred, truth in zip(pred_masks, masks):
        truth = truth > 0.5
        pred = torch.zeros_like(truth) if pred is None else pred > 0
        inter.append((pred & truth).sum())
        union.append((pred | truth).sum())
    return torch.stack(inter).double(), torch.stack(union).double()


# The training arguments of that stage.
_SAM_TRAINING = {"learning_rate": 2e-3, "weight_decay": 0.0, "lr_scheduler": "cosine", "warmup_steps": 20,
                 "per_device_train_batch_size": 32, "num_epochs": 8, "mixed_precision": "no"}


@dataclass
class SamPointRecipe(Recipe):
    """SAM's own task on the embedded scenes: one positive click inside the referred shape and one negative click
    outside it -> its mask (BCE + DICE). The stand-in for SAM's pre-training when a tiny SAM starts from scratch."""

    columns = ("image", "mask")
    metric = "iou"

    def prepare_dataset(self, dataset, processor) -> SegmentationExamples:
        self.sam_size = processor.sam_image_processor.size["longest_edge"]
        encoded = processor.sam_image_processor([image.convert("RGB") for image in dataset["image"]],
                                                return_tensors="pt")
        return SegmentationExamples({"sam_pixel_values": list(encoded["pixel_values"]),
                                     "original_sizes": list(encoded["original_sizes"]),
                                     "masks": [mask_tensor(m) for m in dataset["mask"]]})

    def collate(self, examples):
        return {"sam_pixel_values": torch.stack([e["sam_pixel_values"] for e in examples]),
                "original_sizes": torch.stack([e["original_sizes"] for e in examples]),
                "masks": [e["masks"] for e in examples]}

    def _mask_logits(self, sam, batch, generator) -> list[torch.Tensor]:
        size = self.sam_size
        clicks, labels = [], []
        for mask in batch["masks"]:
            inside, outside = (mask > 0.5).nonzero(), (mask <= 0.5).nonzero()
            picks = [inside[torch.randint(len(inside), (1,), generator=generator)],
                     outside[torch.randint(len(outside), (1,), generator=generator)]]
            height, width = mask.shape
            new_h, new_w = resize_longest_side(height, width, size)
            yx = torch.cat(picks).float() + 0.5  # pixel centres, (row, column)
            clicks.append(torch.stack([yx[:, 1] * new_w / width, yx[:, 0] * new_h / height], dim=-1))
            labels.append(torch.tensor([1, 0]))
        device = batch["sam_pixel_values"].device
        out = sam(pixel_values=batch["sam_pixel_values"], input_points=torch.stack(clicks)[:, None].to(device),
                  input_labels=torch.stack(labels)[:, None].to(device), multimask_output=False)
        return [postprocess_masks(low_res, size, *mask.shape)[0, 0]
                for low_res, mask in zip(out.pred_masks, batch["masks"])]

    def compute_loss(self, model, batch, step_rng, state):
        logits = self._mask_logits(model, batch, step_rng)
        return torch.stack([2.0 * sigmoid_ce_loss(p[None], t[None])[0] + 0.5 * dice_loss(p[None], t[None])[0]
                            for p, t in zip(logits, batch["masks"])]).mean()

    def eval_outputs(self, model, batch):
        inter, union = intersection_union(self._mask_logits(model, batch, torch.Generator().manual_seed(0)),
                                          batch["masks"])
        return {"intersection": inter, "union": union}

    def compute_metrics(self, outputs):
        return {"iou": ious_from_counts(outputs["intersection"].tolist(), outputs["union"].tolist())["giou"]}


def pretrain_sam(sam_config, processor, datasets, output_dir: str, seed: int, **settings):
    """A SAM of `sam_config` trained from scratch on point prompts of the embedded scenes, saved into
    `output_dir` (reused when it is already there)."""
    from transformers import SamModel

    def fresh_sam():
        sam = SamModel(sam_config)
        # What point prompts never reach (mask and box prompts, the IoU head) stays as initialised, so that every
        # trainable weight has a gradient in a multi-process run.
        for name, param in sam.named_parameters():
            param.requires_grad = not name.startswith(("prompt_encoder.mask_embed.", "prompt_encoder.point_embed.2.",
                                                       "prompt_encoder.point_embed.3.",
                                                       "mask_decoder.iou_prediction_head."))
        return sam

    return SamModel.from_pretrained(warm_start(output_dir, fresh_sam, datasets, SamPointRecipe(), seed=seed,
                                               processor=processor, **{**_SAM_TRAINING, **settings}))


@dataclass
class READRecipe(Recipe):
    base_llava: str | None = None  # LLaVA-1.5-style Hub id or folder; None: a LLaVA trained from scratch
    base_sam: str | None = None  # SAM Hub id or folder; None: a SAM trained from scratch
    train_all: bool = False  # train all of LLaVA, not just its LoRA (for a LLaVA trained from scratch)
    sam_pretrain_epochs: int = 0  # first train a SAM from scratch on point prompts (no base_sam)

    metric = "giou"
    columns = ("image", "question", "answer", "mask")
    processor_class = "AutoProcessor"

    def build_model(self, preset, datasets, args):
        values = dict(preset.values)
        if self.base_llava is not None:
            if self.base_sam is None:
                raise ValueError("a pretrained LLaVA (base_llava) needs a pretrained SAM too: set base_sam")
            for name in ("llava_config", "sam_config", "seg_token_index"):  # these come from the bases
                values.pop(name, None)
            model = READForReasoningSegmentation.from_base_models(self.base_llava, self.base_sam, **values)
            processor = load_processor(model.config)
        else:
            from transformers import SamModel

            sam = None
            if self.base_sam is not None:
                sam = SamModel.from_pretrained(self.base_sam)
                values.update(sam_config=sam.config.to_dict(), base_sam=str(self.base_sam))
            config = READConfig(**values)
            processor = load_processor(config)
            _check_word_ids(config, processor.tokenizer)
            if sam is None and self.sam_pretrain_epochs:
                sam = pretrain_sam(config.sam_config, processor, datasets, str(Path(args.output_dir, "base-sam")),
                                   args.seed, num_epochs=self.sam_pretrain_epochs)
            model = READForReasoningSegmentation(config, sam=sam)
        self.set_trainable(model)
        return model, processor

    def set_trainable(self, model: READForReasoningSegmentation) -> None:
        """LoRA, the [SEG] row, lm_head, SAM's mask decoder and the projection train (`train_all`: all of LLaVA
        instead of its LoRA); SAM's image and prompt encoders stay frozen. Weights that no loss reaches stay frozen
        too (so that a multi-process run has a gradient for every trainable weight): SAM's IoU head and its
        multi-mask heads (READ decodes one mask), and the vision-tower layers after the one LLaVA reads."""
        vision = model.config.llava_config.vision_config
        feature_layer = model.config.llava_config.vision_feature_layer
        used_layers = feature_layer if feature_layer >= 0 else vision.num_hidden_layers + 1 + feature_layer
        multimask_heads = range(1, model.config.sam_config.mask_decoder_config.num_multimask_outputs + 1)
        unused = ("sam.mask_decoder.iou_prediction_head.", "llava.model.vision_tower.post_layernorm.",
                  *(f"sam.mask_decoder.output_hypernetworks_mlps.{i}." for i in multimask_heads),
                  *(f"llava.model.vision_tower.encoder.layers.{i}." for i in range(used_layers,
                                                                                 vision.num_hidden_layers)))
        for name, param in model.named_parameters():
            param.requires_grad = not name.startswith(unused) and (
                name.startswith(("llava.lm_head.", "sam.mask_decoder.", "text_hidden_fcs."))
                or "lora_" in name or "trainable_tokens_delta" in name
                or (self.train_all and name.startswith("llava.")))

    def build_optimizer(self, model, args):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                 betas=(0.9, 0.95), weight_decay=args.weight_decay)

    def prepare_dataset(self, dataset, processor) -> SegmentationExamples:
        self.pad_token_id = processor.tokenizer.pad_token_id
        rows = encode_examples(processor, dataset["image"], dataset["question"], dataset["answer"])
        rows["masks"] = [mask_tensor(m) for m in dataset["mask"]]
        for i, (mask, size) in enumerate(zip(rows["masks"], rows["original_sizes"])):
            if tuple(mask.shape) != tuple(size.tolist()):
                raise ValueError(f"example {i}: mask size {tuple(mask.shape)} differs from its image's "
                                 f"{tuple(size.tolist())}")
        return SegmentationExamples(rows)

    def collate(self, examples):
        return collate_segmentation(examples, self.pad_token_id)

    def eval_outputs(self, model, batch):
        """Teacher-forced on the reference answer, as LISA's `validate`: per-example intersection and union, and
        how many positive SasP points fall on the target (computed with and without `use_sasp`)."""
        masks = batch.pop("masks")
        output = model(**batch)
        inter, union = intersection_union(output.pred_masks, masks)
        on_target, positives = [], []
        for points, labels, truth in zip(output.points, output.point_labels, masks):
            xy = points[labels == 1].round().long()
            on_target.append((truth[xy[:, 1].clamp(0, truth.shape[0] - 1), xy[:, 0].clamp(0, truth.shape[1] - 1)]
                              > 0.5).sum())
            positives.append(torch.tensor(len(xy)))
        return {"intersection": inter, "union": union, "on_target": torch.stack(on_target).double(),
                "positives": torch.stack(positives).double()}

    def compute_metrics(self, outputs):
        """gIoU, cIoU, and the fraction of positive SasP points on the target (the similarity map's precision)."""
        return {**ious_from_counts(outputs["intersection"].tolist(), outputs["union"].tolist()),
                "point_precision": (outputs["on_target"].sum() / outputs["positives"].sum().clamp(min=1)).item()}
