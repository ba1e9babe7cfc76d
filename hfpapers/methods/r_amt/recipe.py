"""R-AMT's few-shot recipe (arXiv 2307.15049, Sec. 3.3; official `code/trainers/masktuning.py`,
`configs/trainers/MASK/vit_b16.yaml`).

Loss A is the cross-entropy of the masked model's zero-shot logits (logit_scale * f_img . T^T against the cached
class embeddings T) plus 1e-4 * sum ||M_real||_2; loss B is the KL divergence to zero-shot CLIP (the same model with
its masks off) at temperature 1. Their gradients are taken separately: B's only decides, per mask element, whether
A's gradient is kept (gradient dropout, `gradient_dropout`), applied in `GradientDropout.on_before_optimizer_step`.
Adam, lr 8e-5, no weight decay, cosine schedule, 30 epochs, batch 32 (the paper preset's training arguments).
`regularize=False` is AMT (plain loss A).

Without `--config base_model=...` a tiny CLIP is first pre-trained here (a cached `warm_start` stage) on the
embedded captioned shapes, standing in for CLIP's web-scale pre-training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...engine import Callback, Recipe, TensorDataset, warm_start

__all__ = ["ClipPretrainingRecipe", "GradientDropout", "MaskedFraction", "RAmtRecipe", "gradient_dropout",
           "kl_to_zero_shot", "pretrain_clip", "tiny_clip_processor"]


def gradient_dropout(grad_ce: torch.Tensor, grad_kl: torch.Tensor, lambda_: float, uniform: torch.Tensor,
                     epsilon: float = 1e-8) -> torch.Tensor:
    """The gradient R-AMT steps with (official `graddrop_backward_and_update`, the paper's Eq. 7):
    P = (sign(g_CE) (g_CE + g_KL) / (|g_CE| + |g_KL| + eps) + 1) / 2 is 1 where both gradients agree in sign and
    drops towards 0 where the KL gradient opposes and dominates; g_CE is kept where P > U (U ~ Uniform(0, 1)) and
    scaled by 1 - lambda elsewhere: ((1 - lambda) + lambda * 1[P > U]) * g_CE."""
    keep = (torch.sign(grad_ce) * (grad_ce + grad_kl) / (grad_ce.abs() + grad_kl.abs() + epsilon) + 1) / 2
    return ((1.0 - lambda_) + lambda_ * (keep > uniform)) * grad_ce


def kl_to_zero_shot(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Official `KLLoss` (FUSE_ALPHA = 1): -sum softmax(teacher / T) log_softmax(student / T) T^2, batch mean."""
    teacher = F.softmax(teacher_logits / temperature, dim=-1)
    return -(teacher * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean() * temperature ** 2


class GradientDropout(Callback):
    """Replaces each mask's accumulated cross-entropy gradient by `gradient_dropout` of it and of the KL gradient
    that `RAmtRecipe.backward` collected. U is drawn from (the run's seed, the optimiser step), the same on every
    process; the KL gradients are averaged over processes as DDP averages the others."""

    def __init__(self, lambda_: float):
        self.lambda_ = lambda_
        self.kl_grads: dict[torch.nn.Parameter, torch.Tensor] = {}

    def add(self, params, grads) -> None:
        for param, grad in zip(params, grads):
            if grad is not None:
                self.kl_grads[param] = self.kl_grads[param] + grad if param in self.kl_grads else grad

    def on_train_begin(self, state, model, accelerator) -> None:
        self.seed = torch.initial_seed()  # `fit` has just seeded everything with the run's seed

    def on_before_optimizer_step(self, state, model, accelerator) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + state.global_step)
        for param, grad_kl in self.kl_grads.items():
            if accelerator.num_processes > 1:
                grad_kl = accelerator.reduce(grad_kl, "mean")
            uniform = torch.rand(param.shape, generator=generator).to(param.device)
            param.grad = gradient_dropout(param.grad, grad_kl, self.lambda_, uniform)
        self.kl_grads.clear()


class MaskedFraction(Callback):
    """Logs the share of masked weights the binary masks remove with every evaluation (`eval_masked_fraction`)."""

    def on_evaluate(self, state, model, metrics, accelerator) -> None:
        metrics["masked_fraction"] = accelerator.unwrap_model(model).masked_fraction()


def tiny_clip_processor(resolution: int):
    """CLIP's image preprocessing at `resolution` and a word tokenizer over the captions' words (right padding:
    CLIP's text positions are absolute and it pools at the first end-of-text token)."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    from ...data.captioned_shapes import caption_words
    from ...data.text import word_tokenizer

    tokenizer = word_tokenizer(caption_words())
    tokenizer.padding_side = "right"
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": resolution},
                                            crop_size={"height": resolution, "width": resolution})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@dataclass
class ClipPretrainingRecipe(Recipe):
    """CLIP's symmetric contrastive loss over a batch of image-caption pairs, where every caption in the batch that
    is true of an image ("a red circle", "a photo of a red circle", "a circle") counts as its positive: the set has
    a few hundred distinct captions, which would otherwise repeat in a batch as false negatives. Scored by caption
    retrieval: the share of images whose best caption among all distinct captions is true of them. The stand-in for
    CLIP's pre-training of a tiny CLIP from scratch."""

    columns = ("image", "caption", "shape", "colour")
    metric = "accuracy"

    def prepare_dataset(self, dataset, processor) -> TensorDataset:
        from ...data.captioned_shapes import COLOURS, SHAPE_KINDS, captions_of

        captions = sorted({c for colour in COLOURS for shape in SHAPE_KINDS for c in captions_of(colour, shape)})
        index = {c: i for i, c in enumerate(captions)}
        self.caption_inputs = processor.tokenizer(captions, padding=True, return_tensors="pt")
        truth = torch.zeros(len(dataset), len(captions), dtype=torch.bool)
        for row, (shape, colour) in enumerate(zip(dataset["shape"], dataset["colour"])):
            truth[row, [index[c] for c in captions_of(colour, shape)]] = True
        return TensorDataset(pixel_values=processor(images=list(dataset["image"]), return_tensors="pt")["pixel_values"],
                             caption=torch.tensor([index[c] for c in dataset["caption"]]), truth=truth)

    def _logits(self, model, pixel_values, captions) -> torch.Tensor:
        """(images, captions) logits."""
        device = pixel_values.device
        return model(input_ids=self.caption_inputs["input_ids"][captions].to(device),
                     attention_mask=self.caption_inputs["attention_mask"][captions].to(device),
                     pixel_values=pixel_values).logits_per_image

    def compute_loss(self, model, batch, step_rng, state):
        logits = self._logits(model, batch["pixel_values"], batch["caption"].cpu())
        positive = batch["truth"][:, batch["caption"]].float()  # (images, captions): caption j is true of image i
        return (F.cross_entropy(logits, positive / positive.sum(1, keepdim=True))
                + F.cross_entropy(logits.T, (positive / positive.sum(0, keepdim=True)).T)) / 2

    def eval_outputs(self, model, batch):
        every_caption = torch.arange(len(self.caption_inputs["input_ids"]))
        best = self._logits(model, batch["pixel_values"], every_caption).argmax(-1)
        return {"correct": batch["truth"].gather(1, best[:, None])[:, 0].float()}

    def compute_metrics(self, outputs):
        return {"accuracy": outputs["correct"].mean().item()}


# The tiny CLIP's pre-training (a warm_start stage).
PRETRAIN_TRAINING = {"learning_rate": 5e-3, "weight_decay": 0.0, "lr_scheduler": "cosine", "warmup_steps": 20,
                     "per_device_train_batch_size": 64, "num_epochs": 6, "mixed_precision": "no"}


def pretrain_clip(base: dict, output_dir: str, seed: int, resolution: int, num_train: int = 1000,
                  **settings) -> str:
    """A CLIP of config `base` (its text side sized to the caption tokenizer) trained from scratch on `num_train`
    embedded captioned shapes into `output_dir`, with its processor; reused when it is already there."""
    from transformers import CLIPConfig, CLIPModel

    from ... import data

    processor = tiny_clip_processor(resolution)
    tokenizer = processor.tokenizer
    text = {**base.get("text_config", {}), "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(**{**base, "text_config": text})
    datasets = data.load("captioned_shapes", required=ClipPretrainingRecipe.columns, seed=seed,
                         resolution=resolution, num_train=num_train, num_test=200)
    return str(warm_start(output_dir, lambda: CLIPModel(config), datasets, ClipPretrainingRecipe(), seed=seed,
                          processor=processor, **{**PRETRAIN_TRAINING, **settings}))


@dataclass
class RAmtRecipe(Recipe):
    regularize: bool = True  # R-AMT's gradient dropout; False: AMT
    gdr_lambda: float = 1.0  # "l" of Eq. 7 (official GDR_LAMBDA; README: 0.3 for 16 shots on most datasets)
    gdr_temperature: float = 1.0  # official GDR_T
    mask_loss_weight: float = 1e-4  # official LOSS_WEIGHT (MASK_LOSS: True); 0 turns the L2 penalty off
    templates: tuple[str, ...] = ("a photo of a {}.",)
    pretrain_epochs: int = 6  # the tiny CLIP's pre-training (no base_model)
    pretrain_examples: int = 1000
    columns = ("image", "label")
    processor_class = "AutoProcessor"
    metric = "accuracy"

    def __post_init__(self):
        self.templates = tuple(self.templates)
        if not 0 <= self.gdr_lambda <= 1 or self.gdr_temperature <= 0 or self.mask_loss_weight < 0:
            raise ValueError(f"expected 0 <= gdr_lambda <= 1, gdr_temperature > 0 and mask_loss_weight >= 0; got "
                             f"{self.gdr_lambda}, {self.gdr_temperature}, {self.mask_loss_weight}")
        # not a field: the run file records the recipe's settings, not its per-step state
        self._dropout = GradientDropout(self.gdr_lambda) if self.regularize else None

    def build_model(self, preset, datasets, args):
        from transformers import AutoProcessor

        base_model = preset.values.get("base_model")
        if base_model is None:
            resolution = preset.values["base"]["vision_config"]["image_size"]
            base_model = pretrain_clip(preset.values["base"], str(Path(args.output_dir, "base-clip")), seed=args.seed,
                                       resolution=resolution, num_train=self.pretrain_examples,
                                       num_epochs=self.pretrain_epochs, progress_bar=args.progress_bar)
        model = preset.new_model(base_model=base_model)
        processor = AutoProcessor.from_pretrained(base_model)
        model.set_classes(datasets["train"].features["label"].names, processor.tokenizer, self.templates)
        return model, processor

    def prepare_dataset(self, dataset, processor) -> TensorDataset:
        images = [image.convert("RGB") for image in dataset["image"]]
        return TensorDataset(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"],
                             labels=torch.as_tensor(list(dataset["label"])))

    def build_optimizer(self, model, args):
        # only the masks train (official: Adam on `mask_real`, the weights are frozen)
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                weight_decay=args.weight_decay)

    def callbacks(self):
        return [MaskedFraction(), *([self._dropout] if self.regularize else [])]

    def backward(self, accelerator, model, batch, step_rng, state):
        logits = model(pixel_values=batch["pixel_values"]).logits
        loss = F.cross_entropy(logits, batch["labels"])
        if self.mask_loss_weight:
            loss = loss + self.mask_loss_weight * accelerator.unwrap_model(model).mask_penalty()
        if self.regularize:
            with torch.no_grad():
                teacher = model(pixel_values=batch["pixel_values"], use_masks=False).logits
            kl = kl_to_zero_shot(logits, teacher, self.gdr_temperature) / accelerator.gradient_accumulation_steps
            masks = [p for p in model.parameters() if p.requires_grad]
            self._dropout.add(masks, torch.autograd.grad(kl, masks, retain_graph=True, allow_unused=True))
        accelerator.backward(loss)
        return loss.detach()

    def eval_outputs(self, model, batch):
        logits = model(pixel_values=batch["pixel_values"]).logits
        return {"predictions": logits.argmax(-1), "labels": batch["labels"],
                "loss": F.cross_entropy(logits, batch["labels"], reduction="none")}

    def compute_metrics(self, outputs):
        return {"accuracy": (outputs["predictions"] == outputs["labels"]).float().mean().item(),
                "loss": outputs["loss"].mean().item()}
