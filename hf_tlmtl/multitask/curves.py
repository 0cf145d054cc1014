"""Training and evaluation curves per task, drawn from a Trainer's ``state.log_history`` into a PNG.

``MultiTaskTrainer`` logs the overall ``loss`` plus each task's ``loss_<task>`` while training,
and ``eval_loss`` plus ``eval_<task>_<metric>`` at each evaluation. :func:`curve_series` sorts
those numbers into one panel per task; :func:`plot_training_curves` draws them with matplotlib's
Agg canvas (no display, no global backend switch): top row the training (and evaluation) loss,
bottom row the evaluation metrics; the first column is the overall loss and ``eval_score``.

Example:
    >>> import tempfile, pathlib
    >>> history = [{"step": 5, "loss": 1.2, "loss_shape": 0.9, "loss_scale": 0.3},
    ...            {"step": 10, "loss": 0.8, "loss_shape": 0.6, "loss_scale": 0.2},
    ...            {"step": 10, "eval_loss": 0.7, "eval_shape_accuracy": 0.6, "eval_scale_mae": 0.2}]
    >>> series = curve_series(history, ["shape", "scale"])
    >>> series["shape"]["train"]["loss"]
    ([5, 10], [0.9, 0.6])
    >>> series["shape"]["eval"]["accuracy"]
    ([10], [0.6])
    >>> path = plot_training_curves(history, ["shape", "scale"], pathlib.Path(tempfile.mkdtemp()) / "c.png")
    >>> path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

Series = tuple[list[float], list[float]]
OVERALL = "overall"
"""Panel key of the total loss and ``eval_score``."""

_EVAL_SKIP = {"runtime", "samples_per_second", "steps_per_second", "epoch"}


def curve_series(
    log_history: Iterable[Mapping[str, Any]], task_names: Sequence[str]
) -> dict[str, dict[str, dict[str, Series]]]:
    """``{panel: {"train" | "eval": {series: (steps, values)}}}`` with one panel per task plus ``"overall"``.

    A task's training series is its ``loss_<task>``; its evaluation series are its
    ``eval_<task>_<metric>`` values (``loss`` included when logged). Steps come from the
    ``step`` of each log entry. Unknown keys are ignored.
    """
    # Longest names first, so a task called "shape_x" is not read as task "shape", metric "x_...".
    names = sorted(task_names, key=len, reverse=True)
    panels: dict[str, dict[str, dict[str, Series]]] = {
        key: {"train": {}, "eval": {}} for key in [OVERALL, *task_names]
    }

    def add(panel: str, kind: str, series: str, step: float, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps, values = panels[panel][kind].setdefault(series, ([], []))
            steps.append(step)
            values.append(float(value))

    for entry in log_history:
        step = entry.get("step", len(panels[OVERALL]["train"].get("loss", ([], []))[0]))
        for key, value in entry.items():
            if key == "loss":
                add(OVERALL, "train", "loss", step, value)
            elif key == "eval_loss":
                add(OVERALL, "eval", "loss", step, value)
            elif key == "eval_score":
                add(OVERALL, "eval", "score", step, value)
            elif key.startswith("loss_"):
                task = key[len("loss_"):]
                if task in panels and task != OVERALL:
                    add(task, "train", "loss", step, value)
            elif key.startswith("eval_"):
                task = next((n for n in names if key.startswith(f"eval_{n}_")), None)
                metric = key[len(f"eval_{task}_"):] if task else None
                if task and metric not in _EVAL_SKIP:
                    add(task, "eval", metric, step, value)
    return panels


def plot_training_curves(
    log_history: Iterable[Mapping[str, Any]],
    task_names: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Draw :func:`curve_series` to ``path`` (PNG): one column per task (plus overall), loss on top, metrics below.

    Returns the path written. Panels without data say so instead of staying blank.
    """
    # matplotlib only when a figure is drawn (~0.3 s of imports)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = curve_series(log_history, task_names)
    columns = list(panels)
    figure = Figure(figsize=(3.2 * len(columns), 5.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(columns), squeeze=False)
    for col, name in enumerate(columns):
        loss_ax, eval_ax = axes[0][col], axes[1][col]
        loss_ax.set_title(f"{name}: loss")
        for label, (steps, values) in panels[name]["train"].items():
            loss_ax.plot(steps, values, label=f"train {label}", color="tab:blue")
        if "loss" in panels[name]["eval"]:
            steps, values = panels[name]["eval"]["loss"]
            loss_ax.plot(steps, values, "o-", label="eval loss", color="tab:orange")
        eval_ax.set_title(f"{name}: evaluation")
        for label, (steps, values) in panels[name]["eval"].items():
            if label != "loss":
                eval_ax.plot(steps, values, "o-", label=label)
        for ax in (loss_ax, eval_ax):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    return save_figure(figure, path, title)


def save_figure(figure: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a matplotlib ``figure`` (with an optional overall ``title``) to ``path`` as PNG, folders created."""
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    return path


__all__ = ["OVERALL", "curve_series", "plot_training_curves", "save_figure"]
