"""GS-LoRA and GS-LoRA++: continual forgetting for pre-trained vision models
(Zhao et al., "Continual Forgetting for Pre-trained Vision Models", CVPR 2024, arXiv 2403.11530;
"Practical Continual Forgetting for Pre-trained Vision Models", T-PAMI, arXiv 2501.09705).

Not a model architecture but a tool on top of any transformers image classifier, so it has no registry
record: `ContinualForgetter(model, GSLoRAConfig(...)).forget(classes, forget_data, retain_data)` puts one
peft LoRA adapter on the FFN Linear layers of every block per task, trains it with the paper's losses through
the shared engine and merges it into the weights.
"""

from ...registry import lazy_exports

# No registry record (the registry skips a package whose RECORD is None); defined so that the registry's
# look-up finds it here instead of asking the lazy exports below, which would import torch.
RECORD = None

# Exports load lazily: `import hfpapers` discovers method packages and must not import torch.
__getattr__ = lazy_exports(__name__, ("config", "adapters", "losses", "metrics", "forgetter"))
