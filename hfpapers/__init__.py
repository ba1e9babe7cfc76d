"""hfpapers: methods of recent machine-learning papers as native Hugging Face models.

Importing the package registers every method with the transformers Auto classes and pipelines. The
registration itself waits until transformers' Auto machinery is imported, so `import hfpapers` stays cheap.
"""

from .registry import (
    MethodRecord,
    create_model,
    get_method,
    list_methods,
    register_record,
    register_with_transformers,
)
from .registry import _install_registration_hook

__version__ = "0.1.0"
__all__ = [
    "MethodRecord", "create_model", "get_method", "list_methods", "register_record", "register_with_transformers",
]

_install_registration_hook()
