"""What trains after a strategy: trainable and total parameters per backbone layer group and per head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..backbone.anatomy import backbone_groups, named_weights
from ..backbone.unwrap import unwrap


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
    base = unwrap(model)
    weights = named_weights(base.backbone)
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
