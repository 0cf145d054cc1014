"""PEFT adapters (LoRA, LoHa, LoKr, IA3) on any timm backbone of a :class:`~hf_tlmtl.TimmMultiTaskModel`.

- :func:`apply_lora` wraps the model in a ``peft.PeftModel``: adapters on the backbone, task heads as
  ``modules_to_save`` (they train fully). ``target_modules="auto"`` picks the layers from the model
  itself (:func:`auto_target_modules`) and logs what it picked. Called on a ``PeftModel``, it adds
  another named adapter to the same frozen backbone (one per target task or task set).
- Switching is peft's own ``set_adapter``; saving is peft's ``save_pretrained``: the adapter only
  (``adapter_config.json`` + ``adapter_model.safetensors``, and peft's ``README.md`` card; adapters not
  named ``default`` go to ``DIR/<name>``). :func:`load_adapter` puts a saved adapter back on a base
  model after checking that it fits that backbone and those heads.
- :func:`merge_adapter` folds the active adapter into the weights and returns a plain
  :class:`~hf_tlmtl.TimmMultiTaskModel` (peft's ``merge_and_unload``, BatchNorm unfrozen again).
- :func:`unsharded_copy` rebuilds a peft model in one process from its gathered weights: how an
  FSDP-trained adapter is saved and merged (FSDP frees the storage peft's save and merge read).

BatchNorm layers of the backbone become ``FrozenBatchNorm2d`` (timm) when adapters are attached: the
running statistics are part of the frozen base, so training one adapter cannot change what another
adapter (or the base) computes, and a saved adapter reproduces its outputs on a fresh base.

Example:
    >>> import tempfile, torch
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.adapters import apply_lora, load_adapter, merge_adapter
    >>> tasks = [TaskSpec(name="y", type="regression")]
    >>> _ = torch.manual_seed(0); model = TimmMultiTaskModel.from_backbone("test_vit", tasks, img_size=32)
    >>> peft_model = apply_lora(model, r=4, alpha=8)
    >>> sorted(peft_model.peft_config["default"].modules_to_save)
    ['heads.y']
    >>> d = tempfile.mkdtemp(); peft_model.save_pretrained(d)
    >>> _ = torch.manual_seed(0); base = TimmMultiTaskModel.from_backbone("test_vit", tasks, img_size=32)
    >>> again = load_adapter(base, d)
    >>> plain = merge_adapter(again)
    >>> type(plain).__name__
    'TimmMultiTaskModel'
"""

from .attach import (
    ADAPTABLE_TYPES,
    ADAPTER_WEIGHTS_NAME,
    adaptable_modules,
    apply_lora,
    auto_target_modules,
    build_adapter_config,
    resolve_target_modules,
)
from .config import METHODS, AdapterConfig
from .saved import check_adapter_fits, load_adapter, merge_adapter, unsharded_copy

__all__ = [
    "ADAPTABLE_TYPES",
    "ADAPTER_WEIGHTS_NAME",
    "METHODS",
    "AdapterConfig",
    "adaptable_modules",
    "apply_lora",
    "auto_target_modules",
    "build_adapter_config",
    "check_adapter_fits",
    "load_adapter",
    "merge_adapter",
    "resolve_target_modules",
    "unsharded_copy",
]
