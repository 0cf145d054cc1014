"""Old import paths of modules that moved when the package got its folders: they keep working.

``import hf_tlmtl.trainer`` (or ``from hf_tlmtl.balancing import BALANCERS``) is answered by a finder on
``sys.meta_path``: it warns once with a ``FutureWarning`` that names the new home, and gives a module whose
names are the very objects of the modules that now hold them (classes keep one identity; objects pickled
under the new names load). A module that was split points to each of its parts.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED: dict[str, tuple[str, ...]] = {
    "hf_tlmtl.affinity": ("hf_tlmtl.multitask.affinity", "hf_tlmtl.multitask.grouping"),
    "hf_tlmtl.balancing": ("hf_tlmtl.multitask.balancing", "hf_tlmtl.training.balancer_state"),
    "hf_tlmtl.batch_norm": ("hf_tlmtl.transfer.batch_norm",),
    "hf_tlmtl.callbacks": ("hf_tlmtl.transfer.unfreezing",),
    "hf_tlmtl.cli": ("hf_tlmtl.training.cli",),
    "hf_tlmtl.curves": ("hf_tlmtl.multitask.curves",),
    "hf_tlmtl.distributed": ("hf_tlmtl.training.distributed", "hf_tlmtl.backbone.anatomy"),
    "hf_tlmtl.embedded": ("hf_tlmtl.data.embedded",),
    "hf_tlmtl.metrics": ("hf_tlmtl.multitask.metrics",),
    "hf_tlmtl.optim": ("hf_tlmtl.transfer.layer_decay",),
    "hf_tlmtl.partial_labels": ("hf_tlmtl.data.partial_labels",),
    "hf_tlmtl.pipeline": ("hf_tlmtl.hub.pipeline",),
    "hf_tlmtl.run_folder": ("hf_tlmtl.training.run_folder",),
    "hf_tlmtl.source_models": ("hf_tlmtl.backbone.imagenet",),
    "hf_tlmtl.sources": ("hf_tlmtl.data.sources", "hf_tlmtl.data.task_columns"),
    "hf_tlmtl.streaming": ("hf_tlmtl.data.streaming",),
    "hf_tlmtl.trainer": ("hf_tlmtl.training.arguments", "hf_tlmtl.training.trainer", "hf_tlmtl.transfer.batch_norm"),
}
"""Old module path -> the modules that hold its names now, searched in order."""


class MovedModule(ModuleType):
    """Stands at an old path: each name is looked up in the new modules, in order."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name, f"Moved: {', '.join(homes)}.")
        self.__homes = homes

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for home in self.__homes:
            module = importlib.import_module(home)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self.__homes)}) has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({n for home in self.__homes for n in dir(importlib.import_module(home)) if not n.startswith("_")})


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves the old paths of :data:`MOVED` to the modules that replaced them.

    Example:
        >>> import hf_tlmtl, warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     from hf_tlmtl.trainer import MultiTaskTrainer
        >>> MultiTaskTrainer.__module__
        'hf_tlmtl.training.trainer'
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        homes = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved: import its names from {', '.join(homes)}.", FutureWarning, stacklevel=3)
        return MovedModule(spec.name, homes)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the names are looked up in the new modules when asked for."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
