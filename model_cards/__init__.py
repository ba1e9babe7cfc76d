"""Card templates and per-method prose, installed as `hfpapers.model_cards` (read with `importlib.resources`)."""
