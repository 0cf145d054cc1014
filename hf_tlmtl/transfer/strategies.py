"""Transfer-learning strategies on timm's own machinery.

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
    >>> from hf_tlmtl.transfer import apply_transfer_strategy
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> summary = apply_transfer_strategy(model, "partial", trainable_groups=2)
    >>> [g.name for g in summary.groups if g.trainable]
    ['layer3.0', 'layer4.0', 'heads.y']
"""

from __future__ import annotations

import numbers
from typing import Any

from timm.utils.model import freeze, unfreeze
from torch import nn
from transformers.utils import logging

from ..adapters.attach import apply_lora
from ..backbone.anatomy import (
    LayerGroup,
    backbone_groups,
    freeze_groups,
    group_shares,
    named_weights,
    nearest_cut,
    resolve_trainable_fraction,
)
from ..backbone.unwrap import is_peft_model, unwrap
from .batch_norm import check_bn_policy, freeze_batch_norm, frozen_batch_norm_layers
from .summary import TransferSummary, summarize_trainable

logger = logging.get_logger(__name__)

STRATEGIES: tuple[str, ...] = ("feature_extraction", "fine_tune", "partial", "truncate", "lora")
"""Valid values of ``strategy`` / ``MultiTaskTrainingArguments.transfer_strategy``."""

BN_FROZEN_STRATEGIES: tuple[str, ...] = ("feature_extraction", "lora")
"""Strategies whose backbone BatchNorm is always frozen (timm's frozen BatchNorm): ``bn`` cannot change it."""



# ----------------------------------------------------------------------------------- groups




# ---------------------------------------------------------------------------------- summary


# ------------------------------------------------------------------------------- strategies


def _check_trainable_groups(trainable_groups: int, groups: list[LayerGroup], model: nn.Module) -> None:
    if isinstance(trainable_groups, bool) or not isinstance(trainable_groups, numbers.Integral):
        raise ValueError(f"trainable_groups must be an int, got {trainable_groups!r}.")
    if not 0 <= trainable_groups <= len(groups):
        raise ValueError(
            f"trainable_groups={trainable_groups} is out of range: backbone "
            f"{unwrap(model).config.backbone!r} has {len(groups)} layer groups "
            f"({', '.join(g.name for g in groups)}); pass 0..{len(groups)}."
        )


def _unfreeze(model: nn.Module, strategy: str, keep_frozen: bool, bn: str) -> list[str]:
    """Everything trains (timm's ``unfreeze``), or with ``keep_frozen`` only what an earlier freeze left trainable.

    Returns a note when an earlier freeze is undone or kept: never silently.
    """
    base = unwrap(model)
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


def _truncate(model: nn.Module, truncate_stage: int | None, keep_depth: float | None = None) -> list[str]:
    """Cut the backbone (in place); returns notes on the cut and on what it dropped."""
    base = unwrap(model)
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
        point = nearest_cut(base, keep_depth)  # one pass over the cuts, each pruned on the meta device
        truncate_stage = point.stage
        notes.append(
            f"keep_depth={keep_depth:g} -> truncate_stage={truncate_stage} (after {point.module}): "
            f"{100 * point.kept_depth:.0f}% of the depth kept"
        )
    if truncate_stage is None and hasattr(backbone, "feature_info"):
        truncate_stage = len(backbone.feature_info) - 2  # default cut: drop the top stage only
    groups_before = backbone_groups(base)
    weights_before = {n: t.numel() for n, t in named_weights(backbone).items()}
    base.truncate(truncate_stage if truncate_stage is not None else -1)
    kept = set(named_weights(backbone))
    dropped = [g.name for g in groups_before if g.names and not any(n in kept for n in g.names)]
    dropped_params = sum(size for n, size in weights_before.items() if n not in kept)
    share = dropped_params / max(sum(weights_before.values()), 1)
    notes.append(
        f"truncation dropped {', '.join(dropped) or 'part of the top group'}: {dropped_params:,} parameters, "
        f"{100 * share:.1f}% of the backbone"
    )
    return notes


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
        bn: BatchNorm policy (:data:`~hf_tlmtl.transfer.batch_norm.BN_POLICIES`): ``"train"``, ``"frozen"`` (every
            BatchNorm layer of the backbone frozen, statistics and affine weights, whatever else trains) or
            ``"recalibrate"`` (trains; the Trainer re-estimates running statistics before evaluating and
            saving). ``feature_extraction`` and ``lora`` freeze BatchNorm with the backbone in any case
            (:data:`BN_FROZEN_STRATEGIES`).
        keep_frozen: ``fine_tune`` / ``partial`` / ``truncate`` unfreeze the backbone first, undoing an earlier
            freeze (a logged note says so); ``True`` keeps what was frozen before.
        **lora_kwargs: ``lora``: passed to ``hf_tlmtl.adapters.apply_lora`` (``r``, ``alpha``, ..., or
            ``config=AdapterConfig(...)``).

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
    base = unwrap(model)
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
        model = apply_lora(model, **lora_kwargs)
    base.config.bn_policy = "frozen" if strategy in BN_FROZEN_STRATEGIES else bn
    summary = summarize_trainable(model, strategy)
    summary.bn, summary.notes = base.config.bn_policy, notes
    return summary


# --------------------------------------------------------------------------------- advice
