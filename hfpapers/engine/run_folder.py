"""What a run writes into its output folder, and how it is read back to resume.

    metrics.jsonl          one JSON record per log line and per evaluation
    training_curves.png    loss per step and the headline eval metric per epoch
    train_results.json     timings, step count, final eval metrics (written by `train`)
    hfpapers_run.json      how the run was made: method, preset, dataset, arguments (written by `train`)
    checkpoints/step-N/    resume state; trainer_state.json is written last and marks the checkpoint complete

A checkpoint holds no pickle: the weights (and the EMA) are safetensors; optimiser, scheduler, grad-scaler and RNG
states are a JSON skeleton (numbers, strings, lists, tuples, dicts) whose tensors sit in a safetensors file beside
it. Resuming therefore never runs code from the folder (accelerate's `load_state` unpickles its
`custom_checkpoint_*.pkl` and RNG files with weights_only=False, so it is not used).

Rotation is hand-written rather than accelerate's `ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=...)`: that rotation belongs to `save_state` (which pickles, above), prunes before the new checkpoint
exists and counts incomplete ones, so a kill during a save could leave fewer complete checkpoints than asked for.
Here the oldest complete checkpoints go only after the new one is complete.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..checkpoints import listing, load_checkpoint
from .state import TrainingState

STATE_FILE = "trainer_state.json"  # written last in a checkpoint: its presence marks the checkpoint complete
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
RESULTS_FILE = "train_results.json"
RUN_FILE = "hfpapers_run.json"  # how the run was made (method, preset, dataset, arguments), read by `eval`
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"  # the trackers' files (`report_to`)
NEURAL_COLLAPSE_FILE = "neural_collapse.png"  # NC1-NC4 per epoch (`neural_collapse=True`; values in metrics.jsonl)
# What a run writes at the top of its folder; an earlier run's copies must go before a new run starts.
RUN_ENTRIES = (CHECKPOINTS_DIR, METRICS_FILE, CURVES_FILE, RESULTS_FILE, RUN_FILE, LOGS_DIR, NEURAL_COLLAPSE_FILE)
# Training arguments a resume may change: where and how often it reports, not what it computes.
RESUMABLE_ARGUMENTS = ("output_dir", "resume_from", "overwrite_output_dir", "progress_bar", "log_every_steps",
                       "checkpoint_every_steps", "keep_checkpoints", "report_to", "per_device_eval_batch_size",
                       "neural_collapse")


# ------------------------------------------------------------------ writing files


def _disk_full(error: BaseException) -> bool:
    # torch / safetensors report ENOSPC inside their own exception types (observed: safetensors
    # "I/O error: No space left on device (os error 28)"; torch.save a C++ "enforce fail ... unexpected pos").
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error) \
        or "os error 28" in str(error)


@contextmanager
def writing(path):
    """Turns a full disk while writing `path` into one clear OSError (ENOSPC)."""
    try:
        yield
    except Exception as error:
        if not _disk_full(error):
            raise
        full = OSError(f"no space left on device while writing {path}")
        full.errno = errno.ENOSPC
        raise full from error


def write_json(path: Path, value) -> None:
    """`value` as JSON in `path`, whole or not at all (a temporary file replaced in one step)."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path):
        tmp.write_text(json.dumps(value, indent=2))
        os.replace(tmp, path)


def read_json(path: Path):
    """A JSON file of a run folder; anything else (a planted pickle, a truncated file) is a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return json.loads(path.read_bytes())
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path} is not a JSON file written by hfpapers ({error})") from None


# ------------------------------------------------------------------ pickle-free state trees


def _encode(value, tensors: dict[str, torch.Tensor], where: str):
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list":
                [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint holds only tensors, numbers, strings, "
                    "lists, tuples and dicts")


def _decode(node, tensors: dict[str, torch.Tensor]):
    if not isinstance(node, dict):
        return node
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    if kind not in ("list", "tuple"):
        raise ValueError(f"unknown node {kind!r}")
    items = [_decode(v, tensors) for v in value]
    return tuple(items) if kind == "tuple" else items


def save_tree(folder: Path, name: str, value) -> None:
    """A state dict (optimizer, scheduler, ...) as `name.json` + `name.safetensors`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(value, tensors, name)
    with writing(folder / f"{name}.safetensors"):
        save_file(tensors, folder / f"{name}.safetensors")
    write_json(folder / f"{name}.json", skeleton)


def load_tree(folder: Path, name: str):
    skeleton = read_json(folder / f"{name}.json")
    tensors = load_checkpoint(folder / f"{name}.safetensors")
    try:
        return _decode(skeleton, tensors)
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{folder / (name + '.json')} is not a state written by hfpapers ({error!r})") from None


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A module's state dict as safetensors; tied tensors (one storage, two names) are saved as copies."""
    tensors, storages = {}, set()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        pointer = tensor.untyped_storage().data_ptr()
        tensors[name] = tensor.clone() if pointer in storages else tensor.contiguous()
        storages.add(pointer)
    with writing(path):
        save_file(tensors, path)


def load_weights(module: torch.nn.Module, path: Path) -> None:
    state_dict = load_checkpoint(path)
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # mis-shaped tensors
        raise ValueError(f"{path} does not fit the model: {str(error).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {listing(missing)}; "
                         f"unexpected {listing(unexpected)}")


def rng_state() -> dict:
    """This process's random generators (python, numpy, torch CPU and CUDA), as accelerate's save_state keeps them."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ checkpoints


def checkpoint_folder(output_dir: Path, global_step: int) -> Path:
    return output_dir / CHECKPOINTS_DIR / f"step-{global_step:08d}"


def save_checkpoint(accelerator, checkpoint: Path, model, optimizer, scheduler, ema, state: TrainingState,
                    run: dict) -> None:
    """Everything an exact resume needs, pickle-free; `run` (what the run is) goes into the state file."""
    state_dict = accelerator.get_state_dict(model)  # on every process: it gathers under FSDP / DeepSpeed
    if accelerator.is_main_process:
        checkpoint.mkdir(parents=True, exist_ok=True)
        save_weights(state_dict, checkpoint / "model.safetensors")
        if ema is not None:
            save_weights(ema.state_dict(), checkpoint / "ema.safetensors")
        save_tree(checkpoint, "optimizer", optimizer.state_dict())
        save_tree(checkpoint, "scheduler", scheduler.state_dict())
        if accelerator.scaler is not None:
            save_tree(checkpoint, "scaler", accelerator.scaler.state_dict())
    accelerator.wait_for_everyone()
    save_tree(checkpoint, f"rng_state_{accelerator.process_index}", rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(checkpoint / STATE_FILE, {**state.to_dict(), "run": run})


def read_checkpoint_state(checkpoint: Path) -> tuple[dict, dict]:
    """The `TrainingState` values and the run description saved in a complete checkpoint."""
    values = read_json(checkpoint / STATE_FILE)
    if not isinstance(values, dict) or "run" not in values:
        raise ValueError(f"{checkpoint / STATE_FILE} is not a state written by this version of hfpapers")
    run = values.pop("run")
    return values, run


def load_checkpoint_into(accelerator, checkpoint: Path, model, optimizer, scheduler, ema) -> None:
    """Restore what `save_checkpoint` wrote (safetensors and JSON only)."""
    load_weights(accelerator.unwrap_model(model), checkpoint / "model.safetensors")
    if ema is not None:
        load_weights(ema, checkpoint / "ema.safetensors")
    optimizer.load_state_dict(load_tree(checkpoint, "optimizer"))
    scheduler.load_state_dict(load_tree(checkpoint, "scheduler"))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(load_tree(checkpoint, "scaler"))
    set_rng_state(load_tree(checkpoint, f"rng_state_{accelerator.process_index}"))


def complete_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS_DIR
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists()) if root.is_dir() else []


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)


def find_checkpoint(output_dir: Path, resume_from: str) -> Path:
    if resume_from == "latest":
        complete = complete_checkpoints(output_dir)
        if not complete:
            raise FileNotFoundError(f"no complete checkpoint under {output_dir / CHECKPOINTS_DIR} to resume from")
        return complete[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}); "
                                f"complete ones: {[str(p) for p in complete_checkpoints(output_dir)]}")
    return path


def check_same_run(checkpoint: Path, saved: dict, current: dict) -> None:
    """Refuse to continue a checkpoint's run with other settings; name every difference."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))  # tuples read back as lists
    differences = [f"{key}: {old!r} in the checkpoint, {new!r} now"
                   for key, old, new in _differences(saved, current)]
    if differences:
        raise ValueError(f"cannot resume from {checkpoint}: it was written by a run with other settings "
                         f"({'; '.join(differences)}); resume with the same settings, or start anew with "
                         "overwrite_output_dir (--overwrite-output-dir)")


def _differences(old, new, prefix: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip("."), old, new


# ------------------------------------------------------------------ the output folder


def previous_run_entries(output_dir: Path) -> list[str]:
    """What an earlier run left at the top of `output_dir`."""
    return [name for name in RUN_ENTRIES if (output_dir / name).exists()]


def refuse_used_folder(output_dir: Path, entries: list[str]) -> None:
    raise FileExistsError(
        f"{output_dir} is not empty (it holds {listing(entries)}); pass overwrite_output_dir=True "
        "(--overwrite-output-dir) to train into it anew, or resume_from (--resume) to continue its run")


def clear_previous_run(output_dir: Path) -> None:
    """Remove an earlier run's files and the folders of its earlier stages (sub-folders with their own
    metrics.jsonl, e.g. a warm-start stage, which would otherwise be reused as they are)."""
    stages = [p.name for p in output_dir.iterdir() if p.is_dir() and (p / METRICS_FILE).exists()] \
        if output_dir.is_dir() else []
    for name in previous_run_entries(output_dir) + stages:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def log_record(accelerator, output_dir: Path, state: TrainingState, record: dict) -> None:
    """One line of metrics.jsonl (main process), kept in `state.history` and sent to the trackers."""
    state.history.append(record)
    if accelerator.is_main_process:
        with writing(output_dir / METRICS_FILE), open(output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def rewrite_metrics(output_dir: Path, history: list[dict]) -> None:
    # Lines logged after the checkpoint belong to the interrupted run; the resumed run logs them again.
    with writing(output_dir / METRICS_FILE):
        (output_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))


def plot_curves(history: list[dict], path: Path, metric: str) -> None:
    """Training loss per logged step and the eval metric per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["epoch"], r[f"eval_{metric}"]) for r in history if f"eval_{metric}" in r]
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 3.5))
    if losses:
        ax_loss.plot(*zip(*losses))
    ax_loss.set(xlabel="optimiser step", ylabel="training loss", title="loss")
    if evals:
        ax_eval.plot(*zip(*evals), marker="o")
    ax_eval.set(xlabel="epoch", ylabel=f"eval {metric}", title=f"eval {metric}")
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=100)
    plt.close(fig)
