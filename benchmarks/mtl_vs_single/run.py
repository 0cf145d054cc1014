"""Multi-task vs single-task: one shared backbone against one model per task, same budget.

    python benchmarks/mtl_vs_single/run.py [benchmarks/mtl_vs_single/config.yaml] [--key value ...]

On the embedded ``shapes`` dataset (offline), trains one multi-task model per balancing method
in ``--balancing_methods`` and one single-task model per task, all from the same backbone
initialisation (same seed) with the same optimiser, batch size, epochs and data. It reports per
task the main metric (accuracy / mAP / MAE), ``delta_m`` of each multi-task model against the
single-task models (%, higher is better), parameters, training time and inference time (one
shared backbone vs N backbones, median of ``--timing_repeats`` forwards of one eval batch).

Writes ``results.json`` (every metric) and ``results.md`` (the table) into ``--output_dir``; the shipped
runs are beside this file. One run's arguments and its training are :mod:`hf_tlmtl.training.experiment`'s.
Bad input (unknown task or method, an existing result without ``--overwrite_output_dir true``)
stops with exit code 2 and a one-line reason before anything is trained.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_tlmtl import TaskSpec
from hf_tlmtl.multitask.balancing import BALANCERS
from hf_tlmtl.training.cli import UsageError, parse_experiment_argv, run_or_exit
from hf_tlmtl.data import prepare_dataset
from hf_tlmtl.data.embedded import SHAPES_FEATURES, load_embedded_dataset
from hf_tlmtl.multitask.metrics import LOWER_IS_BETTER, MAIN_METRIC, delta_m
from hf_tlmtl.data import infer_tasks
from hf_tlmtl.training import MultiTaskTrainingArguments
from hf_tlmtl.training.experiment import train_and_evaluate, training_arguments


@dataclass
class ExperimentArguments:
    backbone: str = field(default="test_resnet", metadata={"help": "timm model shared by every run (random init)."})
    image_size: int = field(default=48, metadata={"help": "Side of the generated shapes images, in pixels."})
    n_train: int = field(default=2000, metadata={"help": "Training images."})
    n_eval: int = field(default=500, metadata={"help": "Validation images."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the generated dataset."})
    tasks: str = field(default="shape,scale,rotation,marks", metadata={"help": "Comma-separated shapes columns, 3 or more."})
    balancing_methods: str = field(
        default="static", metadata={"help": f"Comma-separated loss_balancing of the multi-task runs: {sorted(BALANCERS)}."}
    )
    inference_batch_size: int = field(default=64, metadata={"help": "Images per timed forward."})
    timing_repeats: int = field(default=20, metadata={"help": "Timed forwards per model (the median is reported)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (None: torch's default)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing results.json."})


def parse_arguments(argv: list[str]) -> tuple[ExperimentArguments, list[str], Path]:
    """``[CONFIG.yaml] [--key value ...]`` (command line over YAML over defaults): the experiment
    arguments, the ``MultiTaskTrainingArguments`` argv every run parses, and the output folder."""
    experiment, training_argv, output_dir = parse_experiment_argv(
        argv, ExperimentArguments, MultiTaskTrainingArguments, output_dir="outputs/mtl_vs_single"
    )
    training_arguments(training_argv, output_dir, "static")  # fail early on bad training arguments
    return experiment, training_argv, output_dir


def check_arguments(experiment: ExperimentArguments, output_dir: Path, columns: list[str]) -> tuple[list[str], list[str]]:
    task_names = [t.strip() for t in experiment.tasks.split(",") if t.strip()]
    methods = [m.strip() for m in experiment.balancing_methods.split(",") if m.strip()]
    unknown = sorted(set(task_names) - set(columns) - {"image"})
    if unknown or len(task_names) < 3:
        raise UsageError(f"--tasks needs 3 or more of {[c for c in columns if c != 'image']}, got {task_names}")
    bad = sorted(set(methods) - set(BALANCERS))
    if bad or not methods:
        raise UsageError(f"--balancing_methods: unknown {bad}; valid: {sorted(BALANCERS)}")
    if (output_dir / "results.json").exists() and not experiment.overwrite_output_dir:
        raise UsageError(f"{output_dir}/results.json exists; pass --overwrite_output_dir true to replace it")
    return task_names, methods


@torch.no_grad()
def median_forward_ms(models: dict[str, torch.nn.Module], pixel_values: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward time of each model on one batch, measured in interleaved rounds so that
    load changes on the machine hit every model alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        model(pixel_values=pixel_values)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(pixel_values=pixel_values)
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def markdown_table(tasks: list[TaskSpec], single: dict[str, Any], multi: dict[str, Any], experiment: ExperimentArguments) -> str:
    arrows = {t.name: "↓" if MAIN_METRIC[t.type] in LOWER_IS_BETTER else "↑" for t in tasks}
    header = ["setup", "backbones", "params", "train s", f"infer ms / {experiment.inference_batch_size} img"]
    header += [f"{t.name} {MAIN_METRIC[t.type]} {arrows[t.name]}" for t in tasks] + ["Δm % ↑"]
    rows = [header, ["---"] * len(header)]
    rows.append(
        [f"single-task ×{len(tasks)}", str(len(tasks)), f"{sum(r['params'] for r in single.values()):,}",
         f"{sum(r['train_seconds'] for r in single.values()):.0f}", f"{sum(r['inference_ms'] for r in single.values()):.1f}"]
        + [f"{single[t.name]['metrics'][f'{t.name}_{MAIN_METRIC[t.type]}']:.3f}" for t in tasks]
        + ["0 (reference)"]
    )
    for method, result in multi.items():
        rows.append(
            [f"multi-task, {method}", "1", f"{result['params']:,}", f"{result['train_seconds']:.0f}", f"{result['inference_ms']:.1f}"]
            + [f"{result['metrics'][f'{t.name}_{MAIN_METRIC[t.type]}']:.3f}" for t in tasks]
            + [f"{result['delta_m']:+.1f}"]
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def main(argv: list[str]) -> dict[str, Any]:
    experiment, training_argv, output_dir = parse_arguments(argv)
    task_names, methods = check_arguments(experiment, output_dir, list(SHAPES_FEATURES))
    data = load_embedded_dataset(
        "shapes", n_train=experiment.n_train, n_eval=experiment.n_eval, seed=experiment.data_seed, image_size=experiment.image_size
    )
    if experiment.num_threads:
        torch.set_num_threads(experiment.num_threads)
    tasks = infer_tasks(data["train"].features, names=task_names)

    single = {}
    for task in tasks:
        print(f"== single-task: {task.name}", flush=True)
        args = training_arguments(training_argv, output_dir / f"single_{task.name}", "static")
        single[task.name] = train_and_evaluate(experiment.backbone, [task], data, args, image_size=experiment.image_size)
    baselines = {t.name: single[t.name]["metrics"][f"{t.name}_{MAIN_METRIC[t.type]}"] for t in tasks}
    multi = {}
    for method in methods:
        print(f"== multi-task: {method}", flush=True)
        args = training_arguments(training_argv, output_dir / f"multi_{method}", method)
        multi[method] = train_and_evaluate(experiment.backbone, tasks, data, args, image_size=experiment.image_size)
        multi[method]["delta_m"] = delta_m(multi[method]["metrics"], baselines, tasks)

    eval_rows = data["validation"].select(range(min(experiment.inference_batch_size, data["validation"].num_rows)))
    pixel_values = torch.stack([row["pixel_values"] for row in prepare_dataset(eval_rows, single[tasks[0].name]["model"].config, train=False)])
    runs = {**{f"single_{k}": v for k, v in single.items()}, **{f"multi_{k}": v for k, v in multi.items()}}
    timings = median_forward_ms({name: run.pop("model") for name, run in runs.items()}, pixel_values, experiment.timing_repeats)
    for name, run in runs.items():
        run["inference_ms"] = timings[name]
    table = markdown_table(tasks, single, multi, experiment)
    results = {"experiment": vars(experiment), "training_argv": training_argv, "single": single, "multi": multi}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (output_dir / "results.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    run_or_exit(main, sys.argv[1:])
