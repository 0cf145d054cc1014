"""What a fine-tuning run reports at its end: ``training_summary.json`` and the results it prints.

- :func:`training_summary`: tasks, per-task metrics beside their baselines, data, transfer plan and
  trainable parameters, the arguments; :func:`write_summary` saves it as JSON in the output folder;
- :func:`describe_results`: the per-task results against the baselines, and the files the run wrote.

Example:
    >>> import tempfile
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
    >>> trainer = MultiTaskTrainer(model=model, args=MultiTaskTrainingArguments(tempfile.mkdtemp(), report_to="none"))
    >>> summary = training_summary(trainer, {"eval_y_mae": 0.25, "eval_loss": 0.1}, {"train_loss": 0.2}, dataset="shapes",
    ...                            train=range(40), validation=range(8), baselines={"y": {"mae": 0.5}})
    >>> summary["per_task"], summary["data"]["train_rows"], summary["transfer"]["total_params"] > 0
    ({'y': {'mae': 0.25}}, 40, True)
    >>> print(describe_results(summary, "/no/such/folder").splitlines()[2])
      y  regression      mae 0.250 (baseline 0.500)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..tasks import TaskSpec
from ..transfer.advice import Recommendation
from ..transfer.summary import summarize_trainable
from .output_dir import ADAPTER_DIR, CARD_FILE, CURVES_FILE, SUMMARY_FILE, complete_checkpoints
from .trainer import MultiTaskTrainer


def per_task_metrics(metrics: dict[str, float], tasks: list[TaskSpec]) -> dict[str, dict[str, float]]:
    """``eval_<task>_<metric>`` -> ``{task: {metric: value}}`` (longest task names matched first).

    >>> tasks = [TaskSpec(name="a", type="regression"), TaskSpec(name="a_b", type="regression")]
    >>> per_task_metrics({"eval_a_b_mae": 1.0, "eval_a_mae": 2.0, "eval_loss": 3.0}, tasks)
    {'a': {'mae': 2.0}, 'a_b': {'mae': 1.0}}
    """
    names = sorted((t.name for t in tasks), key=len, reverse=True)
    grouped: dict[str, dict[str, float]] = {t.name: {} for t in tasks}
    for key, value in metrics.items():
        task = next((n for n in names if key.startswith(f"eval_{n}_")), None)
        if task is not None:
            grouped[task][key[len(f"eval_{task}_"):]] = value
    return grouped


def _rows(split: Any) -> int | None:
    return len(split) if hasattr(split, "__len__") else None  # a stream has no length


def training_summary(
    trainer: MultiTaskTrainer,
    metrics: dict[str, float],
    train_metrics: dict[str, float],
    *,
    dataset: str,
    train: Any,
    validation: Any,
    baselines: dict[str, dict[str, float]],
    recommendation: Recommendation | None = None,
    resumed_from: str | None = None,
    arguments: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary of a run that trained: what ``training_summary.json`` holds.

    Args:
        trainer: The trainer that trained (tasks, transfer strategy, trainable parameters, processes).
        metrics: Its ``evaluate()`` output; ``train_metrics``: its ``train()`` output's metrics.
        dataset: The data's name as given; ``train`` / ``validation``: its splits (a stream has no row count).
        baselines: ``{task: {metric: value}}`` of a model that ignores the image
            (:func:`~hf_tlmtl.multitask.baselines.baseline_metrics`).
        recommendation: The transfer advice the run printed, if any.
        resumed_from: The checkpoint the run continued.
        arguments: The run's arguments, by group (``{"model": ..., "training": args.to_dict()}``).
    """
    args = trainer.args
    counts = trainer.transfer_summary or summarize_trainable(trainer.model)
    return {
        "tasks": [t.to_dict() for t in trainer.tasks],
        "per_task": per_task_metrics(metrics, trainer.tasks),
        "baselines": baselines,
        "eval": metrics,
        "train": train_metrics,
        "data": {
            "source": dataset,
            "train_rows": _rows(train),
            "streaming": _rows(train) is None,
            "validation_rows": len(validation),
        },
        "transfer": {
            "strategy": args.transfer_strategy,
            "recommendation": dataclasses.asdict(recommendation) if recommendation else None,
            "trainable_params": counts.trainable_params,
            "total_params": counts.total_params,
        },
        "resumed_from": resumed_from,
        "world_size": args.world_size,
        "written_by_process": args.process_index,
        "arguments": arguments or {},
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def write_summary(summary: dict[str, Any], output_dir: str | os.PathLike) -> Path:
    """``summary`` as ``output_dir/training_summary.json`` (numpy numbers as numbers, other objects as text).

    >>> import tempfile
    >>> write_summary({"eval": {"eval_loss": np.float32(0.5)}}, tempfile.mkdtemp()).read_text()
    '{\\n  "eval": {\\n    "eval_loss": 0.5\\n  }\\n}'
    """
    path = Path(output_dir) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, default=_jsonable))
    return path


def describe_results(summary: dict[str, Any], output_dir: str | os.PathLike) -> str:
    """The results as the recipe prints them: per task its metrics beside the baselines, then the files in ``output_dir``."""
    out = Path(output_dir)
    tasks = summary["tasks"]
    lines = ["", f"== Results on the validation split ({summary['data']['validation_rows']} rows) =="]
    width = max(len(t["name"]) for t in tasks)
    for task in tasks:
        values = summary["per_task"].get(task["name"], {})
        baseline = summary["baselines"].get(task["name"], {})
        shown = []
        for metric, value in values.items():
            if metric == "loss" or not isinstance(value, (int, float)) or math.isnan(value):
                continue
            text = f"{metric} {value:.3f}"
            if metric in baseline:
                text += f" (baseline {baseline[metric]:.3f})"
            shown.append(text)
        lines.append(f"  {task['name']:<{width}}  {task['type']:<14}  " + (", ".join(shown) or "no metrics"))
    if "eval_loss" in summary["eval"]:
        lines.append(f"  overall eval loss {summary['eval']['eval_loss']:.4f}")
    lines.append("  (baseline: a model that ignores the image: majority class, training mean, label frequency)")
    lines.append("")
    lines.append(f"Files in {out.resolve()}:")
    lines.append("  config.json, model.safetensors    the model: import hf_tlmtl; transformers.AutoModel.from_pretrained(dir)")
    lines.append("  preprocessor_config.json          its preprocessing (AutoImageProcessor)")
    lines.append(f"  {SUMMARY_FILE:<32}  arguments, data, transfer plan, per-task metrics and baselines")
    lines.append(f"  {CURVES_FILE:<32}  training loss and evaluation metrics per task")
    if (out / CARD_FILE).is_file():
        lines.append(f"  {CARD_FILE:<32}  model card")
    if (out / ADAPTER_DIR).is_dir():
        lines.append(f"  {ADAPTER_DIR + '/':<32}  the peft adapter alone (the model above has it merged)")
    if complete_checkpoints(out):
        lines.append(f"  {PREFIX_CHECKPOINT_DIR}-*{'':<21}  resume with --resume_from_checkpoint true")
    lines.append(f"Predict: python recipes/predict.py --model {out} --data IMAGES_OR_TABLE --output predictions.csv")
    return "\n".join(lines)


__all__ = ["describe_results", "per_task_metrics", "training_summary", "write_summary"]
