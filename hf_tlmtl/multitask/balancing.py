"""Multi-task loss balancing: one small class per method behind one interface.

A balancer turns the task losses of a batch into the loss that is back-propagated. Adding a
method is one class plus one registry line (``BALANCERS``).

Methods (``MultiTaskTrainingArguments.loss_balancing``):

- ``static``: ``sum_t w_t L_t`` with the TaskSpec weights ``w_t``.
- ``uncertainty``: homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018) with
  one learnable log-variance ``s_t = log sigma_t^2`` per task, trained with the model.
- ``dwa``: Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019) from the previous two
  epochs' mean task losses.
- ``upgrad``, ``mgda``, ``pcgrad``, ``imtlg``: gradient aggregation by ``torchjd`` on the shared
  backbone: one backward per task for the shared part (the Jacobian), then the aggregator turns
  its rows into one update. Heads get their own task's gradient.

Every method receives only the tasks *present* in the batch (at least one label): a task whose
labels are all missing is left out, so statistics (DWA) and learnable weights (uncertainty) never
see a fake zero loss, and no zero row reaches a gradient aggregator.

Example:
    >>> import torch
    >>> from hf_tlmtl import TaskSpec
    >>> from hf_tlmtl.multitask.balancing import build_balancer
    >>> tasks = [TaskSpec(name="a", type="regression", weight=2.0), TaskSpec(name="b", type="regression")]
    >>> balancer = build_balancer("static", tasks)
    >>> float(balancer.combine({"a": torch.tensor(1.0), "b": torch.tensor(3.0)}))
    5.0
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import nn

from ..tasks import TaskSpec


def weighted_sum(weights: dict[str, float], task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_t weights[t] * task_losses[t]``; a zero tensor (not the int 0) when no task is present."""
    if not task_losses:
        return torch.zeros(())
    return sum(weights[name] * loss for name, loss in task_losses.items())


class LossBalancer(nn.Module):
    """Interface: ``combine(task_losses) -> loss``; ``weights()`` for logging.

    ``task_losses`` holds only the tasks present in the batch; absent tasks are skipped.
    Learnable balancers register ``nn.Parameter``s: the trainer optimises and checkpoints them
    (tensors in ``balancer.safetensors``); other state (``json_state``) goes to
    ``balancer_state.json``.
    """

    name: ClassVar[str] = ""
    requires_grad_aggregation: ClassVar[bool] = False
    is_static: ClassVar[bool] = False
    """True when ``combine`` is the TaskSpec-weighted sum, the loss the model itself returns."""

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

    def json_state(self) -> dict[str, Any]:
        """Non-tensor state to checkpoint (JSON-serialisable)."""
        return {}

    def load_json_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`json_state` returned."""


class StaticBalancer(LossBalancer):
    """The TaskSpec weights: ``sum_t w_t * L_t``."""

    name = "static"
    is_static = True

    def combine(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_sum(self.static_weights, task_losses)


class UncertaintyBalancer(LossBalancer):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    With a learnable ``s_t = log sigma_t^2`` per task (initialised to 0) and TaskSpec weight ``w_t``:

    - classification / multilabel (eq. 10 of the paper): ``w_t * (exp(-s_t) * L_t + s_t / 2)``
    - regression (eq. 7, Gaussian likelihood): ``w_t * (0.5 * exp(-s_t) * L_t + s_t / 2)``

    The ``s_t / 2`` term (``log sigma_t``) keeps the learned variance from growing without bound.
    A task absent from the batch contributes nothing, so its ``s_t`` gets no gradient there.
    ``weights()`` reports the effective factor of ``L_t``: ``w_t * c_t * exp(-s_t)``.

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec
        >>> b = UncertaintyBalancer([TaskSpec(name="c", type="classification", num_labels=2),
        ...                          TaskSpec(name="r", type="regression")])
        >>> float(b.combine({"c": torch.tensor(2.0), "r": torch.tensor(2.0)}).detach())  # s = 0: 2 + 0.5 * 2
        3.0
    """

    name = "uncertainty"

    def __init__(self, tasks: Sequence[TaskSpec]):
        super().__init__(tasks)
        self.log_vars = nn.ParameterDict({t.name: nn.Parameter(torch.zeros(())) for t in tasks})
        self.loss_factors = {t.name: 0.5 if t.type == "regression" else 1.0 for t in tasks}

    def combine(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        if not task_losses:
            return torch.zeros(())
        total = 0.0
        for name, loss in task_losses.items():
            s = self.log_vars[name]
            term = self.loss_factors[name] * torch.exp(-s) * loss + 0.5 * s
            total = total + self.static_weights[name] * term
        return total

    def weights(self) -> dict[str, float]:
        return {
            name: self.static_weights[name] * self.loss_factors[name] * math.exp(-float(s.detach()))
            for name, s in self.log_vars.items()
        }


class DynamicWeightAverageBalancer(LossBalancer):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019), temperature ``T = 2``.

    With ``L_t(e)`` the mean training loss of task ``t`` over epoch ``e`` and ``K`` tasks, the
    weights of epoch ``e`` are ``lambda_t = K * softmax_t(r_t / T)`` with
    ``r_t = L_t(e-1) / L_t(e-2)``; all weights are 1 for the first two epochs. The loss is
    ``sum_t w_t * lambda_t * L_t`` (``w_t``: TaskSpec weight). A task missing from either of the
    two previous epochs (never labelled there) gets ``r_t = 1``. The loss history (two epochs) is
    checkpointed, so weights continue correctly after a resume.

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec
        >>> b = DynamicWeightAverageBalancer([TaskSpec(name="a", type="regression"),
        ...                                   TaskSpec(name="b", type="regression")])
        >>> b.on_epoch_end({"a": 1.0, "b": 1.0}); b.on_epoch_end({"a": 0.5, "b": 1.0})
        >>> {k: round(v, 4) for k, v in b.weights().items()}  # b is learning slower: more weight
        {'a': 0.8756, 'b': 1.1244}
    """

    name = "dwa"
    temperature: ClassVar[float] = 2.0

    def __init__(self, tasks: Sequence[TaskSpec]):
        super().__init__(tasks)
        self.history: list[dict[str, float]] = []
        self.dwa_weights = {name: 1.0 for name in self.task_names}

    def combine(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_sum(self.weights(), task_losses)

    def weights(self) -> dict[str, float]:
        return {n: self.static_weights[n] * self.dwa_weights[n] for n in self.task_names}

    def on_epoch_end(self, epoch_task_losses: dict[str, float]) -> None:
        self.history = (self.history + [{k: float(v) for k, v in epoch_task_losses.items()}])[-2:]
        self._update_weights()

    def _update_weights(self) -> None:
        if len(self.history) < 2:
            self.dwa_weights = {name: 1.0 for name in self.task_names}
            return
        before, last = self.history
        ratios = torch.tensor(
            [
                last[n] / before[n] if n in last and n in before and before[n] > 0 else 1.0
                for n in self.task_names
            ],
            dtype=torch.float64,
        )
        lambdas = len(self.task_names) * torch.softmax(ratios / self.temperature, dim=0)
        self.dwa_weights = dict(zip(self.task_names, lambdas.tolist()))

    def json_state(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_json_state(self, state: dict[str, Any]) -> None:
        self.history = [dict(epoch) for epoch in state.get("history", [])][-2:]
        self._update_weights()


class GradientAggregationBalancer(LossBalancer):
    """Base of the ``torchjd`` gradient-aggregation methods (``requires_grad_aggregation``).

    The trainer calls :meth:`backward` instead of ``loss.backward()``: ``torchjd``'s
    ``mtl_backward`` gives each head its own task's gradient and stores the Jacobian of the task
    losses (one row per present task, rows ``w_t * L_t``) with respect to the shared backbone;
    ``jac_to_grad`` aggregates it into the backbone's ``.grad``. Gradients accumulate across
    micro-batches like ``loss.backward()`` does (each micro-batch is aggregated on its own).

    Cost: one backward per task for the shared part (a Jacobian, vectorised with ``torch.vmap``)
    plus the aggregator (UPGrad solves a small quadratic program per task), instead of a single
    backward. ``combine`` (used for evaluation and reporting) is the static weighted sum.
    """

    requires_grad_aggregation = True

    def __init__(self, tasks: Sequence[TaskSpec]):
        super().__init__(tasks)
        self.last_weights = dict(self.static_weights)

    def make_aggregator(self) -> Any:
        raise NotImplementedError

    def combine(self, task_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_sum(self.static_weights, task_losses)

    def weights(self) -> dict[str, float]:
        return dict(self.last_weights)

    def backward(
        self,
        task_losses: dict[str, torch.Tensor],
        features: torch.Tensor,
        shared_params: Iterable[torch.Tensor],
        scale: float = 1.0,
    ) -> None:
        """Accumulate gradients: aggregated on ``shared_params``, per task on the heads.

        ``task_losses`` must hold only present tasks; tasks with weight 0 are left out too (a zero
        Jacobian row would distort MGDA-like aggregators). ``scale`` multiplies every loss
        (``1 / gradient_accumulation_steps``).
        """
        from torchjd.autojac import jac_to_grad, mtl_backward  # torchjd only for gradient-aggregation balancers

        rows = {n: self.static_weights[n] * scale * loss for n, loss in task_losses.items() if self.static_weights[n] > 0}
        if not rows:
            return
        if len(rows) == 1 or not features.requires_grad:
            # One task (or a frozen backbone): nothing to aggregate, the plain gradient is exact.
            sum(rows.values()).backward()
            return
        mtl_backward(list(rows.values()), features=features)
        with_jacobian = [p for p in shared_params if getattr(p, "jac", None) is not None]
        weights = jac_to_grad(with_jacobian, self.make_aggregator())
        if weights is not None:
            self.last_weights.update(zip(rows, (float(w) for w in weights.detach().cpu())))


class UPGradBalancer(GradientAggregationBalancer):
    """UPGrad (Quinton & Rey 2024, torchjd): project each task gradient onto the dual cone of all
    task gradients and average, so no task's loss increases to first order. Needs the
    ``torchjd[quadprog_projector]`` extra."""

    name = "upgrad"

    def make_aggregator(self) -> Any:
        from torchjd.aggregation import UPGrad  # torchjd only when this balancer is built

        return UPGrad()


class MGDABalancer(GradientAggregationBalancer):
    """MGDA (Désidéri 2012; Sener & Koltun 2018): the minimum-norm convex combination of the task
    gradients."""

    name = "mgda"

    def make_aggregator(self) -> Any:
        from torchjd.aggregation import MGDA  # torchjd only when this balancer is built

        return MGDA()


class PCGradBalancer(GradientAggregationBalancer):
    """PCGrad (Yu et al. 2020): remove each gradient's component that conflicts with another task's."""

    name = "pcgrad"

    def make_aggregator(self) -> Any:
        from torchjd.aggregation import PCGrad  # torchjd only when this balancer is built

        return PCGrad()


class IMTLGBalancer(GradientAggregationBalancer):
    """IMTL-G (Liu et al. 2021): the combination whose projections on every task's unit gradient are equal."""

    name = "imtlg"

    def make_aggregator(self) -> Any:
        from torchjd.aggregation import IMTLG  # torchjd only when this balancer is built

        return IMTLG()


BALANCERS: dict[str, type[LossBalancer]] = {
    cls.name: cls
    for cls in (
        StaticBalancer,
        UncertaintyBalancer,
        DynamicWeightAverageBalancer,
        UPGradBalancer,
        MGDABalancer,
        PCGradBalancer,
        IMTLGBalancer,
    )
}


def build_balancer(name: str, tasks: Sequence[TaskSpec]) -> LossBalancer:
    """The balancer registered under ``name`` for these tasks.

    Example:
        >>> from hf_tlmtl import TaskSpec
        >>> type(build_balancer("dwa", [TaskSpec(name="y", type="regression")])).__name__
        'DynamicWeightAverageBalancer'
    """
    if name not in BALANCERS:
        raise ValueError(f"Unknown loss_balancing {name!r}; valid methods: {sorted(BALANCERS)}.")
    return BALANCERS[name](tasks)


