"""Model cards rendered from a method's record and what was measured in a training run."""

from __future__ import annotations

import json
from pathlib import Path

from .engine import RESULTS_FILE, RUN_FILE
from .registry import get_method

MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"
TEMPLATE = MODEL_CARDS_DIR / "template.md"
# Hub pipeline tags for tasks that hfpapers registers under names the Hub does not list.
HUB_PIPELINE_TAGS = {"sentence-embedding": "sentence-similarity"}


def build_card(output_dir: str | Path, repo_id: str | None = None):
    """The `huggingface_hub.ModelCard` of a trained run folder (needs the run and results files of `train`).

    `repo_id` is where the card tells readers to load the model from (default: the folder itself).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    output_dir = Path(output_dir)
    for name in (RUN_FILE, RESULTS_FILE):
        if not (output_dir / name).exists():
            raise FileNotFoundError(f"{output_dir} has no {name}: a card is made from a folder written by `hfpapers train`")
    run = json.loads((output_dir / RUN_FILE).read_text())
    results = json.loads((output_dir / RESULTS_FILE).read_text())
    record = get_method(run["method"])
    prose_file = MODEL_CARDS_DIR / f"{record.slug.replace('-', '_')}.md"  # named like the method's folder
    if not prose_file.exists():
        raise FileNotFoundError(f"no card prose for {record.slug!r} at {prose_file}")
    model_name = f"{record.slug}-{run['preset']}"
    eval_results = [
        EvalResult(task_type=record.task, dataset_type=run["dataset"], dataset_name=run["dataset"],
                   dataset_split="test", metric_type=name, metric_name=name, metric_value=round(value, 4))
        for name, value in results["eval"].items()
    ]
    data = ModelCardData(
        license=record.license.lower(), library_name=record.library,
        pipeline_tag=HUB_PIPELINE_TAGS.get(record.task, record.task),
        tags=["hfpapers", record.slug, f"arxiv:{record.arxiv_id}"], datasets=[run["dataset"]],
        metrics=list(results["eval"]), model_name=model_name, eval_results=eval_results,
    )
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
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
        prose=prose_file.read_text().strip(),
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
