"""Transfer learning: reuse a trained backbone for new tasks, and advice on how.

- :mod:`~hf_tlmtl.transfer.preparation`: :func:`prepare_model` with a :class:`TransferConfig`, the one entry
  point that makes a model ready to train (strategy, adapters, BatchNorm policy, feature-cache decision);
  idempotent, and usable as a ``Trainer`` ``model_init``.
- :mod:`~hf_tlmtl.transfer.strategies`: :func:`apply_transfer_strategy` (feature extraction, fine-tuning,
  partial, truncation, LoRA), :mod:`~hf_tlmtl.transfer.summary` (what trains),
  :mod:`~hf_tlmtl.transfer.batch_norm` (BatchNorm policies).
- :mod:`~hf_tlmtl.transfer.layer_decay` (layer-wise learning rates), :mod:`~hf_tlmtl.transfer.unfreezing`
  (ULMFiT-style gradual unfreezing).
- :mod:`~hf_tlmtl.transfer.advice`: :func:`recommend_strategy`, the four classic cases, measured.

The backbone anatomy the strategies read (layer groups, truncation points) is :mod:`hf_tlmtl.backbone`;
its names stay importable from here.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.transfer import TransferConfig, prepare_model
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> model = prepare_model(model, TransferConfig(strategy="partial", trainable_groups=2))
    >>> [g.name for g in model.transfer_summary.groups if g.trainable]
    ['layer3.0', 'layer4.0', 'heads.y']
"""

from ..backbone import (
    LayerGroup,
    TruncationPoint,
    backbone_groups,
    freeze_groups,
    group_shares,
    input_resolution_fraction,
    is_peft_model,
    native_input_side,
    resolve_keep_depth,
    resolve_trainable_fraction,
    truncation_points,
    unwrap,
)
from .advice import (
    LARGE_DIFFERENT_LAYER_DECAY,
    LARGE_SIMILAR_TRAINABLE_GROUPS,
    NATIVE_RESOLUTION_FRACTION,
    RULES,
    SIMILARITY_THRESHOLD,
    SMALL_DATASET_MAX_SAMPLES,
    SMALL_DIFFERENT_LAYER_DECAY,
    STUDY_RULES,
    Recommendation,
    parse_similarity,
    recommend_strategy,
)
from .batch_norm import (
    BN_POLICIES,
    check_bn_policy,
    freeze_batch_norm,
    recalibrate_batch_norm,
)
from .layer_decay import layer_decay_param_groups
from .preparation import TransferConfig, prepare_model
from .strategies import BN_FROZEN_STRATEGIES, STRATEGIES, apply_transfer_strategy
from .summary import GroupSummary, TransferSummary, summarize_trainable
from .unfreezing import GradualUnfreezeCallback

base_model = unwrap
"""The name this function had before it moved to :func:`hf_tlmtl.backbone.unwrap`."""

__all__ = [
    "BN_FROZEN_STRATEGIES",
    "BN_POLICIES",
    "LARGE_DIFFERENT_LAYER_DECAY",
    "LARGE_SIMILAR_TRAINABLE_GROUPS",
    "NATIVE_RESOLUTION_FRACTION",
    "RULES",
    "SIMILARITY_THRESHOLD",
    "SMALL_DATASET_MAX_SAMPLES",
    "SMALL_DIFFERENT_LAYER_DECAY",
    "STRATEGIES",
    "STUDY_RULES",
    "GradualUnfreezeCallback",
    "GroupSummary",
    "LayerGroup",
    "Recommendation",
    "TransferConfig",
    "TransferSummary",
    "TruncationPoint",
    "apply_transfer_strategy",
    "backbone_groups",
    "base_model",
    "check_bn_policy",
    "freeze_batch_norm",
    "freeze_groups",
    "group_shares",
    "input_resolution_fraction",
    "is_peft_model",
    "layer_decay_param_groups",
    "native_input_side",
    "parse_similarity",
    "prepare_model",
    "recalibrate_batch_norm",
    "recommend_strategy",
    "resolve_keep_depth",
    "resolve_trainable_fraction",
    "summarize_trainable",
    "truncation_points",
    "unwrap",
]
