"""Reading checkpoints from outside safely, for the methods' converters.

Pickles are only ever unpickled with `torch.load(weights_only=True)` (tensors and plain containers, no code);
`.safetensors` files are read with safetensors.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Iterable, Mapping

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
