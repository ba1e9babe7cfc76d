"""The model card of a forgetting result: which classes were removed, the before/after table, the per-block
LoRA norms, the settings, the limits and the papers' numbers (reported, never mixed with measured ones)."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["build_card", "write_card", "PAPER_RESULTS", "BIBTEX"]

# [paper] arXiv 2501.09705 Tables 3-4 as shipped in the official README: H / Acc_r / Acc_f / Acc_o in %.
PAPER_RESULTS = {
    "GS-LoRA, face CASIA-100, 4 tasks x 20 classes, full replay, task 4 (40-20)": "73.76 / 72.45 / 0.00 / 1.93",
    "GS-LoRA++, same setting, task 4": "75.23 / 75.36 / 0.00 / 0.00",
    "GS-LoRA, same, few-shot replay (4 per class), task 4": "71.32 / 70.62 / 3.07 / 5.49",
    "GS-LoRA++, same, few-shot replay, task 4": "72.10 / 69.91 / 0.68 / 4.03",
    "GS-LoRA, ImageNet100 (ViT-B/16), 4 tasks x 20 classes, task 4": "86.30 / 86.30 / 0.20 / 0.07",
    "GS-LoRA++, ImageNet100, task 4": "87.00 / 87.50 / 0.00 / 0.07",
}

BIBTEX = """@article{zhao2024continual,
  title   = {Continual Forgetting for Pre-trained Vision Models},
  author  = {Zhao, Hongbo and Ni, Bolin and Wang, Haochen and Fan, Junsong and Zhu, Fei and Wang, Yuxi and
             Chen, Yuntao and Meng, Gaofeng and Zhang, Zhaoxiang},
  journal = {arXiv preprint arXiv:2403.11530},
  year    = {2024}
}

@article{zhao2025practical,
  title   = {Practical Continual Forgetting for Pre-trained Vision Models},
  author  = {Zhao, Hongbo and Zhu, Fei and Ni, Bolin and Zhu, Feng and Meng, Gaofeng and Zhang, Zhaoxiang},
  journal = {arXiv preprint arXiv:2501.09705},
  year    = {2025}
}"""


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def build_card(folder: str | Path, repo_id: str | None = None):
    """The `huggingface_hub.ModelCard` of a folder written by `ContinualForgetter.save_pretrained`."""
    from huggingface_hub import ModelCard, ModelCardData

    from ...cards import MODEL_CARDS_DIR
    from .forgetter import RESULTS_FILE

    folder = Path(folder)
    results = json.loads((folder / RESULTS_FILE).read_text())
    config, tasks = results["config"], results["tasks"]
    method = "GS-LoRA++" if config["prototypes"] else "GS-LoRA"
    if config["tune"] == "full":
        method = "full fine-tuning (GS-LoRA's losses, every weight trained)"
    elif config["alpha"] == 0:
        method += " without the group-sparse penalty (plain LoRA)"
    rows = [(t["task"], ", ".join(t["forget_classes"]), _percent(t["acc_f_before"]), _percent(t["acc_f"]),
             _percent(t["acc_r_before"]), _percent(t["acc_r"]), _percent(t["acc_o"]), _percent(t["drop"]),
             _percent(t["h_mean"])) for t in tasks]
    num_blocks = max((len(t["block_norms"]) for t in tasks), default=0)
    data = ModelCardData(library_name="transformers", pipeline_tag="image-classification",
                         tags=["hfpapers", "gs-lora", "continual-forgetting", "machine-unlearning",
                               "arxiv:2403.11530", "arxiv:2501.09705"],
                         base_model=results.get("base_model") or None)
    return ModelCard.from_template(
        data,
        template_path=str(MODEL_CARDS_DIR / "forgetting_template.md"),
        method=method,
        base_model=results.get("base_model") or "a local model",
        repo_id=repo_id or str(folder),
        removed=[c for t in tasks for c in t["forget_classes"]],
        rows=rows,
        num_blocks=num_blocks,
        norms=[(t["task"], [f"{n:.3f}" for n in t["block_norms"]]) for t in tasks if t["block_norms"]],
        settings=[(k, v) for k, v in config.items()],
        tune=config["tune"],
        prose=(MODEL_CARDS_DIR / "gs_lora.md").read_text().strip(),
        reported=list(PAPER_RESULTS.items()),
        bibtex=BIBTEX,
    )


def write_card(folder: str | Path, repo_id: str | None = None) -> Path:
    path = Path(folder) / "README.md"
    build_card(folder, repo_id).save(path)
    return path
