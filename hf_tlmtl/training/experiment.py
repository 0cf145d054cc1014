"""One model trained and evaluated for an experiment that compares training setups.

What the experiments that train many small models side by side share (``benchmarks/mtl_vs_single/run.py``:
multi-task vs single-task; ``recipes/task_groups.py``: which tasks share a backbone): the training arguments of
one run from the experiment's shared argv, and one (multi-)task model trained on the tasks given, then evaluated.

Example:
    >>> import tempfile
    >>> from hf_tlmtl.data.embedded import load_embedded_dataset
    >>> from hf_tlmtl.data import infer_tasks
    >>> data = load_embedded_dataset("shapes", n_train=16, n_eval=8, image_size=32)
    >>> tasks = infer_tasks(data["train"].features, names=["shape", "scale"])
    >>> shared = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none", "--use_cpu", "true"]
    >>> args = training_arguments(shared, tempfile.mkdtemp(), loss_balancing="static")
    >>> run = train_and_evaluate("test_resnet", tasks, data, args, image_size=32)  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> sorted(run), run["model"].training
    (['metrics', 'model', 'params', 'train_seconds'], False)
    >>> sorted(k for k in run["metrics"] if k.startswith(("shape_", "scale_")))
    ['scale_mae', 'scale_r2', 'scale_rmse', 'shape_accuracy', 'shape_macro_f1']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import set_seed

from ..data import MultiTaskCollator, prepare_dataset
from ..modeling import TimmMultiTaskModel
from ..tasks import TaskSpec
from .arguments import MultiTaskTrainingArguments
from .cli import build_parser
from .trainer import MultiTaskTrainer


def training_arguments(training_argv: list[str], output_dir: str | Path, loss_balancing: str) -> MultiTaskTrainingArguments:
    """The experiment's shared ``training_argv`` as one run's :class:`MultiTaskTrainingArguments`: its output
    folder, its ``loss_balancing`` and no checkpoints (an experiment keeps metrics, not models)."""
    (args,) = build_parser(MultiTaskTrainingArguments).parse_args_into_dataclasses(
        args=training_argv + ["--output_dir", str(output_dir), "--loss_balancing", loss_balancing, "--save_strategy", "no"]
    )
    return args


def train_and_evaluate(
    backbone: str, tasks: list[TaskSpec], data: Any, args: MultiTaskTrainingArguments, image_size: int
) -> dict[str, Any]:
    """Train one model on ``tasks`` and evaluate it on ``data["validation"]``.

    The model is ``backbone`` (timm, random init) with one head per task, built after ``set_seed(args.seed)``,
    so runs with the same seed start from the same weights. Images go through the deterministic eval transform
    for training too: crops, flips and colour jitter would change labels such as scale or colour.

    Args:
        backbone: timm model name.
        tasks: The tasks of this model (one for a single-task model); ``data`` has their columns and ``image``.
        data: A ``DatasetDict`` with ``train`` and ``validation`` splits.
        args: The run's training arguments (e.g. from :func:`training_arguments`).
        image_size: Input side in pixels.

    Returns:
        ``{"model": the trained model in eval mode, "metrics": the evaluation metrics without their "eval_"
        prefix, "params": its parameter count, "train_seconds": the Trainer's train_runtime}``.
    """
    set_seed(args.seed)
    model = TimmMultiTaskModel.from_backbone(backbone, tasks, image_size=image_size)
    columns = ["image"] + [t.source_column for t in tasks]
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        # Deterministic transform: crops, flips and colour jitter would change the scale / colour labels.
        train_dataset=prepare_dataset(data["train"].select_columns(columns), model.config, train=False),
        eval_dataset=prepare_dataset(data["validation"].select_columns(columns), model.config, train=False),
        data_collator=MultiTaskCollator(tasks),
    )
    train_output = trainer.train()
    metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}
    return {
        "model": model.eval(),
        "metrics": metrics,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_output.metrics["train_runtime"],
    }
