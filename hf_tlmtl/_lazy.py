"""Package faces whose names load on first use (PEP 562), so ``import hf_tlmtl`` stays light.

``import hf_tlmtl`` registers the model, its processor and the pipeline; it should not also import what
training and sharing need (``datasets``, scikit-learn, pandas), which is most of a second of start-up for
inference. A package face built with :func:`lazy_names` imports a submodule when one of its names is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: each name of ``homes`` comes from its submodule when used.

    Example:
        >>> getattr_, dir_ = lazy_names("hf_tlmtl.hub", {"create_model_card": "cards"})
        >>> getattr_("create_model_card").__module__, dir_()
        ('hf_tlmtl.hub.cards', ['create_model_card'])
    """

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{homes[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(homes)

    return __getattr__, __dir__
