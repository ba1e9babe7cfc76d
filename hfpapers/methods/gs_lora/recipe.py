"""One forgetting task as a recipe for the shared engine (`hfpapers.engine.fit`).

Each training item pairs a replay (retain) example with a forget example: the official loop walks the retain
loader and cycles the forget loader, so an epoch is one pass over the replay set. Evaluation each epoch reports
Acc_f / Acc_r / Acc_o / H-Mean on the task's evaluation set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...engine import Recipe, TrainingState
from .config import GSLoRAConfig
from .losses import alpha_at, bounded_forgetting_loss, group_sparse_penalty, prototype_loss
from .metrics import forgetting_metrics

__all__ = ["PairedReplay", "GSLoRARecipe", "EmbeddingTap"]


class PairedReplay(torch.utils.data.Dataset):
    """Item i = retain example i and forget example i mod n_f; length n_r (one pass over the replay set)."""

    def __init__(self, retain: dict[str, torch.Tensor], forget: dict[str, torch.Tensor]):
        self.retain, self.forget = retain, forget

    def __len__(self) -> int:
        return len(self.retain["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = i % len(self.forget["labels"])
        return {"retain_pixel_values": self.retain["pixel_values"][i], "retain_labels": self.retain["labels"][i],
                "forget_pixel_values": self.forget["pixel_values"][j], "forget_labels": self.forget["labels"][j]}


class EvalSet(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.data["pixel_values"][i], "labels": self.data["labels"][i]}


class EmbeddingTap:
    """Keeps the input of the classifier head (the embedding the prototypes are means of), (batch, dim)."""

    def __init__(self, head: torch.nn.Module):
        self.embeddings: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._keep)

    def _keep(self, module, args):
        self.embeddings = args[0].flatten(1)

    def remove(self) -> None:
        self._handle.remove()


class GSLoRARecipe(Recipe):
    """L = CE(retain) + beta * ReLU(BND - CE(forget)) + alpha(epoch) * L_structure [+ L_pro].

    groups: the LoRA matrices in the penalty's groups (empty for full fine-tuning); prototypes: the frozen
    model's class-mean embeddings (num_labels, dim) with `tap` on the head, for GS-LoRA++.
    """

    metric = "h_mean"

    def __init__(self, config: GSLoRAConfig, groups: list[list[torch.Tensor]], forget_classes: list[int],
                 old_classes: list[int], forget_accuracy_before: float, prototypes: torch.Tensor | None = None,
                 tap: EmbeddingTap | None = None):
        if (prototypes is None) != (tap is None):
            raise ValueError("prototypes and the embedding tap come together")
        self.config, self.groups = config, groups
        self.forget_classes, self.old_classes = forget_classes, old_classes
        self.forget_accuracy_before = forget_accuracy_before
        self.prototypes, self.tap = prototypes, tap

    def prepare_dataset(self, dataset, processor) -> torch.utils.data.Dataset:
        # The forgetter encodes every split once, up front, and reuses it across tasks.
        if not isinstance(dataset, (PairedReplay, EvalSet)):
            raise TypeError(f"GSLoRARecipe trains on PairedReplay / EvalSet splits, got {type(dataset).__name__}")
        return dataset

    def build_optimizer(self, model, args):
        # timm's AdamW groups, as the official code builds them: no weight decay on 1-d tensors (biases, norms).
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW([{"params": [p for p in trainable if p.ndim > 1], "weight_decay": args.weight_decay},
                                  {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}],
                                 lr=args.learning_rate)

    def loss_terms(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Each term of the loss, unweighted except by the schedule-free weights of L_pro."""
        retain_x, forget_x = batch["retain_pixel_values"], batch["forget_pixel_values"]
        logits = model(pixel_values=torch.cat([retain_x, forget_x])).logits
        retain_logits, forget_logits = logits.split([len(retain_x), len(forget_x)])
        terms = {"retain": F.cross_entropy(retain_logits, batch["retain_labels"]),
                 "forget": bounded_forgetting_loss(forget_logits, batch["forget_labels"], self.config.bound)}
        if self.groups:
            terms["structure"] = group_sparse_penalty(self.groups)
        if self.prototypes is not None:
            retain_emb, forget_emb = self.tap.embeddings.split([len(retain_x), len(forget_x)])
            terms["prototype"] = prototype_loss(
                forget_emb, batch["forget_labels"], retain_emb, batch["retain_labels"], self.prototypes,
                self.config.prototype_bound, self.config.prototype_forget_weight, self.config.prototype_retain_weight)
        return terms

    def compute_loss(self, model, batch: dict, step_rng: torch.Generator, state: TrainingState) -> torch.Tensor:
        terms = self.loss_terms(model, batch)
        loss = terms["retain"] + self.config.beta * terms["forget"] + terms.get("prototype", 0.0)
        if "structure" in terms:
            loss = loss + alpha_at(state.epoch, self.config.alpha, self.config.alpha_warmup_epochs) * terms["structure"]
        return loss

    def eval_outputs(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {"predictions": model(pixel_values=batch["pixel_values"]).logits.argmax(-1), "labels": batch["labels"]}

    def compute_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        metrics = forgetting_metrics(outputs["predictions"].tolist(), outputs["labels"].tolist(), self.forget_classes,
                                     self.old_classes, self.forget_accuracy_before)
        return {k: v for k, v in metrics.items() if v is not None}  # Acc_o is undefined in the first task
