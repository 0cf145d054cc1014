"""A backbone's anatomy, read from timm: coarse layer groups (``group_matcher``), the cuts ``truncate`` can
make (``feature_info`` taps) and how much each keeps, FSDP wrap units, the native input side.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> len(backbone_groups(m)), [p.module for p in truncation_points(m)][-1]
    (5, 'layer3')
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch
from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d
from timm.models import group_parameters
from timm.models._manipulate import (
    group_with_matcher,  # group_parameters for any named tensors
)
from timm.utils.model import freeze
from torch import nn

from .create import create_backbone, truncate_backbone
from .unwrap import unwrap


@dataclass
class LayerGroup:
    """One of the backbone's coarse layer groups (timm ``group_matcher(coarse=True)``), bottom first.

    ``names`` are backbone-relative names of its weights: parameters, plus the affine weights of
    ``FrozenBatchNorm2d`` layers (buffers once frozen), so the grouping does not change when freezing.
    """

    index: int
    name: str
    names: list[str]


def _common_prefix(paths: list[list[str]]) -> list[str]:
    common = paths[0]
    for path in paths[1:]:
        n = 0
        while n < min(len(common), len(path)) and common[n] == path[n]:
            n += 1
        common = common[:n]
    return common


def _group_name(names: list[str]) -> str:
    """Readable name: the common dotted prefix per top-level module (``layer1``, ``blocks.5+norm``)."""
    by_top: dict[str, list[list[str]]] = {}
    for n in names:
        parts = n.split(".")
        by_top.setdefault(parts[0], []).append(parts[:-1] if len(parts) > 1 else parts)
    return "+".join(".".join(_common_prefix(paths)) or top for top, paths in by_top.items())


def named_weights(backbone: nn.Module) -> dict[str, torch.Tensor]:
    weights = dict(backbone.named_parameters())
    for module_name, module in backbone.named_modules():
        if isinstance(module, (FrozenBatchNorm2d, FrozenBatchNormAct2d)):
            for attr in ("weight", "bias"):
                weights[f"{module_name}.{attr}" if module_name else attr] = getattr(module, attr)
    return weights


def backbone_groups(model: nn.Module) -> list[LayerGroup]:
    """The backbone's coarse layer groups from timm's ``group_matcher``, bottom (stem) first.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> [g.name for g in backbone_groups(m)]
        ['conv1+bn1', 'layer1.0', 'layer2.0', 'layer3.0', 'layer4.0']
    """
    backbone = unwrap(model).backbone
    names = list(named_weights(backbone))
    if not hasattr(backbone, "group_matcher"):
        return [LayerGroup(0, "backbone", names)]
    grouped = group_with_matcher(((n, n) for n in names), backbone.group_matcher(coarse=True))
    return [LayerGroup(i, _group_name(group), list(group)) for i, group in enumerate(grouped.values())]


def group_shares(model: nn.Module) -> list[float]:
    """Each layer group's share of the backbone's parameters (frozen BatchNorm weights included), bottom first.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_vit", [TaskSpec(name="y", type="regression")])
        >>> [round(s, 2) for s in group_shares(m)]
        [0.18, 0.14, 0.14, 0.14, 0.14, 0.14, 0.14]
    """
    weights = named_weights(unwrap(model).backbone)
    sizes = [sum(weights[n].numel() for n in g.names) for g in backbone_groups(model)]
    total = max(sum(sizes), 1)
    return [size / total for size in sizes]


def resolve_trainable_fraction(model: nn.Module, trainable_fraction: float) -> int:
    """How many top layer groups hold the share of the backbone's parameters closest to ``trainable_fraction``.

    Layer groups (:func:`backbone_groups`) differ a lot in size between families: on EfficientNet the
    top 2 of 8 groups hold 79 % of the parameters, on a small ViT 2 of 7 hold 28 %. A fraction of the
    parameters is the family-independent unit; it is resolved to whole groups from the top, at least
    one (ties go to fewer groups).

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_vit", [TaskSpec(name="y", type="regression")])
        >>> resolve_trainable_fraction(m, 0.25), resolve_trainable_fraction(m, 1.0)
        (2, 7)
    """
    if isinstance(trainable_fraction, bool) or not isinstance(trainable_fraction, numbers.Real) or not 0.0 < trainable_fraction <= 1.0:
        raise ValueError(f"trainable_fraction must be a number in (0, 1] (share of the backbone's parameters that trains), got {trainable_fraction!r}.")
    shares = group_shares(model)
    best, best_gap = 1, math.inf
    for k in range(1, len(shares) + 1):
        gap = abs(sum(shares[len(shares) - k:]) - trainable_fraction)
        if gap < best_gap - 1e-12:
            best, best_gap = k, gap
    return best


@dataclass
class TruncationPoint:
    """A place the backbone can be cut (``truncate_stage``), and how much of it the cut keeps.

    ``kept_depth`` counts timm's fine layer groups (``group_matcher(coarse=False)``: blocks, for most
    families) kept entirely; ``kept_params`` the share of the backbone's parameters kept.
    """

    stage: int
    module: str
    kept_depth: float
    kept_params: float


def truncation_points(model: nn.Module) -> list[TruncationPoint]:
    """Every cut :func:`apply_transfer_strategy` ``"truncate"`` can make, bottom first.

    The cuts are timm's ``feature_info`` taps (``prune_intermediate_layers``), so their spacing is the
    family's: EfficientNet has taps after blocks 0, 1, 2, 4 and 6 only. Measured by pruning a copy of
    the untruncated architecture on the meta device (no memory, no weights).

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> [(p.module, round(p.kept_depth, 2)) for p in truncation_points(m)]
        [('act1', 0.2), ('layer1', 0.4), ('layer2', 0.6), ('layer3', 0.8)]
    """
    config = unwrap(model).config
    if config.truncate_stage is not None:
        raise ValueError(f"The model is already truncated at stage {config.truncate_stage}; ask the untruncated source.")

    def fresh() -> nn.Module:
        with torch.device("meta"):
            return create_backbone(config.backbone, pretrained=False, **config.timm_kwargs)

    full = fresh()
    if not hasattr(full, "prune_intermediate_layers") or not hasattr(full, "feature_info"):
        return []
    sizes = {n: p.numel() for n, p in full.named_parameters()}
    fine = list(group_with_matcher(((n, n) for n in sizes), full.group_matcher(coarse=False)).values()) if hasattr(
        full, "group_matcher"
    ) else [list(sizes)]
    points = []
    for stage in range(len(full.feature_info) - 1):
        cut = fresh()
        truncate_backbone(cut, stage)
        kept = {n for n, _ in cut.named_parameters()}
        points.append(
            TruncationPoint(
                stage=stage,
                module=full.feature_info[stage]["module"],
                kept_depth=sum(all(n in kept for n in group) for group in fine) / len(fine),
                kept_params=sum(sizes[n] for n in kept if n in sizes) / max(sum(sizes.values()), 1),
            )
        )
    return points


def resolve_keep_depth(model: nn.Module, keep_depth: float) -> int:
    """The ``truncate_stage`` whose kept depth (:func:`truncation_points`) is closest to ``keep_depth`` (ties: deeper).

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> resolve_keep_depth(m, 0.5), resolve_keep_depth(m, 0.75)
        (2, 3)
    """
    return nearest_cut(model, keep_depth).stage


def nearest_cut(model: nn.Module, keep_depth: float) -> TruncationPoint:
    if isinstance(keep_depth, bool) or not isinstance(keep_depth, numbers.Real) or not 0.0 < keep_depth < 1.0:
        raise ValueError(f"keep_depth must be a number in (0, 1) (share of the backbone's depth kept), got {keep_depth!r}.")
    points = truncation_points(model)
    if not points:
        raise ValueError(f"Backbone {unwrap(model).config.backbone!r} cannot be truncated (no prune_intermediate_layers).")
    return min(points, key=lambda p: (abs(p.kept_depth - keep_depth), -p.stage))


def freeze_groups(model: nn.Module, groups: list[LayerGroup]) -> None:
    """Freeze these backbone groups with ``timm.utils.model.freeze`` (BatchNorm -> FrozenBatchNorm2d)."""
    backbone = unwrap(model).backbone
    params = dict(backbone.named_parameters())
    names = [n for g in groups for n in g.names]
    modules = sorted({n.rpartition(".")[0] for n in names if "." in n})
    if modules:
        freeze(backbone, modules)
    for n in names:  # parameters owned by the backbone itself (ViT cls_token, pos_embed)
        if n in params:
            params[n].requires_grad_(False)


def input_resolution_fraction(model: nn.Module) -> float | None:
    """The model's input side over its backbone's native (pretrained) side, or None when timm does not say.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=40)
        >>> input_resolution_fraction(m)  # test_resnet's native input is 160 px
        0.25
    """
    native = native_input_side(model)
    current = (unwrap(model).config.data_config or {}).get("input_size")
    if not native or not current:
        return None
    return min(current[1:]) / native


def native_input_side(model: nn.Module) -> int | None:
    """The shorter side of the input the backbone was pretrained at (timm's ``pretrained_cfg``), or None.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> native_input_side(TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=40))
        160
    """
    native = (getattr(unwrap(model).backbone, "pretrained_cfg", None) or {}).get("input_size")
    return min(native[1:]) if native else None


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def block_class_names(backbone: nn.Module) -> list[str]:
    """Class names of the modules that hold one fine-grained ``group_matcher`` group each (in model order).

    A group's module is the deepest one containing all of the group's parameters; groups held by the
    whole backbone (stem and head parameters spread over top-level modules) or by a single layer
    (a lone ``Linear``) give none. A backbone without ``group_matcher`` gives ``[]`` (FSDP then shards
    the model as one unit).

    Example:
        >>> import timm
        >>> block_class_names(timm.create_model("test_vit"))
        ['Block']
    """
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        return []

    try:
        groups = group_parameters(backbone, matcher(coarse=False))
    except Exception:  # noqa: BLE001 - a model's matcher that does not fit its (pruned) layers: no blocks
        return []
    modules = dict(backbone.named_modules())
    names: list[str] = []
    for params in groups.values():
        owners = [name.rsplit(".", 1)[0].split(".") if "." in name else [] for name in params]
        prefix = os.path.commonprefix(owners) if owners else []
        # peft's LoRA layers sit between a block and its weights; the block is still the unit.
        module = modules.get(".".join(prefix)) if prefix else None
        # A plain container class (Sequential) would make every Sequential of the model a unit.
        if module is None or next(module.children(), None) is None or type(module) in _CONTAINERS:
            continue
        if type(module).__name__ not in names:
            names.append(type(module).__name__)
    return names
