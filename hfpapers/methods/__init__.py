"""One sub-package per paper; each defines `RECORD` (a `hfpapers.registry.MethodRecord`) in its `__init__`."""
