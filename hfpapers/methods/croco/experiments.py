"""The paper's headline comparisons at small scale (evaluation/reproduce/croco.py and its seeded check).

1. Cross-view completion against single-view masked image modelling (MAE) with the same network and masking: the
   MAE arm's reference view is blank (every pixel the dataset mean, 0 after normalisation), so the decoder's
   cross-attention carries no information and view 1 must be completed from its visible 10 % alone.
2. The dense head (view 1's relative depth from both views) fine-tuned from the cross-view-completion network,
   from the MAE network, and from scratch, with the same steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...engine import METRICS_FILE, TrainingArguments, fit
from .configuration_croco import CroCoConfig
from .modeling_croco import CroCoForDepthEstimation, CroCoForPretraining, patch_errors, patchify
from .recipe import CroCoDepthRecipe, CroCoRecipe, build_image_processor


def _blank_reference(batch: dict) -> dict:
    return {**batch, "reference_pixel_values": torch.zeros_like(batch["reference_pixel_values"])}


@dataclass
class SingleViewRecipe(CroCoRecipe):
    """MAE: the same masked reconstruction with a blank second view."""

    def compute_loss(self, model, batch, step_rng, state):
        return super().compute_loss(model, _blank_reference(batch), step_rng, state)

    def eval_outputs(self, model, batch):
        return super().eval_outputs(model, _blank_reference(batch))


def _history(result, metric: str) -> list[float]:
    return [row[f"eval_{metric}"] for row in result.history if f"eval_{metric}" in row]


def pretrain_arms(datasets, config: dict, output_dir: Path, *, seed: int = 0, reuse: bool = False,
                  **training) -> dict:
    """Train CroCo and the single-view baseline from the same initial weights; their eval masked-patch loss per
    epoch and the saved folders (`reuse`: keep an arm already saved in `output_dir`)."""
    processor = build_image_processor(CroCoConfig(**config))
    out = {}
    for arm, recipe in (("croco", CroCoRecipe()), ("mae", SingleViewRecipe())):
        folder = output_dir / arm
        if reuse and (folder / "config.json").exists():  # a finished arm: its saved model and eval curve
            lines = (json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines())
            out[arm] = {"loss": [row["eval_loss"] for row in lines if "eval_loss" in row], "folder": str(folder)}
            continue
        torch.manual_seed(seed)
        model = CroCoForPretraining(CroCoConfig(**config))
        args = TrainingArguments(output_dir=str(output_dir / arm), seed=seed, overwrite_output_dir=True,
                                 progress_bar=False, **training)
        result = fit(model, datasets, recipe, args, processor, desc=arm)
        out[arm] = {"loss": _history(result, "loss"), "folder": str(output_dir / arm)}
    return out


def depth_arms(datasets, config: dict, initialisations: dict, output_dir: Path, *, seed: int = 0, **training) -> dict:
    """Fine-tune the dense head from each pre-trained folder in `initialisations` (name -> folder or None for
    scratch); eval depth MSE and ordinal accuracy per epoch."""
    processor = build_image_processor(CroCoConfig(**config))
    out = {}
    for arm, folder in initialisations.items():
        torch.manual_seed(seed)
        model = (CroCoForDepthEstimation(CroCoConfig(**config)) if folder is None
                 else CroCoForDepthEstimation.from_pretrained(folder))
        args = TrainingArguments(output_dir=str(output_dir / f"depth-{arm}"), seed=seed, overwrite_output_dir=True,
                                 progress_bar=False, **training)
        result = fit(model, datasets, CroCoDepthRecipe(), args, processor, desc=f"depth {arm}")
        out[arm] = {"depth_mse": _history(result, "depth_mse"),
                    "ordinal_accuracy": _history(result, "ordinal_accuracy")}
    return out


def loss_by_displacement(datasets, folders: dict, bins: int = 4) -> dict:
    """Where the second view helps: the eval masked-patch loss of each pre-trained arm (name -> folder; "mae" gets
    the blank reference) on the test pairs, split by how far each masked patch of view 1 lies from its content in
    view 2 (the length of the ground-truth flow averaged over the patch's pixels) into `bins` quantile bins. Every
    arm sees the same seeded eval mask. Returns {"edges": bin edges in pixels, arm: mean loss per bin}."""
    test = datasets["test"]
    out, mask = {}, None
    for arm, folder in folders.items():
        model = CroCoForPretraining.from_pretrained(folder).eval()
        p = model.config.patch_size
        batch = CroCoRecipe().prepare_dataset(test, build_image_processor(model.config)).tensors
        batch = _blank_reference(batch) if arm == "mae" else batch
        with torch.no_grad():
            result = model(**batch)
        errors = patch_errors(result.logits, patchify(batch["pixel_values"], p), model.config.norm_pix_loss)
        if mask is None:
            mask = result.mask
            flow = torch.as_tensor(np.stack(test["flow"]), dtype=torch.float32)  # (pairs, 2, H, W)
            grid = (flow.shape[2] // p, flow.shape[3] // p)
            patch_flow = flow.reshape(len(flow), 2, grid[0], p, grid[1], p).mean((3, 5)).flatten(2)
            displacement = patch_flow.norm(dim=1)[mask]
            edges = torch.quantile(displacement, torch.linspace(0, 1, bins + 1))
            which = torch.bucketize(displacement, edges[1:-1])
            out["edges"] = edges.tolist()
        assert torch.equal(result.mask, mask), "the eval mask is seeded: every arm must see the same"
        errors = errors[mask]
        out[arm] = [errors[which == b].mean().item() for b in range(bins)]
    return out


__all__ = ["SingleViewRecipe", "depth_arms", "loss_by_displacement", "pretrain_arms"]
