"""Multi-task loss balancing: one small class per method behind one interface.

A balancer turns the task losses of a batch into the loss that is back-propagated. Adding a
method is one class plus one registry line (``BALANCERS``).

Example:
    >>> import torch
    >>> from hf_tlmtl import TaskSpec
    >>> from hf_tlmtl.balancing import build_balancer
    >>> tasks = [TaskSpec(name="a", type="regression", weight=2.0), TaskSpec(name="b", type="regression")]
    >>> balancer = build_balancer("static", tasks)
    >>> float(balancer.combine({"a": torch.tensor(1.0), "b": torch.tensor(3.0)}))
    5.0
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

from .tasks import TaskSpec


class LossBalancer(nn.Module):
    """Interface: ``combine(task_losses) -> loss``; ``weights()`` for logging.

    ``task_losses`` holds only the tasks present in the batch; absent tasks are skipped.
    Learnable balancers register ``nn.Parameter``s: the trainer optimises and checkpoints them.
    """

    name: ClassVar[str] = ""
    requires_grad_aggregation: ClassVar[bool] = False

    def __init__(self, tasks: Sequence[TaskSpec]):
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.static_weights = {t.name: float(t.weight) for t in tasks}

    def combine(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Current weight of each task, as logged (``weight_<task>``)."""
        return dict(self.static_weights)

    def on_epoch_end(self, epoch_task_losses: dict[str, float]) -> None:
        """Called with each task's mean training loss at the end of every epoch."""


class StaticBalancer(LossBalancer):
    """The TaskSpec weights: ``sum_t w_t * L_t``."""

    name = "static"

    def combine(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.static_weights[name] * loss for name, loss in task_losses.items())


BALANCERS: dict[str, type[LossBalancer]] = {cls.name: cls for cls in (StaticBalancer,)}


def build_balancer(name: str, tasks: Sequence[TaskSpec]) -> LossBalancer:
    """The balancer registered under ``name`` for these tasks."""
    if name not in BALANCERS:
        raise ValueError(f"Unknown loss_balancing {name!r}; valid methods: {sorted(BALANCERS)}.")
    return BALANCERS[name](tasks)
