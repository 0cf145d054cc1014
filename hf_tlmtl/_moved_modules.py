"""Old import paths of modules that moved when the package got its folders (0.2): they keep working.

``import hf_tlmtl.trainer`` (or ``from hf_tlmtl.balancing import BALANCERS``) finds the module's new home
through a finder on ``sys.meta_path``, warns once with a ``FutureWarning`` naming it, and returns that very
module object: classes keep one identity, and objects pickled under the new names load.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED: dict[str, str] = {
    "hf_tlmtl.affinity": "hf_tlmtl.multitask",
    "hf_tlmtl.balancing": "hf_tlmtl.multitask.balancing",
    "hf_tlmtl.batch_norm": "hf_tlmtl.transfer.batch_norm",
    "hf_tlmtl.callbacks": "hf_tlmtl.transfer.unfreezing",
    "hf_tlmtl.cli": "hf_tlmtl.training.cli",
    "hf_tlmtl.curves": "hf_tlmtl.multitask.curves",
    "hf_tlmtl.distributed": "hf_tlmtl.training.distributed",
    "hf_tlmtl.embedded": "hf_tlmtl.data.embedded",
    "hf_tlmtl.metrics": "hf_tlmtl.multitask.metrics",
    "hf_tlmtl.optim": "hf_tlmtl.transfer.layer_decay",
    "hf_tlmtl.partial_labels": "hf_tlmtl.data.partial_labels",
    "hf_tlmtl.pipeline": "hf_tlmtl.hub.pipeline",
    "hf_tlmtl.run_folder": "hf_tlmtl.training.run_folder",
    "hf_tlmtl.source_models": "hf_tlmtl.backbone.imagenet",
    "hf_tlmtl.sources": "hf_tlmtl.data.sources",
    "hf_tlmtl.streaming": "hf_tlmtl.data.streaming",
    "hf_tlmtl.trainer": "hf_tlmtl.training",
}
"""Old module path -> where it lives now (a module split in two points to the package that re-exports both)."""


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
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there.", FutureWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module returned by :meth:`create_module` is already imported."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
