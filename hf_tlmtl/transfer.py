"""Transfer-learning strategies on timm's own machinery, and advice on which one to use.

Every strategy is one call on a :class:`~hf_tlmtl.TimmMultiTaskModel`:

- ``feature_extraction``: the backbone is frozen with ``timm.utils.model.freeze`` (BatchNorm becomes
  ``FrozenBatchNorm2d``, so running statistics stay put even in ``.train()``); heads train.
- ``fine_tune``: everything trains (``timm.utils.model.unfreeze`` undoes earlier freezing).
- ``partial``: the bottom layer groups are frozen (BatchNorm included), the top ``trainable_groups``
  groups train. Groups come from the backbone's ``group_matcher(coarse=True)``, so any timm family works.
- ``truncate``: the top stages are removed with timm's ``prune_intermediate_layers``; heads are rebuilt
  for the width of the stage kept and ``config.truncate_stage`` records the cut, so the model saves and
  reloads truncated. What remains trains (or only its top ``trainable_groups``).
- ``lora``: peft adapters on the backbone (``hf_tlmtl.adapters.apply_lora``), heads train.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.transfer import apply_transfer_strategy, recommend_strategy
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> summary = apply_transfer_strategy(model, "partial", trainable_groups=2)
    >>> [g.name for g in summary.groups if g.trainable]
    ['layer3.0', 'layer4.0', 'heads.y']
    >>> recommend_strategy(500, "similar").strategy, recommend_strategy(500, "similar", rules="classic").strategy
    ('truncate', 'feature_extraction')
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d
from timm.models._manipulate import group_with_matcher  # group_parameters for any named tensors
from timm.utils.model import freeze, unfreeze
from torch import nn
from transformers.utils import logging

from .batch_norm import BN_POLICIES, check_bn_policy, freeze_batch_norm, frozen_batch_norm_layers
from .modeling import TaskHead, create_backbone, truncate_backbone

logger = logging.get_logger(__name__)

STRATEGIES: tuple[str, ...] = ("feature_extraction", "fine_tune", "partial", "truncate", "lora")
"""Valid values of ``strategy`` / ``MultiTaskTrainingArguments.transfer_strategy``."""

BN_FROZEN_STRATEGIES: tuple[str, ...] = ("feature_extraction", "lora")
"""Strategies whose backbone BatchNorm is always frozen (timm's frozen BatchNorm): ``bn`` cannot change it."""

SMALL_DATASET_MAX_SAMPLES = 5_000
"""A target set with fewer training samples than this is "small" (cases 1 and 2)."""

SIMILARITY_THRESHOLD = 0.5
"""A numeric similarity at or above this is "similar" (1.0 = the source task itself)."""

LARGE_SIMILAR_TRAINABLE_GROUPS = 2
"""Case 3 fine-tunes this many top layer groups."""

SMALL_DIFFERENT_LAYER_DECAY = 0.75
"""Case 2 tunes the kept (generic) layers gently: strong layer-wise LR decay."""

LARGE_DIFFERENT_LAYER_DECAY = 0.9
"""Case 4 fine-tunes everything, lower layers a little slower."""

RULES: tuple[str, ...] = ("study", "classic")
"""``recommend_strategy(rules=)``: measured with real sources (default), or the seed article's table."""

NATIVE_RESOLUTION_FRACTION = 0.5
"""Case 1 under ``rules="study"``: at or above this fraction of the backbone's native input side, feature
extraction (measured best at 1x); below it, truncation (measured best at 0.21x, 48 of 224 px). The threshold
lies between the two measured points; it is not itself measured."""

STUDY_RULES: dict[str, dict[str, Any]] = {
    "small": {
        "layer_decay": SMALL_DIFFERENT_LAYER_DECAY,
        "bn": "recalibrate",
        "learning_rate_scale": 1.0,
        "why": "On 100 training images this was best for the similar and the different target alike, ahead of "
               "frozen BatchNorm and of full fine-tuning; re-estimating BatchNorm's statistics with the final weights "
               "fixes the eval-mode collapse that few, small batches leave.",
    },
    "large": {
        "layer_decay": SMALL_DIFFERENT_LAYER_DECAY,
        "bn": "frozen",
        "learning_rate_scale": 0.1,
        "why": "On 600 training images frozen BatchNorm at a lower backbone learning rate kept the source's "
               "normalisation and was best or within noise of the best for both targets.",
    },
}
"""The advice of ``rules="study"`` by target size; see :func:`recommend_strategy`."""


# ----------------------------------------------------------------------------------- groups
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


def _named_weights(backbone: nn.Module) -> dict[str, torch.Tensor]:
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
    backbone = base_model(model).backbone
    names = list(_named_weights(backbone))
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
    weights = _named_weights(base_model(model).backbone)
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
    config = base_model(model).config
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
    return _nearest_cut(model, keep_depth).stage


def _nearest_cut(model: nn.Module, keep_depth: float) -> TruncationPoint:
    if isinstance(keep_depth, bool) or not isinstance(keep_depth, numbers.Real) or not 0.0 < keep_depth < 1.0:
        raise ValueError(f"keep_depth must be a number in (0, 1) (share of the backbone's depth kept), got {keep_depth!r}.")
    points = truncation_points(model)
    if not points:
        raise ValueError(f"Backbone {base_model(model).config.backbone!r} cannot be truncated (no prune_intermediate_layers).")
    return min(points, key=lambda p: (abs(p.kept_depth - keep_depth), -p.stage))


def base_model(model: nn.Module) -> nn.Module:
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


# ---------------------------------------------------------------------------------- summary
@dataclass
class GroupSummary:
    """Trainable and total parameter counts of one layer group (or one head)."""

    name: str
    trainable: int
    total: int


@dataclass
class TransferSummary:
    """What trains after :func:`apply_transfer_strategy`; ``str()`` gives a table for logs.

    ``model`` is the model to train: the same object, or the ``peft.PeftModel`` for ``lora``.
    Frozen BatchNorm affine weights count as frozen parameters.
    """

    strategy: str | None
    trainable_params: int
    total_params: int
    groups: list[GroupSummary]
    truncate_stage: int | None = None
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    bn: str | None = None
    """The BatchNorm policy applied (``None``: left as it was)."""
    notes: list[str] = field(default_factory=list)
    """How fractions were resolved, what truncation dropped, what an earlier freeze became."""

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        title = f"Transfer strategy: {self.strategy or 'as is'}"
        if self.truncate_stage is not None:
            title += f" (backbone truncated after feature_info[{self.truncate_stage}])"
        if self.bn is not None:
            title += f", BatchNorm {self.bn}"
        width = max([len(g.name) for g in self.groups] + [5])
        lines = [
            title,
            f"trainable {self.trainable_params:,} / {self.total_params:,} parameters ({100 * self.trainable_fraction:.1f}%)",
            f"  {'group':<{width}}  {'trainable':>12}  {'total':>12}",
        ]
        for g in self.groups:
            mark = "train" if g.trainable == g.total and g.total else ("part" if g.trainable else "frozen")
            lines.append(f"  {g.name:<{width}}  {g.trainable:>12,}  {g.total:>12,}  {mark}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def summarize_trainable(model: nn.Module, strategy: str | None = None) -> TransferSummary:
    """Trainable / total parameters, per backbone layer group and per head.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> s = summarize_trainable(m)
        >>> s.trainable_params == s.total_params == sum(p.numel() for p in m.parameters())
        True
    """
    base = base_model(model)
    weights = _named_weights(base.backbone)
    groups = []
    for group in backbone_groups(base):
        tensors = [weights[n] for n in group.names]
        groups.append(
            GroupSummary(
                group.name,
                sum(t.numel() for t in tensors if isinstance(t, nn.Parameter) and t.requires_grad),
                sum(t.numel() for t in tensors),
            )
        )
    for name, head in base.heads.items():
        # peft keeps a frozen copy of each modules_to_save head (``original_module``) beside the trained
        # one: count the head once, as it is used.
        params = [p for n, p in head.named_parameters() if "original_module" not in n.split(".")]
        groups.append(GroupSummary(f"heads.{name}", sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)))
    owned = {id(p) for p in base.backbone.parameters()} | {id(p) for p in base.heads.parameters()}  # both head copies
    other = [p for p in model.parameters() if id(p) not in owned]
    if other:
        groups.append(GroupSummary("other", sum(p.numel() for p in other if p.requires_grad), sum(p.numel() for p in other)))
    return TransferSummary(
        strategy=strategy,
        trainable_params=sum(g.trainable for g in groups),
        total_params=sum(g.total for g in groups),
        groups=groups,
        truncate_stage=base.config.truncate_stage,
        model=model,
    )


# ------------------------------------------------------------------------------- strategies
def freeze_groups(model: nn.Module, groups: list[LayerGroup]) -> None:
    """Freeze these backbone groups with ``timm.utils.model.freeze`` (BatchNorm -> FrozenBatchNorm2d)."""
    backbone = base_model(model).backbone
    params = dict(backbone.named_parameters())
    names = [n for g in groups for n in g.names]
    modules = sorted({n.rpartition(".")[0] for n in names if "." in n})
    if modules:
        freeze(backbone, modules)
    for n in names:  # parameters owned by the backbone itself (ViT cls_token, pos_embed)
        if n in params:
            params[n].requires_grad_(False)


def _check_trainable_groups(trainable_groups: int, groups: list[LayerGroup], model: nn.Module) -> None:
    if isinstance(trainable_groups, bool) or not isinstance(trainable_groups, numbers.Integral):
        raise ValueError(f"trainable_groups must be an int, got {trainable_groups!r}.")
    if not 0 <= trainable_groups <= len(groups):
        raise ValueError(
            f"trainable_groups={trainable_groups} is out of range: backbone "
            f"{base_model(model).config.backbone!r} has {len(groups)} layer groups "
            f"({', '.join(g.name for g in groups)}); pass 0..{len(groups)}."
        )


def _unfreeze(model: nn.Module, strategy: str, keep_frozen: bool, bn: str) -> list[str]:
    """Everything trains (timm's ``unfreeze``), or with ``keep_frozen`` only what an earlier freeze left trainable.

    Returns a note when an earlier freeze is undone or kept: never silently.
    """
    base = base_model(model)
    frozen_params = [n for n, p in base.backbone.named_parameters() if not p.requires_grad]
    frozen_bn = frozen_batch_norm_layers(base)
    for head in base.heads.values():
        head.requires_grad_(True)
    if not (frozen_params or frozen_bn):
        return []
    what = f"{len(frozen_params)} frozen backbone parameter tensors and {len(frozen_bn)} frozen BatchNorm layers"
    if keep_frozen:
        return [f"keep_frozen: {what} from an earlier freeze stay frozen"]
    unfreeze(base)
    note = f"{strategy} unfroze {what} from an earlier freeze; pass keep_frozen=True to keep them"
    if frozen_bn and bn != "frozen":
        note += ", or bn='frozen' to keep BatchNorm frozen"
    logger.warning(note)
    return [note]


def _train_top_groups(
    model: nn.Module, trainable_groups: int | None, strategy: str, keep_frozen: bool, bn: str
) -> list[str]:
    """Everything trains, then (with ``trainable_groups``) the bottom groups are frozen again."""
    groups = backbone_groups(model)
    if trainable_groups is not None:
        _check_trainable_groups(trainable_groups, groups, model)
    notes = _unfreeze(model, strategy, keep_frozen, bn)
    if trainable_groups is not None and trainable_groups < len(groups):
        freeze_groups(model, groups[: len(groups) - trainable_groups])
    return notes


def _fraction_note(model: nn.Module, trainable_fraction: float, trainable_groups: int) -> str:
    groups, shares = backbone_groups(model), group_shares(model)
    top = groups[len(groups) - trainable_groups:]
    share = sum(shares[len(groups) - trainable_groups:])
    return (
        f"trainable_fraction={trainable_fraction:g} -> top {trainable_groups} of {len(groups)} layer groups "
        f"({', '.join(g.name for g in top)}): {100 * share:.1f}% of the backbone's parameters"
    )


def _rebuild_heads(base: nn.Module) -> None:
    """New heads for the backbone's current width, initialised like the model initialises them."""
    reference = next(base.backbone.parameters())
    for task in base.tasks:
        head = TaskHead(base.head_in_features, task.num_outputs, base.config.head_hidden_size, base.config.head_dropout)
        head.apply(base._init_weights)
        base.heads[task.name] = head.to(device=reference.device, dtype=reference.dtype)


def _truncate(model: nn.Module, truncate_stage: int | None, keep_depth: float | None = None) -> list[str]:
    """Cut the backbone (in place); returns notes on the cut and on what it dropped."""
    base = base_model(model)
    current = base.config.truncate_stage
    if current is not None:
        if truncate_stage not in (None, current) or keep_depth is not None:
            asked = truncate_stage if keep_depth is None else f"keep_depth={keep_depth}"
            raise ValueError(
                f"The model is already truncated at stage {current}; cannot cut again at {asked}. "
                "Truncate the untruncated source model instead."
            )
        return []
    backbone = base.backbone
    notes = []
    if keep_depth is not None:
        point = _nearest_cut(base, keep_depth)  # one pass over the cuts, each pruned on the meta device
        truncate_stage = point.stage
        notes.append(
            f"keep_depth={keep_depth:g} -> truncate_stage={truncate_stage} (after {point.module}): "
            f"{100 * point.kept_depth:.0f}% of the depth kept"
        )
    if truncate_stage is None and hasattr(backbone, "feature_info"):
        truncate_stage = len(backbone.feature_info) - 2  # default cut: drop the top stage only
    groups_before = backbone_groups(base)
    weights_before = {n: t.numel() for n, t in _named_weights(backbone).items()}
    truncate_backbone(backbone, truncate_stage if truncate_stage is not None else -1)
    base.config.truncate_stage = int(truncate_stage)
    _rebuild_heads(base)
    kept = set(_named_weights(backbone))
    dropped = [g.name for g in groups_before if g.names and not any(n in kept for n in g.names)]
    dropped_params = sum(size for n, size in weights_before.items() if n not in kept)
    share = dropped_params / max(sum(weights_before.values()), 1)
    notes.append(
        f"truncation dropped {', '.join(dropped) or 'part of the top group'}: {dropped_params:,} parameters, "
        f"{100 * share:.1f}% of the backbone"
    )
    return notes


def _apply_lora(model: nn.Module, lora_kwargs: dict[str, Any]) -> nn.Module:
    try:
        from .adapters import apply_lora
    except ImportError as e:
        raise ValueError(f"strategy 'lora' needs hf_tlmtl.adapters.apply_lora, which is not available ({e}).") from e
    return apply_lora(model, **lora_kwargs)


def apply_transfer_strategy(
    model: nn.Module,
    strategy: str,
    trainable_groups: int | None = None,
    truncate_stage: int | None = None,
    *,
    trainable_fraction: float | None = None,
    keep_depth: float | None = None,
    bn: str = "train",
    keep_frozen: bool = False,
    **lora_kwargs: Any,
) -> TransferSummary:
    """Make ``model`` train according to a transfer strategy (in place); returns what trains.

    Args:
        model: A :class:`~hf_tlmtl.TimmMultiTaskModel`.
        strategy: One of :data:`STRATEGIES`.
        trainable_groups: ``partial`` (required, or ``trainable_fraction``) and ``truncate`` (optional):
            how many top layer groups of the (remaining) backbone train; see :func:`backbone_groups`.
        truncate_stage: ``truncate``: index into the backbone's ``feature_info`` of the last stage
            kept; ``None`` drops only the top stage.
        trainable_fraction: ``partial`` / ``truncate``, instead of ``trainable_groups``: the share of the
            backbone's parameters that trains, resolved to whole top groups
            (:func:`resolve_trainable_fraction`); the summary's ``notes`` say which.
        keep_depth: ``truncate``, instead of ``truncate_stage``: the share of the backbone's depth kept,
            resolved to the nearest cut (:func:`resolve_keep_depth`, :func:`truncation_points`).
        bn: BatchNorm policy (:data:`~hf_tlmtl.batch_norm.BN_POLICIES`): ``"train"``, ``"frozen"`` (every
            BatchNorm layer of the backbone frozen, statistics and affine weights, whatever else trains) or
            ``"recalibrate"`` (trains; the Trainer re-estimates running statistics before evaluating and
            saving). ``feature_extraction`` and ``lora`` freeze BatchNorm with the backbone in any case
            (:data:`BN_FROZEN_STRATEGIES`).
        keep_frozen: ``fine_tune`` / ``partial`` / ``truncate`` unfreeze the backbone first, undoing an earlier
            freeze (a logged note says so); ``True`` keeps what was frozen before.
        **lora_kwargs: ``lora``: passed to ``hf_tlmtl.adapters.apply_lora`` (``r``, ``alpha``, ...).

    Returns:
        A :class:`TransferSummary`; for ``lora`` its ``model`` is the ``peft.PeftModel`` to train.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> s = apply_transfer_strategy(model, "feature_extraction")
        >>> [g.name for g in s.groups if g.trainable]
        ['heads.y']
        >>> s = apply_transfer_strategy(model, "truncate", truncate_stage=2, bn="frozen")
        >>> model.config.truncate_stage, model.head_in_features, model.config.bn_policy
        (2, 48, 'frozen')
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown transfer strategy {strategy!r}; valid strategies: {list(STRATEGIES)}.")
    check_bn_policy(bn)
    if lora_kwargs and strategy != "lora":
        raise ValueError(f"Keyword arguments {sorted(lora_kwargs)} only apply to strategy='lora', not {strategy!r}.")
    if (trainable_groups is not None or trainable_fraction is not None) and strategy not in ("partial", "truncate"):
        raise ValueError(f"trainable_groups / trainable_fraction apply to 'partial' and 'truncate', not {strategy!r}; leave them None.")
    if trainable_groups is not None and trainable_fraction is not None:
        raise ValueError("Pass trainable_groups or trainable_fraction, not both.")
    if (truncate_stage is not None or keep_depth is not None) and strategy != "truncate":
        raise ValueError(f"truncate_stage / keep_depth apply to strategy='truncate' only, not {strategy!r}; leave them None.")
    if truncate_stage is not None and keep_depth is not None:
        raise ValueError("Pass truncate_stage or keep_depth, not both.")
    if strategy in BN_FROZEN_STRATEGIES and bn == "recalibrate":
        raise ValueError(
            f"bn='recalibrate' has nothing to re-estimate under {strategy}: the frozen backbone's BatchNorm keeps the "
            "source's statistics. Use bn='train' (or 'frozen', the same here), or a strategy that trains the backbone."
        )
    if is_peft_model(model):
        raise ValueError(
            f"The model already carries peft adapters; {strategy!r} cannot be applied on top. Train the adapters "
            "as they are (transfer_strategy=None), or merge them first (model.merge_and_unload())."
        )
    base = base_model(model)
    notes: list[str] = []
    if strategy == "feature_extraction":
        freeze(base.backbone)
        backbone_ids = {id(p) for p in base.backbone.parameters()}
        for p in base.parameters():
            if id(p) not in backbone_ids:
                p.requires_grad_(True)
    elif strategy == "fine_tune":
        notes += _unfreeze(base, strategy, keep_frozen, bn)
    elif strategy == "partial":
        if trainable_groups is None and trainable_fraction is None:
            groups = backbone_groups(base)
            raise ValueError(
                f"strategy='partial' needs trainable_groups: how many of the {len(groups)} top layer groups "
                f"({', '.join(g.name for g in groups)}) train; or trainable_fraction, the share of parameters."
            )
        if trainable_fraction is not None:
            trainable_groups = resolve_trainable_fraction(base, trainable_fraction)
            notes.append(_fraction_note(base, trainable_fraction, trainable_groups))
        notes += _train_top_groups(base, trainable_groups, strategy, keep_frozen, bn)
    elif strategy == "truncate":
        notes += _truncate(base, truncate_stage, keep_depth)
        if trainable_fraction is not None:
            trainable_groups = resolve_trainable_fraction(base, trainable_fraction)
            notes.append(_fraction_note(base, trainable_fraction, trainable_groups))
        notes += _train_top_groups(base, trainable_groups, strategy, keep_frozen, bn)
    if bn == "frozen" and strategy not in BN_FROZEN_STRATEGIES:
        frozen = freeze_batch_norm(base)
        if frozen:
            notes.append(f"bn='frozen': {frozen} BatchNorm layers frozen (running statistics and affine weights)")
    if strategy == "lora":  # after the BatchNorm policy: adapters wrap the (frozen-BN) backbone
        model = _apply_lora(model, lora_kwargs)
    base.config.bn_policy = "frozen" if strategy in BN_FROZEN_STRATEGIES else bn
    summary = summarize_trainable(model, strategy)
    summary.bn, summary.notes = base.config.bn_policy, notes
    return summary


# --------------------------------------------------------------------------------- advice
@dataclass
class Recommendation:
    """Advice from :func:`recommend_strategy`; :meth:`training_kwargs` feeds ``MultiTaskTrainingArguments``.

    ``truncate_stage=None`` with ``strategy='truncate'`` means the default cut of
    :func:`apply_transfer_strategy`: drop only the top stage.
    """

    strategy: str
    trainable_groups: int | None
    truncate_stage: int | None
    case: int
    reason: str
    layer_decay: float | None = None
    measurement: Any = field(default=None, repr=False)
    """The :class:`~hf_tlmtl.transferability.SimilarityMeasurement` behind ``similarity="measured"``."""
    bn: str = "train"
    """The BatchNorm policy (:data:`~hf_tlmtl.batch_norm.BN_POLICIES`)."""
    learning_rate_scale: float = 1.0
    """The backbone's learning rate relative to the heads' (``learning_rate``); below 1 the backbone trains slower."""

    def training_kwargs(self, learning_rate: float | None = None) -> dict[str, Any]:
        """Keyword arguments for ``MultiTaskTrainingArguments`` that follow this advice.

        With ``learning_rate`` (the rate the heads should get), a ``learning_rate_scale`` below 1 becomes
        ``learning_rate * learning_rate_scale`` for the backbone and ``head_lr_scale = 1 / learning_rate_scale``.
        """
        kwargs = {
            "transfer_strategy": self.strategy,
            "trainable_groups": self.trainable_groups,
            "truncate_stage": self.truncate_stage,
            "layer_decay": self.layer_decay,
            "bn": self.bn,
        }
        if learning_rate is not None and self.learning_rate_scale != 1.0:
            kwargs["learning_rate"] = learning_rate * self.learning_rate_scale
            kwargs["head_lr_scale"] = 1.0 / self.learning_rate_scale
        return kwargs


def _similarity_is_high(similarity: str | float, threshold: float) -> bool:
    if isinstance(similarity, str):
        if similarity.lower() not in ("similar", "different"):
            raise ValueError(f"similarity must be 'similar', 'different', 'measured' or a number in [0, 1]; got {similarity!r}.")
        return similarity.lower() == "similar"
    if isinstance(similarity, bool) or not isinstance(similarity, numbers.Real) or math.isnan(similarity):
        raise ValueError(f"similarity must be 'similar', 'different', 'measured' or a number in [0, 1]; got {similarity!r}.")
    if not 0.0 <= float(similarity) <= 1.0:
        raise ValueError(f"similarity must be in [0, 1] (1 = the source task itself), got {similarity}.")
    return float(similarity) >= threshold


def _default_truncate_stage(model: nn.Module | None) -> int | None:
    """The cut that drops only the top stage (``None`` without a model: decided when applied)."""
    return None if model is None else len(base_model(model).backbone.feature_info) - 2


def recommend_strategy(
    num_train_samples: int,
    similarity: str | float | Any,
    *,
    small_dataset_max_samples: int = SMALL_DATASET_MAX_SAMPLES,
    similarity_threshold: float = SIMILARITY_THRESHOLD,
    top_groups: int = LARGE_SIMILAR_TRAINABLE_GROUPS,
    model: nn.Module | None = None,
    dataset: Any = None,
    tasks: Any = None,
    method: str = "logme",
    cache_dir: str | None = None,
    image_column: str = "image",
    rules: str = "study",
) -> Recommendation:
    """Advice for the four classic transfer-learning cases, from measurements (or from the classic table).

    ``num_train_samples < small_dataset_max_samples`` is a *small* target set; ``similarity`` is
    ``"similar"`` / ``"different"`` or a number in [0, 1] (1 = the source task itself), *similar*
    when ``>= similarity_threshold``; ``"measured"`` measures it (below). Size and similarity give the
    case (Yosinski et al. 2014; CS231n "Transfer Learning"); ``rules`` the advice for it.

    ``rules="study"`` (default): what ``benchmarks/bn_policies.py`` and ``recipes/transfer_study.py`` measured
    with real sources (ImageNet EfficientNet-Lite0; a digits-trained ResNet), :data:`STUDY_RULES`:

    ====  ===============  ===============================================================
    case  data, similarity  advice
    ====  ===============  ===============================================================
    1     small, similar    with ``model`` at >= :data:`NATIVE_RESOLUTION_FRACTION` of its backbone's
                            native input side: ``feature_extraction``; otherwise as case 2
    1, 2  small             ``truncate`` (drop the top stage), the rest fine-tuned with layer decay
                            :data:`SMALL_DIFFERENT_LAYER_DECAY`, ``bn="recalibrate"``
    3, 4  large             ``truncate``, layer decay :data:`SMALL_DIFFERENT_LAYER_DECAY`,
                            ``bn="frozen"``, backbone at a tenth of the heads' learning rate
                            (``learning_rate_scale=0.1``)
    ====  ===============  ===============================================================

    At 48 px similarity did not change that advice: it was best or within noise of the best for the similar
    and the different target alike, and the classic table's feature extraction (case 1), top-groups
    fine-tuning (case 3) and full fine-tuning (case 4) lost to it. At the native 224 px (one seed, small
    targets), feature extraction won on the similar target and truncation on the different one.

    ``rules="classic"``: the seed article's table, as it is: case 1 ``feature_extraction``; case 2
    ``truncate`` with strong layer decay; case 3 ``partial`` (top ``top_groups`` groups); case 4
    ``fine_tune`` with mild layer decay (:data:`LARGE_DIFFERENT_LAYER_DECAY`); BatchNorm trains.

    With ``model``, ``truncate`` gets its concrete ``truncate_stage`` (drop the top stage) and
    ``partial`` its ``trainable_groups`` capped at the model's number of layer groups.

    ``similarity="measured"`` (with ``model`` = the source and ``dataset`` = the target data, its
    ``train`` split; ``tasks``, ``method``, ``cache_dir``, ``image_column`` as in
    :func:`~hf_tlmtl.transferability.measure_similarity`): the source's frozen features are scored (LogME)
    against the target labels and against random features of the same network; the gain becomes the
    similarity through the logistic calibrated on the study
    (:data:`~hf_tlmtl.transferability.MEASURED_GAIN_THRESHOLD`). Under the classic rules, a source whose
    top stage scores lower than the stage below (``top_stage_hurts``) is advised ``truncate`` whatever the case.
    ``reason`` names the scores and the case they led to; ``measurement`` keeps them. A
    :class:`~hf_tlmtl.transferability.SimilarityMeasurement` measured earlier can be passed as ``similarity`` too.

    Example:
        >>> rec = recommend_strategy(100, "similar")
        >>> rec.case, rec.strategy, rec.bn, rec.learning_rate_scale
        (1, 'truncate', 'recalibrate', 1.0)
        >>> rec = recommend_strategy(100_000, 0.2)
        >>> rec.case, rec.strategy, rec.bn, rec.training_kwargs(learning_rate=0.01)["learning_rate"]
        (4, 'truncate', 'frozen', 0.001)
        >>> recommend_strategy(100, "similar", rules="classic").strategy
        'feature_extraction'
        >>> recommend_strategy(4_999, "different", rules="classic").strategy, recommend_strategy(5_000, "different", rules="classic").strategy
        ('truncate', 'fine_tune')
    """
    if isinstance(num_train_samples, bool) or not isinstance(num_train_samples, numbers.Integral):
        raise ValueError(f"num_train_samples must be an int, got {num_train_samples!r}.")
    if num_train_samples < 1:
        raise ValueError(f"num_train_samples must be >= 1 (the size of the target training set), got {num_train_samples}.")
    if not 0.0 <= similarity_threshold <= 1.0:
        raise ValueError(f"similarity_threshold must be in [0, 1], got {similarity_threshold}.")
    if small_dataset_max_samples < 1 or top_groups < 1:
        raise ValueError("small_dataset_max_samples and top_groups must be >= 1.")
    if rules not in RULES:
        raise ValueError(f"rules must be one of {list(RULES)}, got {rules!r}.")
    measurement = similarity if hasattr(similarity, "top_stage_hurts") else None  # a SimilarityMeasurement
    if isinstance(similarity, str) and similarity.lower() == "measured":
        measurement = _measure(model, dataset, tasks, method, cache_dir, image_column)
    if measurement is not None:
        similarity = round(measurement.similarity, 3)
    similar = _similarity_is_high(similarity, similarity_threshold)
    small = num_train_samples < small_dataset_max_samples
    size = f"{num_train_samples:,} samples ({'<' if small else '>='} {small_dataset_max_samples:,}: {'small' if small else 'large'})"
    sim = f"similarity {similarity!r} ({'similar' if similar else 'different'})"
    if measurement is not None:
        sim += f" from {measurement.describe()}"
    if rules == "study":
        rec = _study_case(small, similar, size, sim, model)
    elif measurement is not None and measurement.top_stage_hurts:
        rec = _top_stage_too_specific(small, similar, size, sim, model)
    else:
        rec = _recommend_case(small, similar, size, sim, top_groups, model)
    rec.measurement = measurement
    return rec


def _case_number(small: bool, similar: bool) -> int:
    return (1 if similar else 2) if small else (3 if similar else 4)


def _case_label(small: bool, similar: bool) -> str:
    return f"{'small' if small else 'large'} & {'similar' if similar else 'different'}"


def input_resolution_fraction(model: nn.Module) -> float | None:
    """The model's input side over its backbone's native (pretrained) side, or None when timm does not say.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")], image_size=40)
        >>> input_resolution_fraction(m)  # test_resnet's native input is 160 px
        0.25
    """
    native = native_input_side(model)
    current = (base_model(model).config.data_config or {}).get("input_size")
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
    native = (getattr(base_model(model).backbone, "pretrained_cfg", None) or {}).get("input_size")
    return min(native[1:]) if native else None


def _study_case(small: bool, similar: bool, size: str, sim: str, model: nn.Module | None) -> Recommendation:
    case = _case_number(small, similar)
    fraction = None if model is None else input_resolution_fraction(model)
    if case == 1 and fraction is not None and fraction >= NATIVE_RESOLUTION_FRACTION:
        return Recommendation(
            "feature_extraction", None, None, case,
            f"Case 1, small & similar: {size}, {sim}, input at {fraction:.2g}x the backbone's native resolution. "
            "Measured at the native 224 px (benchmarks/bn_policies/native_224): the frozen source features beat "
            "truncation and fine-tuning on a small similar target, as the classic table says; freeze the backbone "
            "and train the heads.",
            bn="frozen",
        )
    advice = STUDY_RULES["small" if small else "large"]
    lr = "" if advice["learning_rate_scale"] == 1.0 else f", the backbone at {advice['learning_rate_scale']:g}x the heads' learning rate"
    return Recommendation(
        "truncate", None, _default_truncate_stage(model), case,
        f"Case {case}, {_case_label(small, similar)}: {size}, {sim}. Measured with real sources (benchmarks/bn_policies, "
        f"recipes/transfer_study): drop the top stage, fine-tune the rest with layer decay {advice['layer_decay']}, "
        f"BatchNorm {advice['bn']}{lr}. {advice['why']}",
        layer_decay=advice["layer_decay"], bn=advice["bn"], learning_rate_scale=advice["learning_rate_scale"],
    )


def _top_stage_too_specific(small: bool, similar: bool, size: str, sim: str, model: nn.Module | None) -> Recommendation:
    case = _case_number(small, similar)
    label = _case_label(small, similar)
    return Recommendation(
        "truncate", None, _default_truncate_stage(model), case,
        f"Case {case}, {label}, top stage too specific: {size}, {sim}. The source without its top stage scores "
        "higher on the target than the whole source: its top stage is specific to the source task. Drop it, feed "
        f"the heads from the stage below and tune what remains with layer-wise LR decay ({SMALL_DIFFERENT_LAYER_DECAY}).",
        layer_decay=SMALL_DIFFERENT_LAYER_DECAY,
    )


def _measure(model: Any, dataset: Any, tasks: Any, method: str, cache_dir: str | None, image_column: str) -> Any:
    if model is None or dataset is None:
        raise ValueError(
            "similarity='measured' needs model= (the source, a TimmMultiTaskModel) and dataset= (the target data) "
            "to score the source's features on the target; or pass 'similar' / 'different' / a number in [0, 1]."
        )
    from .transferability import measure_similarity

    return measure_similarity(model, dataset, tasks=tasks, method=method, cache_dir=cache_dir, image_column=image_column)


def _recommend_case(
    small: bool, similar: bool, size: str, sim: str, top_groups: int, model: nn.Module | None
) -> Recommendation:
    if small and similar:
        return Recommendation(
            "feature_extraction", None, None, 1,
            f"Case 1, small & similar: {size}, {sim}. The source features already fit the target; freeze the "
            "backbone and train only the heads, which cannot over-fit the few samples.",
        )
    if small:
        return Recommendation(
            "truncate", None, _default_truncate_stage(model), 2,
            f"Case 2, small & different: {size}, {sim}. Early layers are generic, the top stage is specific to "
            "the source task: drop the top stage, feed the heads from the one below, and tune what remains with "
            f"strong layer-wise LR decay ({SMALL_DIFFERENT_LAYER_DECAY}).",
            layer_decay=SMALL_DIFFERENT_LAYER_DECAY,
        )
    if similar:
        groups = top_groups if model is None else min(top_groups, len(backbone_groups(model)))
        return Recommendation(
            "partial", groups, None, 3,
            f"Case 3, large & similar: {size}, {sim}. Initialise from the source and fine-tune the top {groups} "
            "layer groups; enough data to adapt them without over-fitting, the generic bottom stays frozen.",
        )
    return Recommendation(
        "fine_tune", None, None, 4,
        f"Case 4, large & different: {size}, {sim}. Enough data to fine-tune the whole network; the source "
        f"weights are a good start, lower layers move slower (layer_decay={LARGE_DIFFERENT_LAYER_DECAY}).",
        layer_decay=LARGE_DIFFERENT_LAYER_DECAY,
    )
