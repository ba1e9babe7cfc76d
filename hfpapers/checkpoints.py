"""Reading checkpoints from outside safely, for the methods' converters.

A method's `convert_<slug>.py` (its record's `converter`) holds only its key-rename rules and variant detection,
behind one interface that `hfpapers convert <slug> CHECKPOINT OUT` calls: `add_arguments(parser)` (its own
options) and `convert(checkpoint, output_dir, **options) -> str` (writes the folder, returns a one-line report).
The checks of what it converted (`load_state_dict_checked`) are here, the same for every method.

Pickles are only ever unpickled with `torch.load(weights_only=True)` (tensors and plain containers, no code);
`.safetensors` files are read with safetensors.
"""

from __future__ import annotations

import functools
import importlib
import pickle
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

# What DataParallel / DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`) put before every key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_checkpoint(path: str | Path, allowed_globals: Iterable = ()):
    """The object in a checkpoint file. `allowed_globals` extends what weights-only unpickling accepts
    (as `torch.serialization.safe_globals` takes it), for envelopes that carry a known, harmless class."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(path, device="cpu")
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if refused := re.search(r"GLOBAL (\S+) was not an allowed global", str(error)):
            raise ValueError(
                f"{path}: weights-only loading refused the global {refused[1]}; only tensors and plain containers "
                "load safely. Re-save the state dict alone (torch.save(model.state_dict())) from a copy you trust"
            ) from error
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ValueError(f"{path} could not be read with torch.load(weights_only=True): {reason}") from error
    except (RuntimeError, EOFError, KeyError, SafetensorError) as error:  # what torch / safetensors raise on junk
        raise ValueError(f"{path} is not a torch.save or safetensors file ({type(error).__name__}: {error})") from error


def converter(slug: str):
    """The module that converts `slug`'s official checkpoints (see the module docstring for its interface)."""
    from .registry import get_method, list_methods

    record = get_method(slug)
    if record.converter is None:
        have = ", ".join(r.slug for r in list_methods() if r.converter)
        raise ValueError(f"{slug!r} has no converter of official checkpoints; methods with one: {have}")
    return importlib.import_module(record.converter)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `module.` / `_orig_mod.` from the start of every key; two keys that collide are an error."""
    stripped = {}
    for key, tensor in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in stripped:
            raise ValueError(f"keys {key!r} and another key both become {name!r} once wrapper prefixes are removed")
        stripped[name] = tensor
    return stripped


def listing(names: Iterable[str], limit: int = 10) -> str:
    """Sorted names, the first `limit` of them, for error messages."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str,
                     hints: Callable[[list, list, list], Iterable[str]] | None = None) -> None:
    """Raise one ValueError listing, with counts, every key of `expected` (a model's state dict; meta tensors will
    do) that `state_dict` lacks, every key it has that `expected` lacks, and every shape mismatch. `hints(missing,
    unexpected, mismatched)` may add sentences saying what the method's usual cause is."""
    if not_tensors := [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]:
        raise ValueError(f"{what}: expected a state dict of tensors; not tensors: {listing(not_tensors)}")
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [f"{key} checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
                  for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    problems = [f"{name} ({len(keys)}): {listing(keys)}" for name, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if keys]
    if problems:
        advice = list(hints(missing, unexpected, mismatched)) if hints else []
        raise ValueError(f"{what} does not fit the model: " + "; ".join(problems) + "".join(f". {a}" for a in advice))


def load_state_dict_checked(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                            expected_keys: Iterable[str] | None = None,
                            hints: Callable[[list, list, list], Iterable[str]] | None = None) -> torch.nn.Module:
    """Load a converted official state dict into `model` after `check_state_dict`, keeping its dtype.

    Without `expected_keys` the checkpoint fills the whole model, which is built for it: the model takes the
    checkpoint's floating dtype (the widest one when it mixes several, so nothing is rounded). With `expected_keys`
    (e.g. an adapter's keys on a given base model) only those keys are filled and the rest keeps its values and
    dtype; a tensor that would round on its way into a narrower parameter is then an error, not a silent cast."""
    target = model.state_dict()
    expected = target if expected_keys is None else {key: target[key] for key in expected_keys}
    check_state_dict(state_dict, expected, what, hints)
    dtypes = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
    if expected_keys is None and dtypes:
        model.to(functools.reduce(torch.promote_types, dtypes))
        target = model.state_dict()
    rounded = [f"{key} {tensor.dtype} -> {target[key].dtype}" for key, tensor in state_dict.items()
               if tensor.is_floating_point()
               and torch.promote_types(tensor.dtype, target[key].dtype) != target[key].dtype]
    if rounded:
        raise ValueError(f"{what}: loading would round {len(rounded)} tensors to a narrower dtype "
                         f"({listing(rounded)}); build the model in the checkpoint's dtype")
    model.load_state_dict(state_dict, strict=expected_keys is None)
    return model
