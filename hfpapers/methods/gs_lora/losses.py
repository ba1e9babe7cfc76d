"""The loss terms of GS-LoRA / GS-LoRA++ (official `engine_cl.py`):

    L = CE(f(x_r), y_r) + beta * ReLU(BND - CE(f(x_f), y_f)) + alpha * L_structure + L_pro
    L_pro = w_f * ReLU(BND_pro - KL_f) + w_r * KL_r
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["group_sparse_penalty", "bounded_forgetting_loss", "prototype_kl", "prototype_loss", "alpha_at",
           "class_prototypes"]


def group_sparse_penalty(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """L_structure = sum_g sqrt(sum_{t in g} ||t||_F^2): a group lasso with no sqrt(group size) weight.

    One vector norm per group rather than sqrt of a sum, so that a group at exactly zero has a zero
    (sub)gradient instead of a NaN.
    """
    return sum(torch.linalg.vector_norm(torch.cat([t.flatten() for t in group])) for group in groups)


def bounded_forgetting_loss(logits: torch.Tensor, labels: torch.Tensor, bound: float) -> torch.Tensor:
    """ReLU(BND - CE): gradient ascent on the batch-mean cross-entropy of the forgotten classes, switched off
    once it exceeds BND so the loss cannot run away. logits (batch, num_labels), labels (batch,)."""
    return F.relu(bound - F.cross_entropy(logits, labels))


def prototype_kl(embeddings: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """KL(softmax(prototype_y) || softmax(embedding)), averaged over the batch: embeddings (batch, dim) and
    prototypes (num_labels, dim) are turned into distributions over the embedding dimensions."""
    return F.kl_div(F.log_softmax(embeddings, dim=-1), F.log_softmax(prototypes[labels], dim=-1),
                    reduction="batchmean", log_target=True)


def prototype_loss(forget_embeddings, forget_labels, retain_embeddings, retain_labels, prototypes,
                   bound: float, forget_weight: float, retain_weight: float) -> torch.Tensor:
    """GS-LoRA++'s L_pro: forgotten classes pushed away from their own prototype until the KL reaches
    `bound`; retained classes pulled towards theirs."""
    push = F.relu(bound - prototype_kl(forget_embeddings, forget_labels, prototypes))
    pull = prototype_kl(retain_embeddings, retain_labels, prototypes)
    return forget_weight * push + retain_weight * pull


def alpha_at(epoch: int, alpha: float, warmup_epochs: int) -> float:
    """The sparsity warm-up (`--warmup_alpha`): alpha = 0 for the first `warmup_epochs` epochs."""
    return 0.0 if epoch < warmup_epochs else alpha


def class_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Per-class mean embedding (num_labels, dim); rows of classes without examples stay zero."""
    sums = torch.zeros(num_labels, embeddings.shape[-1], dtype=embeddings.dtype, device=embeddings.device)
    sums.index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=num_labels).clamp(min=1).to(embeddings.dtype)
    return sums / counts[:, None]
