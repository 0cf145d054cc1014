"""What BatchNorm does while a pretrained backbone is fine-tuned: ``bn="train" | "frozen" | "recalibrate"``.

A pretrained CNN fine-tuned on a small target with BatchNorm in training mode keeps running statistics
that the last few batches dragged around: the training loss falls while eval-mode accuracy collapses.
The policies:

- ``"train"``: BatchNorm trains as in any PyTorch model (batch statistics in ``.train()``, running
  statistics updated with momentum, affine weights trained where their layer group trains).
- ``"frozen"``: every BatchNorm layer of the backbone becomes timm's ``FrozenBatchNorm2d`` /
  ``FrozenBatchNormAct2d`` (``timm.layers.freeze_batch_norm_2d``): the source's running statistics
  *and* affine weights stay as they are, also in ``.train()``; convolutions still train.
- ``"recalibrate"``: BatchNorm trains as with ``"train"``, and before every evaluation and save the
  running statistics are re-estimated on the training data with the final weights
  (:func:`recalibrate_batch_norm`, PyTorch's ``torch.optim.swa_utils.update_bn``).

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.transfer.batch_norm import batch_norm_layers, freeze_batch_norm
    >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> len(batch_norm_layers(m)), freeze_batch_norm(m), len(batch_norm_layers(m))
    (15, 15, 0)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from timm.layers import freeze_batch_norm_2d
from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.modules.batchnorm import _BatchNorm

from ..backbone.unwrap import unwrap

BN_POLICIES: tuple[str, ...] = ("train", "frozen", "recalibrate")
"""Valid values of ``bn`` (:func:`hf_tlmtl.transfer.apply_transfer_strategy`, ``MultiTaskTrainingArguments.bn``)."""

FROZEN_BATCH_NORM = (FrozenBatchNorm2d, FrozenBatchNormAct2d)


def check_bn_policy(bn: str) -> str:
    """``bn`` itself, or a ``ValueError`` naming the valid policies.

    Example:
        >>> check_bn_policy("frozen")
        'frozen'
        >>> check_bn_policy("off")
        Traceback (most recent call last):
        ...
        ValueError: Unknown BatchNorm policy bn='off'; valid policies: ['train', 'frozen', 'recalibrate'].
    """
    if bn not in BN_POLICIES:
        raise ValueError(f"Unknown BatchNorm policy bn={bn!r}; valid policies: {list(BN_POLICIES)}.")
    return bn


def _backbone(model: nn.Module) -> nn.Module:
    return unwrap(model).backbone


def batch_norm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The backbone's BatchNorm layers that still train (not frozen), by backbone-relative name.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> sorted(batch_norm_layers(m))[:2]
        ['bn1', 'conv1.1']
    """
    return {name: m for name, m in _backbone(model).named_modules() if isinstance(m, _BatchNorm)}


def frozen_batch_norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The backbone's frozen BatchNorm layers (``FrozenBatchNorm2d`` / ``FrozenBatchNormAct2d``), by name.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> len(frozen_batch_norm_layers(m)), freeze_batch_norm(m), sorted(frozen_batch_norm_layers(m))[0]
        (0, 15, 'bn1')
    """
    return {name: m for name, m in _backbone(model).named_modules() if isinstance(m, FROZEN_BATCH_NORM)}


def freeze_batch_norm(model: nn.Module) -> int:
    """Turn every BatchNorm layer of the backbone into its frozen timm twin (in place); returns how many.

    ``timm.layers.freeze_batch_norm_2d`` replaces ``BatchNorm2d`` / ``BatchNormAct2d`` by
    ``FrozenBatchNorm2d`` / ``FrozenBatchNormAct2d``: running statistics and affine weights become
    buffers, fixed in ``.train()`` too. Other BatchNorm kinds (1d, 3d) are left out by timm.
    """
    backbone = _backbone(model)
    before = len(frozen_batch_norm_layers(model))
    converted = freeze_batch_norm_2d(backbone)
    if converted is not backbone:  # the backbone itself is a BatchNorm: cannot be replaced in place
        raise ValueError(f"The backbone {type(backbone).__name__} is itself a BatchNorm layer; nothing to freeze inside it.")
    return len(frozen_batch_norm_layers(model)) - before


def batch_norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm tensor of the backbone (running statistics and affine weights, frozen or not).

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> sorted(batch_norm_state(m))[:2]
        ['bn1.bias', 'bn1.num_batches_tracked']
    """
    state = {}
    for name, module in _backbone(model).named_modules():
        if isinstance(module, (_BatchNorm, *FROZEN_BATCH_NORM)):
            for key, tensor in module.state_dict().items():
                state[f"{name}.{key}" if name else key] = tensor.detach().clone()
    return state


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Any], autocast: Any = None) -> int:
    """Re-estimate the backbone's BatchNorm running statistics on ``batches`` (one pass); returns the images seen.

    Statistics are reset and then averaged over the batches with equal weight per batch
    (``momentum=None``), the backbone in training mode so that each layer normalises with the
    batch's statistics, as in training: ``torch.optim.swa_utils.update_bn``, applied to the
    backbone alone. ``running_mean`` is then the exact mean over the images when the batches have
    equal sizes; ``running_var`` the mean of the batches' (unbiased) variances. Frozen BatchNorm
    layers stay as they are. Every module's ``training`` flag is restored afterwards.

    Args:
        model: A :class:`~hf_tlmtl.TimmMultiTaskModel` (or a peft / DDP wrapper of one).
        batches: Batches as the collator makes them (dicts with ``pixel_values``) or image tensors.
        autocast: Optional context manager factory (mixed precision) to run the forward passes in.

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=32)
        >>> x = torch.randn(8, 3, 32, 32)
        >>> recalibrate_batch_norm(m, [x])
        8
        >>> mean = m.backbone.conv1(x).mean(dim=(0, 2, 3))
        >>> torch.allclose(m.backbone.bn1.running_mean, mean, atol=1e-6)
        True
    """
    backbone = _backbone(model)
    if not any(isinstance(m, _BatchNorm) for m in backbone.modules()):
        return 0
    device = next(backbone.parameters()).device
    # Under FSDP2 the stem's parameters belong to the root unit and stay sharded unless the root's own
    # forward gathers them: run the whole model there (its heads add a little compute, no BatchNorm).
    forward = model if isinstance(model, FSDPModule) else backbone
    modes = {module: module.training for module in backbone.modules()}
    seen = 0

    def pixels() -> Iterable[torch.Tensor]:
        nonlocal seen
        for batch in batches:
            x = batch["pixel_values"] if isinstance(batch, dict) else batch
            seen += x.shape[0]
            yield x.to(device)

    try:
        with autocast() if autocast is not None else contextlib.nullcontext():
            torch.optim.swa_utils.update_bn(pixels(), forward)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return seen


__all__ = [
    "BN_POLICIES",
    "batch_norm_layers",
    "batch_norm_state",
    "check_bn_policy",
    "freeze_batch_norm",
    "frozen_batch_norm_layers",
    "recalibrate_batch_norm",
]


def batch_norm_min_values(model: torch.nn.Module) -> tuple[int, str] | None:
    """``(values, layer)``: the fewest values per channel and image that a BatchNorm layer of the backbone
    normalises at the model's input size (``H x W`` of its input), and that layer's name; None without
    BatchNorm. A batch of ``b`` images trains that layer only if ``b * values > 1``.

    Found with one forward of a blank image in eval mode (no statistics or random state change).

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=32)
        >>> batch_norm_min_values(m)
        (1, 'backbone.layer4.0.bn1')
    """
    base = unwrap(model)
    layers = [(name, m) for name, m in base.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    parameter = next(base.parameters(), None)
    if not layers or parameter is None or parameter.device.type == "meta":
        return None
    seen: dict[str, int] = {}

    def record(name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            seen.setdefault(name, math.prod(inputs[0].shape[2:]))

        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in layers]
    modes = {module: module.training for module in base.modules()}
    base.eval()
    try:
        with torch.no_grad():
            shape = base.config.data_config["input_size"]
            base.forward_features(torch.zeros(1, *shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
    if not seen:
        return None
    name, values = min(seen.items(), key=lambda item: item[1])  # the first such layer in forward order
    return values, name
