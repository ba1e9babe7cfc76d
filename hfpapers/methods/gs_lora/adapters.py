"""Where GS-LoRA puts its LoRA (both FFN Linear layers of every block) and how it groups the LoRA matrices.

The official code hard-codes the layer names of its two backbones; here the FFN of any transformers image
classifier is found by shape: inside each repeated block (a child of a ModuleList/Sequential of same-class
modules), the one pair of Linear layers `fc1: d -> h`, `fc2: h -> d` with h != d outside the attention.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["FFNTargets", "find_ffn_targets", "lora_groups", "block_norms", "lora_config", "stack_adapters"]

_ATTENTION_WORDS = ("attn", "attention")


class FFNTargets:
    """The Linear layers LoRA goes into, per block: `blocks[i]` lists the full module names of block i."""

    def __init__(self, blocks: list[list[str]], block_names: list[str]):
        self.blocks = blocks
        self.block_names = block_names

    @property
    def modules(self) -> list[str]:
        return [name for block in self.blocks for name in block]

    def __repr__(self) -> str:
        return f"FFNTargets({len(self.blocks)} blocks: {self.blocks})"


def _repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the innermost modules that are items of a ModuleList/Sequential of modules of one class."""
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            children = list(module.named_children())
            if len({type(child) for _, child in children}) == 1 and not isinstance(children[0][1], nn.Linear):
                candidates += [f"{name}.{child}" if name else child for child, _ in children]
    # A block that contains other blocks (a stage of a hierarchical model) is not a block itself.
    return [c for c in candidates if not any(o.startswith(c + ".") for o in candidates)]


def _ffn_pair(block: nn.Module) -> list[tuple[str, str]]:
    linears = [(name, m) for name, m in block.named_modules()
               if isinstance(m, nn.Linear) and not any(w in name.lower() for w in _ATTENTION_WORDS)]
    return [(n1, n2) for i, (n1, fc1) in enumerate(linears) for n2, fc2 in linears[i + 1:]
            if fc1.in_features == fc2.out_features and fc1.out_features == fc2.in_features
            and fc1.in_features != fc1.out_features]


def find_ffn_targets(model: nn.Module, target_modules: tuple[str, ...] | None = None) -> FFNTargets:
    """The FFN Linear layers of every block of `model`, or the Linear layers named by `target_modules`
    (full names or name suffixes, as peft matches them), grouped by the block they belong to."""
    blocks = _repeated_blocks(model)
    if target_modules is None:
        found, names = [], []
        for block in blocks:
            pairs = _ffn_pair(model.get_submodule(block))
            if len(pairs) > 1:
                raise ValueError(f"block {block!r} has several Linear pairs that look like an FFN ({pairs}); "
                                 "name the FFN layers with GSLoRAConfig(target_modules=...)")
            if pairs:
                found.append([f"{block}.{n}" for n in pairs[0]])
                names.append(block)
        if not found:
            raise ValueError(
                f"{type(model).__name__} has no FFN Linear layers to put LoRA into: GS-LoRA needs repeated blocks "
                "whose feed-forward network is a pair of nn.Linear layers (d -> h -> d); found blocks "
                f"{blocks[:4]}{'...' if len(blocks) > 4 else ''} without one. Name Linear layers with "
                "GSLoRAConfig(target_modules=...) if the model has them elsewhere")
        return FFNTargets(found, names)

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in target_modules)]
    if not chosen:
        raise ValueError(f"target_modules {list(target_modules)} match no nn.Linear layer of {type(model).__name__}")
    grouped: dict[str, list[str]] = {}
    for name in chosen:
        owner = next((b for b in blocks if name.startswith(b + ".")), None)
        if owner is None:
            raise ValueError(f"target module {name!r} is in no repeated block, so it has no group-sparsity group")
        grouped.setdefault(owner, []).append(name)
    return FFNTargets(list(grouped.values()), list(grouped))


def lora_config(targets: FFNTargets, rank: int, lora_alpha: float):
    """A peft LoraConfig on exactly `targets`; no dropout and the default (loralib) initialisation, like the
    official `lora.Linear(in, out, r)`."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=targets.modules)


def _lora_matrices(model: nn.Module, module_name: str) -> list[torch.Tensor]:
    layer = model.get_submodule(module_name)
    adapter = layer.active_adapters[0]
    return [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]


def lora_groups(model: nn.Module, targets: FFNTargets, group_type: str, prefix: str = "base_model.model.") -> list[list[torch.Tensor]]:
    """The LoRA matrices of a peft-wrapped `model` in the penalty's groups (paper §3.3 / official
    `get_structure_loss` and `engine.py`): "block" = fc1.A, fc1.B, fc2.A, fc2.B of one block;
    "lora" = A and B of one layer; "matrix" = each matrix alone."""
    per_layer = [[_lora_matrices(model, prefix + name) for name in block] for block in targets.blocks]
    if group_type == "block":
        return [[m for layer in block for m in layer] for block in per_layer]
    if group_type == "lora":
        return [layer for block in per_layer for layer in block]
    if group_type == "matrix":
        return [[m] for block in per_layer for layer in block for m in layer]
    raise ValueError(f"group_type must be block, lora or matrix; got {group_type!r}")


@torch.no_grad()
def block_norms(model: nn.Module, targets: FFNTargets, prefix: str = "base_model.model.") -> list[float]:
    """Per block, the sum of the Frobenius norms of its LoRA matrices (official `util/cal_norm.py`); the
    quantity the paper plots to show which blocks the group-sparse penalty selected."""
    return [sum(m.norm().item() for m in group) for group in lora_groups(model, targets, "block", prefix)]


# peft's AutoPeftModel builds the base model from `auto_mapping` and imports only allow-listed packages: the
# transformers Auto class loads any image classifier (a hfpapers model through its registration or remote code).
AUTO_MAPPING = {"base_model_class": "AutoModelForImageClassification", "parent_library": "transformers"}


def stack_adapters(task_folder: str | Path, earlier_folder: str | Path | None, base_model: str | None) -> None:
    """Rewrite the peft adapter in `task_folder` (one task's LoRA, trained on the model merged after the earlier
    tasks) as one adapter on the original model `base_model`, holding every task so far, so that
    `AutoPeftModel.from_pretrained(task_folder)` is the model after this task.

    Each task adds s_t B_t A_t to the merged weights (s = lora_alpha / r), so stacking the A matrices along the
    rank and the B matrices, rescaled to a common s, gives one LoRA whose update is their sum (peft's "cat"
    combination). `earlier_folder`: the previous task's folder, already stacked (None for the first task)."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    task_folder = Path(task_folder)
    own = LoraConfig.from_pretrained(task_folder)
    parts = [(own, load_file(task_folder / "adapter_model.safetensors"))]
    if earlier_folder is not None:
        parts.insert(0, (LoraConfig.from_pretrained(earlier_folder),
                         load_file(Path(earlier_folder) / "adapter_model.safetensors")))
    if any(config.use_rslora or config.rank_pattern or config.alpha_pattern for config, _ in parts):
        raise ValueError("stacking GS-LoRA adapters needs one rank and scale per adapter (no rslora or patterns)")
    keys = [set(weights) for _, weights in parts]
    if any(k != keys[0] for k in keys):
        raise ValueError(f"the adapters in {earlier_folder} and {task_folder} hold different LoRA layers")
    scale = parts[0][0].lora_alpha / parts[0][0].r
    stacked = {}
    for key in keys[0]:
        if ".lora_A." in key:  # (r, in): stacked along the rank
            stacked[key] = torch.cat([weights[key] for _, weights in parts], dim=0)
        else:  # (out, r): each task's B carries its scale relative to the common one
            stacked[key] = torch.cat([weights[key] * (c.lora_alpha / c.r / scale) for c, weights in parts], dim=1)
    own.r = sum(config.r for config, _ in parts)
    own.lora_alpha = scale * own.r
    own.base_model_name_or_path = base_model or None
    own.save_pretrained(task_folder, auto_mapping_dict=AUTO_MAPPING)
    save_file(stacked, task_folder / "adapter_model.safetensors", metadata={"format": "pt"})
