"""Which tasks should share a backbone? Measure task affinity, propose groupings, train them, compare Δm.

    python recipes/task_groups.py [recipes/configs/task_groups.yaml] [--key value ...]

Per seed in ``--seeds`` (each seed: its own model initialisation and batch order; the data are fixed):

1. A short shared run of all ``--tasks`` (``--affinity_steps`` steps) with
   :class:`~hf_tlmtl.multitask.TaskAffinityCallback` measures the lookahead affinity ``Z(i -> j)``
   (TAG, Fifty et al. 2021) and the gradient cosine; both matrices are written with a heatmap.
2. :func:`~hf_tlmtl.multitask.group_tasks` proposes the best grouping into exactly ``k`` groups for
   ``k = 1 .. --max_groups`` (``k = 1`` is all tasks on one backbone; ``k = T`` every task alone).
3. Every group of every proposal is trained as one multi-task model, at equal total compute: a group of
   ``g`` of the ``T`` tasks trains ``round(--total_steps * g / T)`` steps, so each grouping spends
   ``--total_steps`` backbone steps in all, whatever its number of backbones. A group that several
   proposals share is trained once. The single-task models (``T`` steps shares of one task each) are
   the Δm reference, so "all separate" scores Δm = 0 by construction.
4. Δm of each grouping against the single-task models (:func:`hf_tlmtl.multitask.metrics.delta_m`), per seed and
   as mean ± std over seeds.

Writes ``results.json`` (every matrix, grouping and metric, the wall times), ``results.md`` (the
tables), per seed ``seed<N>/task_affinity.{json,png}``, and ``task_affinity.png`` (the seed-mean matrices) into
``--output_dir``. Bad input (unknown tasks, fewer than two, ``--max_groups`` above the number of tasks,
an existing result without ``--overwrite_output_dir true``) stops with exit code 2 and a one-line
reason before anything is trained.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import set_seed

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.multitask import AffinityMatrix, TaskAffinityCallback, group_tasks, plot_affinity
from hf_tlmtl.training.cli import UsageError, parse_experiment_argv, run_or_exit
from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
from hf_tlmtl.data.embedded import load_embedded_dataset
from hf_tlmtl.multitask.metrics import LOWER_IS_BETTER, MAIN_METRIC, delta_m
from hf_tlmtl.data import infer_tasks
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from hf_tlmtl.training.experiment import train_and_evaluate, training_arguments

RESERVED = {
    "max_steps": "--max_steps is set per group from --total_steps (and --affinity_steps for the affinity run)",
    "seed": "--seed is set per run from --seeds (e.g. --seeds 0,1,2)",
    "num_train_epochs": "the runs are sized in steps: set --total_steps and --affinity_steps instead of --num_train_epochs",
}


@dataclass
class ExperimentArguments:
    backbone: str = field(default="test_resnet", metadata={"help": "timm model of every run (random init)."})
    dataset: str = field(default="shapes", metadata={"help": "Embedded dataset: shapes or shapes_affinity."})
    image_size: int = field(default=32, metadata={"help": "Side of the generated images, in pixels."})
    n_train: int = field(default=2000, metadata={"help": "Training images."})
    n_eval: int = field(default=500, metadata={"help": "Validation images."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the generated dataset."})
    tasks: str = field(default="shape,color,scale,rotation,marks", metadata={"help": "Comma-separated columns, 2 or more."})
    seeds: str = field(default="0,1,2", metadata={"help": "Comma-separated seeds (model init and batch order)."})
    affinity_steps: int = field(default=150, metadata={"help": "Steps of the shared run that measures affinity."})
    affinity_every: int = field(default=10, metadata={"help": "Measure affinity every N steps of that run."})
    affinity_start: int = field(default=30, metadata={"help": "First step measured (the first steps fit the heads' biases)."})
    lookahead_step: str = field(default="sgd", metadata={"help": "sgd (TAG) or equal (same step length per task)."})
    max_groups: int | None = field(default=None, metadata={"help": "Propose k = 1 .. max_groups groups (None: number of tasks)."})
    total_steps: int = field(default=500, metadata={"help": "Backbone steps of each grouping in all (split by group size)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (None: torch's default)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing results.json."})


def parse_arguments(argv: list[str]) -> tuple[ExperimentArguments, list[str], Path]:
    experiment, training_argv, output_dir = parse_experiment_argv(
        argv, ExperimentArguments, MultiTaskTrainingArguments, output_dir="outputs/task_groups", reserved=RESERVED
    )
    training_arguments(training_argv, output_dir, "static")  # fail early on bad training arguments
    return experiment, training_argv, output_dir


def check_arguments(experiment: ExperimentArguments, output_dir: Path, columns: list[str]) -> tuple[list[str], list[int], int]:
    task_names = [t.strip() for t in experiment.tasks.split(",") if t.strip()]
    unknown = sorted(set(task_names) - set(columns) - {"image"})
    if unknown or len(task_names) < 2 or len(set(task_names)) != len(task_names):
        raise UsageError(
            f"--tasks needs 2 or more different columns of {experiment.dataset}: {[c for c in columns if c != 'image']}; "
            f"got {task_names}"
        )
    try:
        seeds = [int(s) for s in experiment.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds takes comma-separated integers, got {experiment.seeds!r}") from None
    if not seeds:
        raise UsageError("--seeds needs at least one seed, e.g. --seeds 0,1,2")
    max_groups = len(task_names) if experiment.max_groups is None else experiment.max_groups
    if not 1 <= max_groups <= len(task_names):
        raise UsageError(
            f"--max_groups {max_groups} must be from 1 to the number of tasks ({len(task_names)}: {task_names}); "
            f"{len(task_names)} groups already give every task its own backbone"
        )
    for name in ("affinity_steps", "affinity_every", "total_steps"):
        if getattr(experiment, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(experiment, name)}")
    if experiment.total_steps < len(task_names):
        raise UsageError(f"--total_steps {experiment.total_steps} leaves a single-task model under one step; use >= {len(task_names)}")
    first = max(experiment.affinity_every, -(-experiment.affinity_start // experiment.affinity_every) * experiment.affinity_every)
    if first > experiment.affinity_steps:
        raise UsageError(
            f"no affinity measurement fits: --affinity_start {experiment.affinity_start} / --affinity_every "
            f"{experiment.affinity_every} first measure at step {first}, after --affinity_steps {experiment.affinity_steps}"
        )
    if (output_dir / "results.json").exists() and not experiment.overwrite_output_dir:
        raise UsageError(f"{output_dir}/results.json exists; pass --overwrite_output_dir true to replace it")
    return task_names, seeds, max_groups


def measure(experiment: ExperimentArguments, tasks: list[TaskSpec], data: Any, args: MultiTaskTrainingArguments) -> AffinityMatrix:
    """The short shared run of all tasks with the affinity callback; its matrices."""
    set_seed(args.seed)
    model = TimmMultiTaskModel.from_backbone(experiment.backbone, tasks, image_size=experiment.image_size)
    columns = ["image"] + [t.source_column for t in tasks]
    callback = TaskAffinityCallback(
        every_n_steps=experiment.affinity_every, start_step=experiment.affinity_start,
        lookahead_step=experiment.lookahead_step, seed=args.seed, plot=False,
    )
    trainer = MultiTaskTrainer(
        model=model, args=args, callbacks=[callback], data_collator=MultiTaskCollator(tasks),
        train_dataset=prepare_dataset(data["train"].select_columns(columns), model.config, train=False),
    )
    trainer.train()
    return callback.result()


def group_steps(total_steps: int, group_size: int, num_tasks: int) -> int:
    """Steps of a group's model: its share of the grouping's total compute (at least one)."""
    return max(1, round(total_steps * group_size / num_tasks))


def run_seed(
    experiment: ExperimentArguments, tasks: list[TaskSpec], data: Any, training_argv: list[str],
    out: Path, seed: int, max_groups: int,
) -> dict[str, Any]:
    seed_argv = training_argv + ["--seed", str(seed)]
    started = time.perf_counter()
    args = training_arguments(seed_argv + ["--max_steps", str(experiment.affinity_steps)], out / "affinity", "static")
    affinity = measure(experiment, tasks, data, args)
    affinity_seconds = time.perf_counter() - started
    plot_affinity(affinity, out / "task_affinity.png", title=f"seed {seed}")
    (out / "task_affinity.json").write_text(json.dumps(affinity.to_dict(), indent=2))

    by_name = {t.name: t for t in tasks}
    proposals = {}
    for k in range(1, max_groups + 1):
        grouping = group_tasks(affinity, max_groups=k, min_groups=k)
        proposals[k] = {"groups": [list(g) for g in grouping.groups], "score": grouping.score, "exact": grouping.exact}
    # Every group of every proposal, plus the single-task references, trained once each.
    groups = {tuple(g) for p in proposals.values() for g in p["groups"]} | {(t.name,) for t in tasks}
    trained = {}
    for group in sorted(groups, key=lambda g: (len(g), g)):
        steps = group_steps(experiment.total_steps, len(group), len(tasks))
        print(f"== seed {seed}: {'+'.join(group)} ({steps} steps)", flush=True)
        args = training_arguments(seed_argv + ["--max_steps", str(steps)], out / "_".join(group), "static")
        run = train_and_evaluate(experiment.backbone, [by_name[n] for n in group], data, args, image_size=experiment.image_size)
        run.pop("model")
        trained["+".join(group)] = {"steps": steps, **run}
    baselines = {t.name: trained[t.name]["metrics"][f"{t.name}_{MAIN_METRIC[t.type]}"] for t in tasks}
    for proposal in proposals.values():
        proposal["metrics"] = {}
        for group in proposal["groups"]:
            for name in group:
                key = f"{name}_{MAIN_METRIC[by_name[name].type]}"
                proposal["metrics"][key] = trained["+".join(group)]["metrics"][key]
        proposal["delta_m"] = delta_m(proposal["metrics"], baselines, tasks)
        proposal["train_seconds"] = sum(trained["+".join(g)]["train_seconds"] for g in proposal["groups"])
    return {
        "affinity": affinity.to_dict(), "affinity_seconds": affinity_seconds, "proposals": proposals,
        "runs": trained, "baselines": baselines, "seconds": time.perf_counter() - started,
    }


def _label(groups: list[list[str]]) -> str:
    return " ".join("[" + "+".join(g) + "]" for g in groups)


def markdown_table(tasks: list[TaskSpec], results: dict[str, Any], max_groups: int) -> str:
    seeds = list(results["seeds"])
    arrows = {t.name: "↓" if MAIN_METRIC[t.type] in LOWER_IS_BETTER else "↑" for t in tasks}
    header = ["k (backbones)", *[f"seed {s}: grouping" for s in seeds], *[f"Δm % seed {s}" for s in seeds], "Δm % mean ± std"]
    rows = [header, ["---"] * len(header)]
    for k in range(1, max_groups + 1):
        values = [results["seeds"][s]["proposals"][k]["delta_m"] for s in seeds]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(
            [str(k)] + [_label(results["seeds"][s]["proposals"][k]["groups"]) for s in seeds]
            + [f"{v:+.2f}" for v in values] + [f"{statistics.mean(values):+.2f} ± {spread:.2f}"]
        )
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows)
    metric_header = ["k", *[f"{t.name} {MAIN_METRIC[t.type]} {arrows[t.name]}" for t in tasks]]
    metric_rows = [metric_header, ["---"] * len(metric_header)]
    for k in range(1, max_groups + 1):
        means = [
            statistics.mean(results["seeds"][s]["proposals"][k]["metrics"][f"{t.name}_{MAIN_METRIC[t.type]}"] for s in seeds)
            for t in tasks
        ]
        metric_rows.append([str(k)] + [f"{m:.3f}" for m in means])
    metrics_table = "\n".join("| " + " | ".join(r) + " |" for r in metric_rows)
    return f"{table}\n\nMain metric per task, mean over seeds:\n\n{metrics_table}\n"


def mean_matrix(results: dict[str, Any]) -> AffinityMatrix:
    matrices = [AffinityMatrix.from_dict(r["affinity"]) for r in results["seeds"].values()]
    return AffinityMatrix(
        tasks=matrices[0].tasks,
        lookahead=np.mean([m.lookahead for m in matrices], axis=0),
        cosine=np.mean([m.cosine for m in matrices], axis=0),
        measurements=sum(m.measurements for m in matrices),
        lookahead_step=matrices[0].lookahead_step,
    )


def main(argv: list[str]) -> dict[str, Any]:
    experiment, training_argv, output_dir = parse_arguments(argv)
    if experiment.dataset not in ("shapes", "shapes_affinity"):
        raise UsageError(f"--dataset must be shapes or shapes_affinity, got {experiment.dataset!r}")
    data = load_embedded_dataset(
        experiment.dataset, n_train=experiment.n_train, n_eval=experiment.n_eval, seed=experiment.data_seed,
        image_size=experiment.image_size,
    )
    task_names, seeds, max_groups = check_arguments(experiment, output_dir, list(data["train"].column_names))
    if experiment.num_threads:
        torch.set_num_threads(experiment.num_threads)
    tasks = infer_tasks(data["train"].features, names=task_names)
    started = time.perf_counter()
    results: dict[str, Any] = {"experiment": vars(experiment), "training_argv": training_argv, "seeds": {}}
    for seed in seeds:
        folder = output_dir / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        results["seeds"][seed] = run_seed(experiment, tasks, data, training_argv, folder, seed, max_groups)
    results["wall_seconds"] = time.perf_counter() - started
    mean = mean_matrix(results)
    results["mean_affinity"] = mean.to_dict()
    results["mean_affinity_grouping"] = {
        k: [list(g) for g in group_tasks(mean, max_groups=k, min_groups=k).groups] for k in range(1, max_groups + 1)
    }
    plot_affinity(mean, output_dir / "task_affinity.png", title=f"mean of {len(seeds)} seeds")
    table = markdown_table(tasks, results, max_groups)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (output_dir / "results.md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    run_or_exit(main, sys.argv[1:])
