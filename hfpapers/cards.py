"""Model cards rendered from a method's record and what was measured in a training run."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from .engine import RESULTS_FILE, RUN_FILE
from .registry import get_method

# The repository's model_cards/ folder, installed as hfpapers.model_cards (setup.py): found the same way from a
# checkout, an editable install and a wheel.
MODEL_CARDS_DIR = files("hfpapers.model_cards")
TEMPLATE = MODEL_CARDS_DIR / "template.md"
# The nearest Hub pipeline tag for tasks that hfpapers registers under names the Hub does not list (our task name
# stays in the card's tags).
HUB_PIPELINE_TAGS = {"sentence-embedding": "sentence-similarity", "reasoning-segmentation": "image-segmentation",
                     "cross-view-completion": "image-to-image"}


def _card_tags(record) -> list[str]:
    tags = ["hfpapers", record.slug, record.kind, *(f"arxiv:{i}" for i in record.arxiv_ids)]
    return tags + [record.task] if record.task in HUB_PIPELINE_TAGS else tags


def _card_task(record, output_dir: Path) -> str:
    """The task a trained folder serves. A diffusers folder without a denoiser (no `unet` / `transformer` in its
    `model_index.json`, e.g. a trained `TransparentVAE`) cannot make images from text, whatever the method's task:
    it maps images to images."""
    if record.kind == "diffusers":
        index = output_dir / "model_index.json"
        components = json.loads(index.read_text()) if index.is_file() else {}
        if not {"unet", "transformer"} & components.keys():
            return "image-to-image"
    return record.task


def _hub_datasets(name: str) -> list[str] | None:
    """The card's `datasets`: only a Hub dataset id; embedded sets are built locally and named in the text."""
    from .data import EMBEDDED

    return None if name in EMBEDDED or Path(name).exists() else [name]


def build_card(output_dir: str | Path, repo_id: str | None = None):
    """The `huggingface_hub.ModelCard` of a trained run folder (needs the run and results files of `train`).

    `repo_id` is where the card tells readers to load the model from (default: the folder itself).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .registry import TRAINED_KINDS

    output_dir = Path(output_dir)
    if (output_dir / RUN_FILE).exists():
        slug = json.loads((output_dir / RUN_FILE).read_text())["method"]
        if get_method(slug).kind not in TRAINED_KINDS:
            return build_run_card(output_dir, slug, repo_id)
    for name in (RUN_FILE, RESULTS_FILE):
        if not (output_dir / name).exists():
            raise FileNotFoundError(f"{output_dir} has no {name}: a card is made from a folder written by `hfpapers train`")
    run = json.loads((output_dir / RUN_FILE).read_text())
    results = json.loads((output_dir / RESULTS_FILE).read_text())
    record = get_method(run["method"])
    prose_file = MODEL_CARDS_DIR / f"{record.slug.replace('-', '_')}.md"  # named like the method's folder
    if not prose_file.is_file():
        raise FileNotFoundError(f"no card prose for {record.slug!r} at {prose_file}")
    model_name = f"{record.slug}-{run['preset']}"
    task = _card_task(record, output_dir)
    eval_results = [
        EvalResult(task_type=task, dataset_type=run["dataset"], dataset_name=run["dataset"],
                   dataset_split="test", metric_type=name, metric_name=name, metric_value=round(value, 4))
        for name, value in results["eval"].items()
    ]
    data = ModelCardData(
        license=record.license.lower(), library_name=record.library,
        pipeline_tag=HUB_PIPELINE_TAGS.get(task, task),
        tags=_card_tags(record), datasets=_hub_datasets(run["dataset"]),
        metrics=list(results["eval"]), model_name=model_name, eval_results=eval_results,
    )
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE.read_text(encoding="utf-8"),
        model_name=model_name,
        method_title=record.title,
        arxiv_id=record.arxiv_id,
        arxiv_url=record.arxiv_url,
        authors=record.authors,
        year=record.year,
        model_type=record.model_type,
        slug=record.slug,
        preset=run["preset"],
        num_parameters=f"{results['num_parameters']:,}",
        dataset=run["dataset"],
        dataset_kwargs=json.dumps(run["dataset_kwargs"]) if run["dataset_kwargs"] else "",
        prose=prose_file.read_text(encoding="utf-8").strip(),
        auto_class=record.head_auto_class,
        library=record.library,
        model_module=record.model_classes[record.head_auto_class].rpartition(".")[0].rpartition(".")[0],
        task=record.task,
        repo_id=repo_id or str(output_dir),
        num_processes=run["num_processes"],
        train_seconds=f"{results['train_seconds']:.1f}",
        training_arguments=[(k, v) for k, v in {**run["training_arguments"], **run["recipe"]}.items()
                            if k not in ("output_dir", "resume_from", "progress_bar")],
        measured=[(k, f"{v:.4f}") for k, v in results["eval"].items()],
        reported=list(record.paper_results.items()),
        license=record.license,
        weights_license=record.weights_license,
        official_code=record.official_code,
        bibtex=record.bibtex,
    )


def write_card(output_dir: str | Path, repo_id: str | None = None) -> Path:
    path = Path(output_dir) / "README.md"
    build_card(output_dir, repo_id).save(path)
    return path


def build_run_card(output_dir: str | Path, slug: str, repo_id: str | None = None):
    """The card (or report README) of a procedure's or analysis's run folder, from its results.json."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .runs import RESULTS_FILE as RUN_RESULTS_FILE, RUN_FILE as RUN_INFO_FILE, Table

    output_dir = Path(output_dir)
    record = get_method(slug)
    results = json.loads((output_dir / RUN_RESULTS_FILE).read_text())
    run_file = output_dir / RUN_INFO_FILE
    run = json.loads(run_file.read_text()) if run_file.exists() else None
    dataset = run["dataset"] if run else record.dataset
    eval_results = [
        EvalResult(task_type=record.task, dataset_type=dataset, dataset_name=dataset, dataset_split="test",
                   metric_type=name, metric_name=name, metric_value=round(value, 4))
        for name, value in results["metrics"].items()
    ]
    title = f"{record.slug}: {run['preset']} run" if run else f"{record.slug} run"
    data = ModelCardData(
        license=record.license.lower(), library_name=record.library,
        pipeline_tag=HUB_PIPELINE_TAGS.get(record.task, record.task),
        tags=_card_tags(record), datasets=_hub_datasets(dataset), base_model=results.get("base_model") or None, metrics=list(results["metrics"]) or None,
        model_name=title, eval_results=eval_results or None,
    )
    prose_file = MODEL_CARDS_DIR / f"{record.slug.replace('-', '_')}.md"
    return ModelCard.from_template(
        data,
        template_str=(MODEL_CARDS_DIR / "run_template.md").read_text(encoding="utf-8"),
        title=title, method_title=record.title, arxiv_ids=record.arxiv_ids, authors=record.authors,
        year=record.year, kind=record.kind, slug=record.slug, summary=results["summary"],
        tables=[{"title": t["title"], "note": t["note"], "markdown": Table(**t).markdown()} for t in results["tables"]],
        usage=results["usage"].replace("REPO", f'"{repo_id or output_dir}"'),
        prose=prose_file.read_text(encoding="utf-8").strip(),
        settings=list((results.get("config") or {}).items()), run=run,
        preset_description=record.get_preset(run["preset"]).description if run else "",
        reported=list(record.paper_results.items()), license=record.license,
        weights_license=record.weights_license, official_code=record.official_code, bibtex=record.bibtex,
    )
    return card


def write_run_card(output_dir: str | Path, slug: str, repo_id: str | None = None) -> Path:
    path = Path(output_dir) / "README.md"
    build_run_card(output_dir, slug, repo_id).save(path)
    return path
