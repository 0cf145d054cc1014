"""Layer-wise learning-rate decay (LLRD) parameter groups, on timm's own layer grouping.

timm's ``param_groups_layer_decay`` assigns each backbone parameter a layer id from the model's
``group_matcher(coarse=False)`` and returns groups with an ``lr_scale``; timm's schedulers read it,
transformers' schedulers do not. Here each group gets its absolute ``lr`` instead, so any
transformers / PyTorch scheduler (they scale each group's ``initial_lr``) keeps the ratios.

With ``L`` backbone layers (ids ``0..L-1``, stem first) and the heads as layer ``L``:
``lr(layer i) = lr * layer_decay ** (L - i)``, heads ``lr * head_lr_scale``.

Example:
    >>> import torch
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.transfer.layer_decay import layer_decay_param_groups
    >>> model = TimmMultiTaskModel.from_backbone("test_vit", [TaskSpec(name="y", type="regression")])
    >>> groups = layer_decay_param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    >>> sorted({round(g["lr"] / 1e-3, 4) for g in groups})  # 7 backbone layers (stem, 6 blocks) + heads
    [0.0078, 0.0156, 0.0312, 0.0625, 0.125, 0.25, 0.5, 1.0]
    >>> optimizer = torch.optim.AdamW(groups)
"""

from __future__ import annotations

from typing import Any, Iterable

from timm.optim import param_groups_layer_decay
from torch import nn

from ..backbone.unwrap import unwrap


def _weight_decay_groups(params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, kind: str) -> list[dict[str, Any]]:
    """Two groups at one lr: decayed (>= 2-D weights) and not decayed (biases, norm weights: <= 1-D)."""
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]
    groups = []
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "layer_scale": 1.0, "param_kind": kind})
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "layer_scale": 1.0, "param_kind": kind})
    return groups


def layer_decay_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    layer_decay: float | None = None,
    head_lr_scale: float = 1.0,
    extra_params: Iterable[nn.Parameter] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise LR decay on the backbone.

    Args:
        model: A :class:`~hf_tlmtl.TimmMultiTaskModel` (or a peft wrapper of one).
        lr: Base learning rate (heads at ``lr * head_lr_scale``; the top backbone layer at
            ``lr * layer_decay``).
        weight_decay: Applied to weights of 2 or more dimensions; biases and normalisation weights
            (all 1-D) and the backbone's ``no_weight_decay()`` names (ViT ``pos_embed``, ``cls_token``)
            get none.
        layer_decay: In (0, 1]; ``None`` or ``1.0`` gives every backbone layer the base ``lr``.
        head_lr_scale: Multiplier of the heads' learning rate.
        extra_params: More trainable parameters outside the model (e.g. a learnable loss balancer):
            one group at ``lr`` without weight decay.

    Parameters with ``requires_grad=False`` are left out. Each group carries its absolute ``lr``,
    the ``layer_scale`` it came from and a ``param_kind`` (``heads``, ``backbone``, ``other``, ``extra``,
    in this order: heads first, so the learning rate the Trainer logs is the heads').

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.transfer import apply_transfer_strategy
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> _ = apply_transfer_strategy(m, "feature_extraction")
        >>> [(g["param_kind"], g["lr"]) for g in layer_decay_param_groups(m, 0.1, 0.01, 0.5, head_lr_scale=10)]
        [('heads', 1.0), ('heads', 1.0)]
    """
    decay = 1.0 if layer_decay is None else float(layer_decay)
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay} (1.0 means no decay).")
    if head_lr_scale <= 0:
        raise ValueError(f"head_lr_scale must be > 0, got {head_lr_scale}.")
    base = unwrap(model)
    backbone = base.backbone
    no_weight_decay = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()

    # Heads first: the Trainer logs the first group's learning rate.
    head_params = [(n, p) for n, p in base.heads.named_parameters() if p.requires_grad]
    groups = _weight_decay_groups(head_params, lr * head_lr_scale, weight_decay, "heads")
    if any(p.requires_grad for p in backbone.parameters()):
        for group in param_groups_layer_decay(
            backbone, weight_decay=weight_decay, no_weight_decay_list=no_weight_decay, layer_decay=decay
        ):
            # timm puts the top backbone layer at scale 1; here the heads are the top layer.
            scale = group.pop("lr_scale") * decay
            groups.append({**group, "lr": lr * scale, "layer_scale": scale, "param_kind": "backbone"})

    seen = {id(p) for g in groups for p in g["params"]}
    owned = seen | {id(p) for p in backbone.parameters()} | {id(p) for p in base.heads.parameters()}
    other = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    groups += _weight_decay_groups(other, lr, weight_decay, "other")

    seen |= {id(p) for _, p in other}
    extra = [p for p in (extra_params or ()) if p.requires_grad and id(p) not in seen]
    extra = list({id(p): p for p in extra}.values())
    if extra:
        groups.append({"params": extra, "lr": lr, "weight_decay": 0.0, "layer_scale": 1.0, "param_kind": "extra"})
    return groups
