"""Task specifications: what each head predicts, how it is scored and how its loss is computed.

A :class:`TaskSpec` owns everything that depends on the task *type*: the number of outputs, the
loss (with missing-label masking), the prediction transform and the label names. The model, the
trainer, the metrics and the model card all read tasks through it.

Example:
    >>> import torch
    >>> from hf_tlmtl import TaskSpec
    >>> shape = TaskSpec(name="shape", type="classification", labels=["square", "ellipse", "heart"])
    >>> shape.num_outputs
    3
    >>> logits = torch.zeros(2, 3)
    >>> float(shape.compute_loss(logits, torch.tensor([0, -100])))  # -100: row not labelled
    1.0986...
"""

from __future__ import annotations

import keyword
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F

TaskType = Literal["classification", "multilabel", "regression"]
TASK_TYPES: tuple[str, ...] = ("classification", "multilabel", "regression")
IGNORE_INDEX = -100
"""Classification target meaning "no label for this row" (the PyTorch / transformers convention)."""

REGRESSION_LOSSES: tuple[str, ...] = ("mse", "huber", "smooth_l1", "l1")
# Keyword arguments of ``TimmMultiTaskModel.forward`` that are not task labels (a test keeps the two in step).
RESERVED_NAMES: frozenset[str] = frozenset(
    {"pixel_values", "features", "labels", "output_hidden_states", "output_attentions", "return_dict", "kwargs"}
)


@dataclass
class TaskSpec:
    """One prediction task on top of the shared backbone.

    Args:
        name: Python identifier; also the keyword the label is passed under in ``model(...)``
            and the dataset column read by default.
        type: ``"classification"`` (one class per row, cross-entropy), ``"multilabel"``
            (independent binary outputs, BCE with logits) or ``"regression"`` (real values).
        labels: Class names (classification / multilabel) or output names (regression).
        num_labels: Number of outputs when ``labels`` is not given. Regression defaults to 1.
        weight: Static weight of this task's loss in the total (``>= 0``).
        loss: Regression only: ``"mse"`` (default), ``"huber"``/``"smooth_l1"`` or ``"l1"``.
        huber_delta: Transition point of the Huber / smooth-L1 loss.
        label_smoothing: Classification only, passed to cross-entropy.
        column: Dataset column holding this task's label (defaults to ``name``).

    Missing labels: a classification target of ``-100`` or a ``NaN`` regression / multilabel
    target contributes nothing to this task's loss; a batch without any label gives zero loss
    (and zero gradient), never ``NaN``.

    Example:
        >>> TaskSpec(name="age", type="regression").num_outputs
        1
        >>> TaskSpec(name="attrs", type="multilabel", labels=["red", "big"]).id2label
        {0: 'red', 1: 'big'}
    """

    name: str
    type: TaskType
    labels: list[str] | None = None
    num_labels: int | None = None
    weight: float = 1.0
    loss: str | None = None
    huber_delta: float = 1.0
    label_smoothing: float = 0.0
    column: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or keyword.iskeyword(self.name):
            raise ValueError(
                f"Task name {self.name!r} is not a Python identifier; task names are passed as keyword "
                "arguments (model(pixel_values=x, <task>=y)). Use letters, digits and underscores, "
                "e.g. 'hair_color'."
            )
        if self.name in RESERVED_NAMES:
            raise ValueError(
                f"Task name {self.name!r} is a keyword argument of TimmMultiTaskModel.forward, so its labels could not "
                f"be passed by name (reserved: {sorted(RESERVED_NAMES)}). Rename the task and keep reading the "
                f"dataset column: TaskSpec(name='{self.name}_task', column='{self.name}', ...)."
            )
        if self.type not in TASK_TYPES:
            raise ValueError(f"Task {self.name!r}: unknown type {self.type!r}; use one of {list(TASK_TYPES)}.")
        if self.labels is not None:
            given, self.labels = list(self.labels), [str(label) for label in self.labels]
            if len(set(self.labels)) != len(self.labels):
                text = next(t for t in self.labels if self.labels.count(t) > 1)
                clash = [g for g, t in zip(given, self.labels) if t == text]
                if len(set(map(repr, clash))) > 1:  # distinct values that read the same as text, e.g. 1 and "1"
                    raise ValueError(
                        f"Task {self.name!r}: labels {clash} are different values but the same class name {text!r} "
                        "(labels are stored as text); give each class a distinct name."
                    )
                raise ValueError(f"Task {self.name!r}: labels contain duplicates: {self.labels}.")
            if self.num_labels is not None and self.num_labels != len(self.labels):
                raise ValueError(
                    f"Task {self.name!r}: num_labels={self.num_labels} but {len(self.labels)} labels "
                    "were given; pass only one of them."
                )
            self.num_labels = len(self.labels)
        if self.num_labels is None:
            if self.type == "regression":
                self.num_labels = 1
            else:
                raise ValueError(
                    f"Task {self.name!r} ({self.type}) needs its classes: pass labels=[...] "
                    "(class names) or num_labels=N."
                )
        if isinstance(self.num_labels, bool) or not float(self.num_labels).is_integer():
            raise ValueError(f"Task {self.name!r}: num_labels must be a whole number, got {self.num_labels!r}.")
        self.num_labels = int(self.num_labels)
        if self.num_labels < 1 or (self.type == "classification" and self.num_labels < 2):
            minimum = 2 if self.type == "classification" else 1
            raise ValueError(f"Task {self.name!r}: needs at least {minimum} outputs, got {self.num_labels}.")
        self.label_smoothing = float(self.label_smoothing)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"Task {self.name!r}: label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        self.weight = float(self.weight)
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"Task {self.name!r}: weight must be a finite number >= 0, got {self.weight}.")
        if self.type == "regression":
            self.loss = self.loss or "mse"
            if self.loss not in REGRESSION_LOSSES:
                raise ValueError(
                    f"Task {self.name!r}: unknown regression loss {self.loss!r}; use one of {list(REGRESSION_LOSSES)}."
                )
        elif self.loss not in (None, "cross_entropy", "bce"):
            raise ValueError(f"Task {self.name!r}: loss {self.loss!r} is only for regression tasks.")
        else:
            self.loss = "cross_entropy" if self.type == "classification" else "bce"

    # ----------------------------------------------------------------------------------- shape
    @property
    def num_outputs(self) -> int:
        """Width of this task's head."""
        return int(self.num_labels)

    @property
    def id2label(self) -> dict[int, str]:
        names = self.labels or [f"{self.name}_{i}" for i in range(self.num_outputs)]
        return dict(enumerate(names))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in self.id2label.items()}

    @property
    def source_column(self) -> str:
        """Dataset column that holds this task's label."""
        return self.column or self.name

    # ------------------------------------------------------------------------------ serialise
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown TaskSpec field(s) {sorted(unknown)}; valid fields: {sorted(known)}.")
        return cls(**data)

    # ----------------------------------------------------------------------------------- loss
    def prepare_target(self, target: Any, batch_size: int) -> torch.Tensor:
        """Validate a label batch and bring it to the dtype/shape the loss expects.

        Raises ``ValueError`` for class indices out of range and for wrongly shaped targets, so
        bad data fails with the task and value named instead of a CUDA device-side assert.
        """
        target = torch.as_tensor(target)
        if self.type == "classification":
            if target.is_floating_point():
                if torch.any(target != target.round()):
                    raise ValueError(f"Task {self.name!r}: classification targets must be class indices, got floats.")
            target = target.long().reshape(-1)
            bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= self.num_outputs))
            if bool(bad.any()):
                value = int(target[bad][0])
                raise ValueError(
                    f"Task {self.name!r}: class index {value} is out of range for {self.num_outputs} classes "
                    f"(valid: 0..{self.num_outputs - 1}, or {IGNORE_INDEX} for a missing label)."
                )
        else:
            target = target.float()
            if target.dim() == 1 and (self.num_outputs == 1 or target.numel() != batch_size):
                target = target.reshape(-1, 1) if self.num_outputs == 1 else target
            if target.dim() == 1:
                target = target.reshape(batch_size, -1)
            if target.shape[-1] != self.num_outputs:
                raise ValueError(
                    f"Task {self.name!r}: expected {self.num_outputs} target value(s) per row, got shape "
                    f"{tuple(target.shape)}."
                )
        if target.shape[0] != batch_size:
            raise ValueError(f"Task {self.name!r}: {target.shape[0]} labels for a batch of {batch_size} images.")
        if target.is_floating_point() and bool(torch.isinf(target).any()):
            raise ValueError(
                f"Task {self.name!r}: a target is infinite; labels must be finite numbers (NaN marks a missing label)."
            )
        return target

    def label_mask(self, target: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the labelled entries of a prepared target."""
        if self.type == "classification":
            return target != IGNORE_INDEX
        return ~torch.isnan(target)

    def compute_loss(self, logits: torch.Tensor, target: Any) -> torch.Tensor:
        """Mean loss over the labelled entries; ``0`` (connected to ``logits``) when none is labelled."""
        return self.loss_and_presence(logits, target)[0]

    def loss_and_presence(self, logits: torch.Tensor, target: Any) -> tuple[torch.Tensor, bool]:
        """:meth:`compute_loss` and whether any entry of ``target`` is labelled: the one place presence is decided.

        Example:
            >>> import torch
            >>> task = TaskSpec(name="age", type="regression")
            >>> loss, present = task.loss_and_presence(torch.zeros(2, 1), torch.tensor([float("nan"), float("nan")]))
            >>> float(loss), present
            (0.0, False)
        """
        target = self.prepare_target(target, logits.shape[0]).to(logits.device)
        mask = self.label_mask(target)
        if not bool(mask.any()):
            # Keeps the graph connected so DDP / optimisers see a zero gradient, not a missing one.
            return logits.sum() * 0.0, False
        if self.type == "classification":
            loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)
            return loss, True
        logits = logits.float()
        safe_target = torch.where(mask, target, torch.zeros_like(target))
        if self.type == "multilabel":
            elementwise = F.binary_cross_entropy_with_logits(logits, safe_target, reduction="none")
        elif self.loss == "mse":
            elementwise = F.mse_loss(logits, safe_target, reduction="none")
        elif self.loss == "l1":
            elementwise = F.l1_loss(logits, safe_target, reduction="none")
        elif self.loss == "huber":
            elementwise = F.huber_loss(logits, safe_target, reduction="none", delta=self.huber_delta)
        else:
            elementwise = F.smooth_l1_loss(logits, safe_target, reduction="none", beta=self.huber_delta)
        return (elementwise * mask).sum() / mask.sum(), True

    # ----------------------------------------------------------------------------- prediction
    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (softmax / sigmoid) or values (identity) from raw head outputs."""
        if self.type == "classification":
            return logits.float().softmax(dim=-1)
        if self.type == "multilabel":
            return logits.float().sigmoid()
        return logits.float()


def normalize_tasks(tasks: Iterable[TaskSpec | dict[str, Any]]) -> list[TaskSpec]:
    """Turn TaskSpecs or their dicts into a validated list of TaskSpec with unique names.

    Example:
        >>> [t.name for t in normalize_tasks([{"name": "a", "type": "regression"}])]
        ['a']
    """
    if isinstance(tasks, (TaskSpec, dict, str)):
        raise ValueError("tasks must be a list of TaskSpec (or dicts), e.g. tasks=[TaskSpec(name='y', type='regression')].")
    specs = [t if isinstance(t, TaskSpec) else TaskSpec.from_dict(dict(t)) for t in tasks]
    if not specs:
        raise ValueError("At least one task is needed, e.g. tasks=[TaskSpec(name='label', type='classification', num_labels=10)].")
    names = [t.name for t in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Duplicate task name(s) {duplicates}: each task needs its own name.")
    return specs


def task_names(tasks: Sequence[TaskSpec]) -> list[str]:
    return [t.name for t in tasks]
