"""Inter-task affinity: which tasks help each other on a shared backbone, and how to group them.

Two measurements, both on the shared (backbone) parameters ``theta_s`` of a model in training:

- **Lookahead affinity** (TAG: Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task
  Learning", NeurIPS 2021): take one SGD step on ``theta_s`` with task ``i``'s gradient alone and
  see how task ``j``'s loss on the same batch moves,
  ``Z(i -> j) = 1 - L_j(theta_s - lr * grad_i L_i, theta_j) / L_j(theta_s, theta_j)``.
  Positive: a step for ``i`` lowers ``j``'s loss (``i`` helps ``j``); negative: it raises it.
  Averaged over the measured steps. ``lr`` is the optimizer's current learning rate of each
  parameter (layer-wise decay and schedule included), the heads do not move.
- **Gradient cosine**: ``cos(grad_i L_i, grad_j L_j)`` on ``theta_s``, the cheaper, first-order view
  (symmetric; 1 on the diagonal).

:class:`TaskAffinityCallback` measures both every N steps of a :class:`~hf_tlmtl.training.MultiTaskTrainer`
run, on batches it draws from the training set with its own seeded generator (the training batches
and random state are left alone), and writes ``task_affinity.json`` and ``task_affinity.png``.
:func:`~hf_tlmtl.multitask.grouping.group_tasks` turns the lookahead matrix into the grouping (one backbone per group) that
maximises the total affinity.

One measurement costs a forward with graph, one backward per task (the graph is kept between them)
and one forward without graph per task: about ``1 + 1.5 T`` training steps' worth for ``T`` tasks
(measured), so measuring every N steps adds roughly ``(1 + 1.5 T) / N`` to the run; the callback's
default N = 6T keeps that near a quarter (benchmarks/affinity_cost.py measures it).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..backbone.unwrap import unwrap
from ..data.collator import MultiTaskCollator
from ..data.labels import encode_labels
from ..data.preparation import raw_dataset
from .curves import save_figure

logger = logging.get_logger(__name__)

AFFINITY_JSON = "task_affinity.json"
AFFINITY_PNG = "task_affinity.png"
AFFINITY_STATE = "task_affinity_state.json"
"""Written into every checkpoint folder: the running sums a resumed run continues from (default names)."""
LOOKAHEAD_STEPS = ("sgd", "equal")
"""``"sgd"``: TAG's lookahead step ``lr * grad_i``; ``"equal"``: the same step length for every source task."""
DEFAULT_BUDGET = 5000
"""Groupings :func:`group_tasks` scores exhaustively before it approximates (all partitions of 8 tasks: 4,140)."""


# ------------------------------------------------------------------------------------ result
@dataclass
class AffinityMatrix:
    """Mean affinities over the measured steps: ``lookahead[i][j]`` is ``Z(i -> j)`` (source row, target column).

    Entries that no measurement could fill (a task without labels in every measured batch) are NaN.
    """

    tasks: list[str]
    lookahead: np.ndarray
    cosine: np.ndarray
    measurements: int
    steps: list[int] = field(default_factory=list)
    lookahead_step: str = "sgd"

    def to_dict(self) -> dict[str, Any]:
        def rows(matrix: np.ndarray) -> list[list[float | None]]:
            return [[None if math.isnan(v) else float(v) for v in row] for row in matrix]

        return {
            "tasks": self.tasks,
            "lookahead": rows(self.lookahead),
            "cosine": rows(self.cosine),
            "measurements": self.measurements,
            "steps": self.steps,
            "lookahead_step": self.lookahead_step,
            "definition": "lookahead[i][j] = Z(i -> j) = 1 - L_j(after an SGD step on task i) / L_j(before), TAG",
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AffinityMatrix":
        def matrix(rows: Any) -> np.ndarray:
            return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=np.float64)

        return cls(
            tasks=list(data["tasks"]), lookahead=matrix(data["lookahead"]), cosine=matrix(data["cosine"]),
            measurements=int(data["measurements"]), steps=list(data.get("steps", [])),
            lookahead_step=data.get("lookahead_step", "sgd"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AffinityMatrix":
        """Read a ``task_affinity.json``."""
        return cls.from_dict(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------- measurement
def shared_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable backbone parameters (the ones every task's gradient reaches), by name in the base model."""
    base = unwrap(model)
    return {f"backbone.{n}": p for n, p in base.backbone.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _buffers_kept(module: torch.nn.Module) -> Iterator[None]:
    """BatchNorm statistics (and any other buffer) are put back as they were after the block."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _present_losses(base: Any, outputs: Any) -> dict[str, torch.Tensor]:
    """Unweighted losses of the tasks the model found labelled in the batch, in task order."""
    labelled = set(outputs.labelled_tasks or ())
    return {task.name: outputs.task_losses[task.name] for task in base.tasks if task.name in labelled}


def measure_affinity(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    learning_rates: float | Mapping[str, float],
    step: str = "sgd",
) -> tuple[np.ndarray, np.ndarray]:
    """One measurement on one batch: ``(lookahead, cosine)``, ``T x T`` in ``model.tasks`` order.

    ``learning_rates``: the lookahead SGD step size, one number or one per shared parameter name
    (:func:`shared_parameters`). ``step``: ``"sgd"`` is TAG's step ``lr * grad_i``; ``"equal"`` rescales
    every source task's step to the same length (the mean of the ``"sgd"`` lengths), so that a task with
    large gradients does not dominate: then, to first order, no step of that length lowers ``L_j`` more
    than ``j``'s own, and the diagonal is the highest entry of its column. Rows / columns of tasks
    without a label in the batch are NaN. The
    model's parameters, buffers (BatchNorm statistics), gradients and random state are unchanged
    afterwards; it runs in the mode the model is in (training mode during training).

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="a", type="regression"),
        ...     TaskSpec(name="b", type="regression")], image_size=32)
        >>> _ = model.heads["b"].load_state_dict(model.heads["a"].state_dict())  # b: the same task as a
        >>> x, y = torch.randn(4, 3, 32, 32), torch.rand(4)
        >>> lookahead, cosine = measure_affinity(model, {"pixel_values": x, "a": y, "b": y}, 0.1)
        >>> bool(abs(lookahead[0, 1] - lookahead[0, 0]) < 1e-6), round(float(cosine[0, 1]), 4)
        (True, 1.0)
    """
    if step not in LOOKAHEAD_STEPS:
        raise ValueError(f"Unknown lookahead step {step!r}; valid: {list(LOOKAHEAD_STEPS)}.")
    base = unwrap(model)
    names = [t.name for t in base.tasks]
    shared = shared_parameters(base)
    if not shared:
        raise ValueError(
            "measure_affinity needs trainable backbone parameters (the shared ones); this model's backbone is frozen "
            "(transfer_strategy='feature_extraction' or cache_features): measure affinity on a run that trains the backbone."
        )
    device = next(iter(shared.values())).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    lr = {n: float(learning_rates if isinstance(learning_rates, (int, float)) else learning_rates[n]) for n in shared}
    lookahead = np.full((len(names), len(names)), np.nan)
    cosine = np.full((len(names), len(names)), np.nan)
    with _buffers_kept(base), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # dropout masks: the same in every forward below
        torch.manual_seed(seed)
        with torch.enable_grad():
            present = _present_losses(base, base(**batch))
            params = list(shared.values())
            grads = {}
            for k, (name, loss) in enumerate(present.items()):
                g = torch.autograd.grad(loss, params, retain_graph=k < len(present) - 1, allow_unused=True)
                grads[name] = [torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(params, g)]
        before = {n: float(v.detach()) for n, v in present.items()}
        flat = {n: torch.cat([g.reshape(-1) for g in gs]).double() for n, gs in grads.items()}
        index = {n: names.index(n) for n in present}
        for a, b in itertools.product(present, repeat=2):
            denominator = float(flat[a].norm() * flat[b].norm())
            cosine[index[a], index[b]] = float(flat[a] @ flat[b]) / denominator if denominator > 0 else 0.0
        with torch.no_grad():
            steps = {t: [lr[n] * g for n, g in zip(shared, gs)] for t, gs in grads.items()}
            if step == "equal" and steps:
                lengths = {t: float(torch.sqrt(sum((d * d).sum() for d in ds))) for t, ds in steps.items()}
                mean_length = sum(lengths.values()) / len(lengths)
                steps = {t: [d * (mean_length / lengths[t]) if lengths[t] > 0 else d for d in ds] for t, ds in steps.items()}
            originals = [p.detach().clone() for p in params]
            try:
                for source, ds in steps.items():
                    # In place (cheaper than torch.func.functional_call on small models); put back exactly below.
                    for param, original, d in zip(params, originals, ds):
                        param.copy_(original - d)
                    torch.manual_seed(seed)
                    after = _present_losses(base, base(**batch))
                    for target, value in after.items():
                        if before[target] > 0:
                            lookahead[index[source], index[target]] = 1.0 - float(value) / before[target]
            finally:
                for param, original in zip(params, originals):
                    param.copy_(original)
    return lookahead, cosine


# ---------------------------------------------------------------------------------- callback
class TaskAffinityCallback(TrainerCallback):
    """Measures lookahead and gradient-cosine affinity every ``every_n_steps`` optimizer steps of a
    :class:`~hf_tlmtl.training.MultiTaskTrainer` run, logs the matrix and writes it into the output folder.

    Each measurement draws ``batch_size`` rows of ``dataset`` (default: the trainer's training set and
    collator) with a generator seeded from ``(seed, step)``: which rows a step measures on does not
    depend on the training batches, so a resumed run measures exactly what an uninterrupted one does.
    Every process measures the same rows; the main process writes ``task_affinity.json`` and
    ``task_affinity.png`` (heatmaps) at each log and at the end of training, and the running sums into
    each checkpoint folder (``task_affinity_state.json``), from which a resumed run continues (``name``
    changes the stem).

    Checked when training starts (``ValueError``): at least two tasks, trainable shared parameters,
    and a label for every task within the rows the run will measure on.

    Args:
        dataset: Prepared rows to measure on (``prepare_dataset`` output); ``None``: the training set.
        every_n_steps: Measure after every N-th optimizer step. ``None``: ``6 * T`` for ``T`` tasks, which
            keeps the added time near a quarter of the run's (a measurement costs about 1 + 1.5 T steps).
        start_step: No measurement before this step. The first steps mostly fit each head's bias, which
            moves every task's mean prediction the same way and makes unrelated tasks look helpful;
            start after them (e.g. a fifth of a short run).
        batch_size: Rows per measurement (``None``: ``per_device_train_batch_size``).
        collator: Turns rows into a batch (``None``: the training collator, or ``MultiTaskCollator``).
        seed: Seed of the row draws.
        plot: Also draw ``task_affinity.png``.
        lookahead_step: ``"sgd"`` (TAG) or ``"equal"`` (every source task's step of the same length),
            see :func:`measure_affinity`.
        name: Stem of the files written (``<name>.json``, ``<name>.png``, ``<name>_state.json``): two
            callbacks on one run need two names.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.data import prepare_dataset
        >>> from hf_tlmtl.data.embedded import load_embedded_dataset
        >>> from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
        >>> ds = load_embedded_dataset("shapes_affinity", n_train=32, n_eval=8, image_size=32)["train"]
        >>> tasks = [TaskSpec(name="scale", type="regression"), TaskSpec(name="size_class", type="classification", num_labels=3)]
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=32)
        >>> args = MultiTaskTrainingArguments(output_dir="/tmp/hf_tlmtl_affinity_doctest", max_steps=4, report_to="none",
        ...     per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True, use_cpu=True)
        >>> callback = TaskAffinityCallback(every_n_steps=2, plot=False)
        >>> trainer = MultiTaskTrainer(model=model, args=args, callbacks=[callback],
        ...     train_dataset=prepare_dataset(ds.select_columns(["image", "scale", "size_class"]), model.config, train=False))
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> result = callback.result()
        >>> result.tasks, result.measurements, result.lookahead.shape
        (['scale', 'size_class'], 2, (2, 2))
    """

    def __init__(
        self,
        dataset: Any = None,
        every_n_steps: int | None = None,
        start_step: int = 0,
        batch_size: int | None = None,
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        seed: int = 0,
        plot: bool = True,
        lookahead_step: str = "sgd",
        name: str = "task_affinity",
    ):
        self.name = name
        if lookahead_step not in LOOKAHEAD_STEPS:
            raise ValueError(f"Unknown lookahead_step {lookahead_step!r}; valid: {list(LOOKAHEAD_STEPS)}.")
        self.lookahead_step = lookahead_step
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be an int >= 1 (or None for 6 x the number of tasks), got {every_n_steps!r}.")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1 (or None for the training batch size), got {batch_size!r}.")
        self.dataset, self.collator = dataset, collator
        self.every_n_steps, self.start_step = every_n_steps, start_step
        self._every = every_n_steps or 1
        self.batch_size, self.seed, self.plot = batch_size, seed, plot
        self.tasks: list[str] = []
        self._reset([])

    def _reset(self, tasks: list[str]) -> None:
        self.tasks = tasks
        size = (len(tasks), len(tasks))
        self.sums = {"lookahead": np.zeros(size), "cosine": np.zeros(size)}
        self.counts = np.zeros(size, dtype=np.int64)
        self.steps: list[int] = []

    # --------------------------------------------------------------------------- results
    def result(self) -> AffinityMatrix:
        """The mean matrices so far (NaN where nothing was measured)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            means = {k: np.where(self.counts > 0, v / np.maximum(self.counts, 1), np.nan) for k, v in self.sums.items()}
        return AffinityMatrix(
            list(self.tasks), means["lookahead"], means["cosine"], len(self.steps), list(self.steps), self.lookahead_step
        )

    def _state(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks, "steps": self.steps, "counts": self.counts.tolist(),
            "sums": {k: v.tolist() for k, v in self.sums.items()}, "every_n_steps": self._every, "seed": self.seed,
            "start_step": self.start_step,
            "lookahead_step": self.lookahead_step,
        }

    def _restore(self, state: Mapping[str, Any], where: str) -> None:
        if list(state["tasks"]) != self.tasks:
            raise ValueError(
                f"{where} holds task affinity for tasks {state['tasks']}, but this run trains {self.tasks}: resume with "
                "the same tasks, or start a new output_dir."
            )
        self.steps = [int(s) for s in state["steps"]]
        self.counts = np.array(state["counts"], dtype=np.int64)
        self.sums = {k: np.array(v, dtype=np.float64) for k, v in state["sums"].items()}

    # ------------------------------------------------------------------------------ data
    def _rows_at(self, step: int, num_rows: int, batch_size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.choice(num_rows, size=min(batch_size, num_rows), replace=False)

    def _planned_steps(self, state: TrainerState) -> list[int]:
        return [s for s in range(self._every, state.max_steps + 1, self._every) if s >= self.start_step]

    def _check_labels_in_window(self, state: TrainerState, base: Any) -> None:
        """Every task needs a label in the rows of the planned measurements (read from the raw columns
        of a ``prepare_dataset`` dataset; other datasets are checked as their batches are measured)."""
        transform = (getattr(self._data, "format", None) or {}).get("format_kwargs", {}).get("transform")
        plan = getattr(transform, "labels", None)
        if plan is None:
            return
        rows = sorted({int(r) for s in self._planned_steps(state) for r in self._rows_at(s, len(self._data), self._batch)})
        raw = raw_dataset(self._data).select(rows) if rows else None
        labelled = {}
        for column in plan:
            mask = column.task.label_mask(column.task.prepare_target(encode_labels(column, raw[column.column]), len(rows)))
            labelled[column.task.name] = bool(mask.any())
        missing = [n for n in self.tasks if not labelled.get(n, False)]
        if missing:
            raise ValueError(
                f"Task affinity needs labels of every task in the rows it measures on ({len(rows)} rows over "
                f"{len(self._planned_steps(state))} measurements); {missing} have none there. Measure on a dataset that "
                "labels them (TaskAffinityCallback(dataset=...)), measure more often or on larger batches, or leave "
                "those tasks out of the affinity run."
            )

    def _batch_at(self, step: int) -> dict[str, Any]:
        rows = self._rows_at(step, len(self._data), self._batch)
        return self._collate([self._data[int(r)] for r in rows])

    # ---------------------------------------------------------------------------- events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        base = unwrap(kwargs["model"])
        tasks = [t.name for t in base.tasks]
        if len(tasks) < 2:
            raise ValueError(
                f"Task affinity compares tasks with each other: the model has {len(tasks)} task ({tasks}); train at "
                "least two tasks on the shared backbone, or leave TaskAffinityCallback out."
            )
        if not shared_parameters(base):
            raise ValueError(
                "Task affinity moves the shared backbone, which is frozen in this run (feature_extraction / "
                "cache_features); measure with a strategy that trains the backbone (fine_tune, partial, lora)."
            )
        dataloader = kwargs.get("train_dataloader")
        self._data = self.dataset if self.dataset is not None else getattr(dataloader, "dataset", None)
        if self._data is None or not hasattr(self._data, "__getitem__"):
            raise ValueError("TaskAffinityCallback needs rows to measure on: pass dataset=... or give the trainer a train_dataset.")
        if self.collator is not None:
            self._collate = self.collator
        elif self.dataset is None and getattr(dataloader, "collate_fn", None) is not None:
            self._collate = dataloader.collate_fn
        else:
            self._collate = MultiTaskCollator(base.tasks)
        self._batch = self.batch_size or args.per_device_train_batch_size
        self._every = self.every_n_steps or 6 * len(tasks)
        self._reset(tasks)
        self._output_dir = args.output_dir
        self._check_labels_in_window(state, base)
        if state.global_step > 0:
            self._resume(args, state)

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        candidates = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []
        candidates.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        for folder in candidates:
            path = Path(folder) / f"{self.name}_state.json"
            if path.is_file():
                self._restore(json.loads(path.read_text()), str(path))
                logger.info("Task affinity: continuing from %s (%d measurements)", path, len(self.steps))
                return
        logger.warning(
            "Resumed at step %d without %s_state.json in %s: task affinity is averaged over the measurements from here on only.",
            state.global_step, self.name, candidates,
        )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        step = state.global_step
        if step % self._every or step < self.start_step or step in self.steps:
            return
        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        shared = shared_parameters(model)
        lr_of = {}
        if optimizer is not None:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    lr_of[id(p)] = float(group["lr"])
        rates = {n: lr_of.get(id(p), args.learning_rate) for n, p in shared.items()}
        lookahead, cosine = measure_affinity(model, self._batch_at(step), rates, step=self.lookahead_step)
        measured = ~np.isnan(lookahead)
        self.sums["lookahead"] += np.where(measured, lookahead, 0.0)
        self.sums["cosine"] += np.where(np.isnan(cosine), 0.0, cosine)
        self.counts += measured
        self.steps.append(step)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.steps and state.is_world_process_zero:
            self._write(state, final=False)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / f"{self.name}_state.json").write_text(json.dumps(self._state()))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if not self.steps:
            logger.warning(
                "Task affinity: no measurement in %d steps (every %d steps from step %d); nothing written.",
                state.global_step, self._every, self.start_step,
            )
            return
        unmeasured = [n for n, c in zip(self.tasks, np.diag(self.counts)) if c == 0]
        if unmeasured:
            logger.warning("Task affinity: %s had no label in any measured batch; their entries are NaN.", unmeasured)
        self._write(state, final=True)

    def _write(self, state: TrainerState, final: bool) -> None:
        result = self.result()
        folder = Path(self._output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.name}.json").write_text(json.dumps(result.to_dict(), indent=2))
        if final and self.plot:
            plot_affinity(result, folder / f"{self.name}.png")
        logger.info("Task affinity after %d measurements (Z(row -> column)):\n%s", result.measurements, format_matrix(result))


def format_matrix(result: AffinityMatrix, kind: str = "lookahead") -> str:
    """The matrix as aligned text, sources as rows."""
    matrix = getattr(result, kind)
    width = max(len(n) for n in result.tasks)
    lines = [" " * (width + 2) + " ".join(f"{n[:8]:>8}" for n in result.tasks)]
    for name, row in zip(result.tasks, matrix):
        lines.append(f"{name:>{width}}  " + " ".join(f"{v:+8.4f}" for v in row))
    return "\n".join(lines)


def plot_affinity(result: AffinityMatrix, path: str | os.PathLike, title: str | None = None) -> Path:
    """Heatmaps of both matrices (lookahead, cosine) to ``path`` (PNG), values written in the cells."""
    # matplotlib only when a figure is drawn (~0.3 s of imports)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    n = len(result.tasks)
    side = max(3.2, 0.75 * n + 1.5)
    figure = Figure(figsize=(2 * side + 0.8, side), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, squeeze=False)[0]
    panels = [("lookahead", f"lookahead Z(row -> column), {result.measurements} measurements"), ("cosine", "gradient cosine")]
    for ax, (kind, label) in zip(axes, panels):
        matrix = getattr(result, kind)
        finite = np.abs(matrix[np.isfinite(matrix)])
        bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(matrix, cmap="RdBu", norm=TwoSlopeNorm(0.0, -bound, bound))
        ax.set_xticks(range(n), result.tasks, rotation=45, ha="right")
        ax.set_yticks(range(n), result.tasks)
        ax.set_xlabel("target task (loss measured)")
        ax.set_ylabel("source task (step taken)")
        ax.set_title(label)
        for i, j in itertools.product(range(n), repeat=2):
            value = matrix[i, j]
            text = "n/a" if math.isnan(value) else f"{value:.2g}"
            dark = not math.isnan(value) and abs(value) > 0.6 * bound
            ax.text(j, i, text, ha="center", va="center", fontsize="small", color="white" if dark else "black")
        figure.colorbar(image, ax=ax, shrink=0.8)
    return save_figure(figure, path, title)


# ---------------------------------------------------------------------------------- grouping


__all__ = [
    "AFFINITY_JSON",
    "AFFINITY_PNG",
    "AffinityMatrix",
    "TaskAffinityCallback",
    "format_matrix",
    "measure_affinity",
    "plot_affinity",
    "shared_parameters",
]
