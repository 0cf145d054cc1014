"""The :class:`~hf_tlmtl.TimmMultiTaskModel` inside a peft / DDP / FSDP wrapper: public entry points unwrap once.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> unwrap(m) is m, is_peft_model(m)
    (True, False)
"""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The :class:`~hf_tlmtl.TimmMultiTaskModel` inside a peft / DDP wrapper."""
    seen = model
    # A PeftModel forwards attribute lookups to the model inside, so unwrap it before the duck-type check.
    while is_peft_model(seen) or not (hasattr(seen, "backbone") and hasattr(seen, "heads")):
        if hasattr(seen, "get_base_model"):
            inner = seen.get_base_model()
        else:
            inner = getattr(seen, "module", None)
        if inner is None or inner is seen:
            raise ValueError(f"Expected a TimmMultiTaskModel (or a peft/DDP wrapper of one), got {type(model).__name__}.")
        seen = inner
    return seen


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")
