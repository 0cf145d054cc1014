"""Cost of measuring task affinity: a short MultiTaskTrainer run with and without TaskAffinityCallback.

Same model initialisation, data, batch and steps; for each number of tasks, runs without and with the
callback alternate (interleaved repetitions, so load on a shared machine hits both alike); the median
train_runtime ratio is the overhead. The section in benchmarks/RESULTS.md is rewritten.

    python benchmarks/affinity_cost.py [--steps 100] [--every 10,20] [--reps 3] [--tasks 2,5,8]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path
import tempfile

import torch
import transformers
from transformers import set_seed

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.affinity import TaskAffinityCallback
from hf_tlmtl.data import prepare_dataset
from hf_tlmtl.embedded import load_embedded_dataset
from hf_tlmtl.sources import infer_tasks
from hf_tlmtl.trainer import MultiTaskTrainer, MultiTaskTrainingArguments
from results_md import write_section  # benchmarks/ is on sys.path when run as a script

COLUMNS = ["shape", "color", "scale", "rotation", "pos_x", "pos_y", "marks"]


def task_set(features, count: int) -> list[TaskSpec]:
    """``count`` tasks from the shapes columns; past the 7 columns, extra regression heads on pos_x / pos_y."""
    tasks = infer_tasks(features, names=COLUMNS[: min(count, len(COLUMNS))])
    for extra in range(count - len(tasks)):
        column = COLUMNS[4 + extra % 2]
        tasks.append(TaskSpec(name=f"{column}_{extra}", type="regression", column=column))
    return tasks


def run(tasks, data, args: argparse.Namespace, every: int | None, folder: str) -> float:
    """``train_runtime`` of one short run, with the callback measuring every ``every`` steps (None: without)."""
    set_seed(0)
    model = TimmMultiTaskModel.from_backbone(args.backbone, tasks, image_size=args.size)
    training = MultiTaskTrainingArguments(
        output_dir=folder, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=0.01,
        warmup_steps=5, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10**6, use_cpu=True,
        seed=0, dataloader_num_workers=0,
    )
    callbacks = [TaskAffinityCallback(every_n_steps=every, plot=False)] if every else []
    trainer = MultiTaskTrainer(
        model=model, args=training, callbacks=callbacks,
        train_dataset=prepare_dataset(data, model.config, train=False),
    )
    return float(trainer.train().metrics["train_runtime"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", default="10,20", help="comma-separated every_n_steps to measure")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tasks", default="2,5,8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_embedded_dataset("shapes", n_train=1024, n_eval=8, image_size=args.size, seed=0)["train"]
    counts = [int(c) for c in args.tasks.split(",")]
    everies = [int(e) for e in args.every.split(",")]
    variants = [None, *everies]
    times: dict[tuple[int, int | None], list[float]] = {(c, e): [] for c in counts for e in variants}
    with tempfile.TemporaryDirectory() as folder:
        for rep in range(args.reps):
            for count in counts:
                tasks = task_set(data.features, count)
                for every in variants if rep % 2 == 0 else reversed(variants):
                    times[(count, every)].append(run(tasks, data, args, every, folder))
                    print(count, every, times[(count, every)][-1], flush=True)
    lines = [
        f"## Task affinity measurement cost ({args.backbone}, batch {args.batch}, {args.size}px, {args.steps} steps)",
        "",
        f"Device: CPU ({platform.processor() or platform.machine()}, {args.threads} torch thread(s)); torch {torch.__version__}, "
        f"transformers {transformers.__version__}. `benchmarks/affinity_cost.py`: a {args.steps}-step MultiTaskTrainer run "
        f"on embedded shapes without and with `TaskAffinityCallback(every_n_steps=N)` for N in {everies} (lookahead + "
        f"cosine on a {args.batch}-row batch per measurement), same initialisation and data; {args.reps} interleaved repetitions, "
        f"median `train_runtime`; 1-min load average at the end {os.getloadavg()[0]:.1f} (other jobs share the cores).",
        "",
        "| tasks | every N steps | without (s) | with affinity (s) | overhead | overhead per task |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for count in counts:
        without = statistics.median(times[(count, None)])
        for every in everies:
            with_ = statistics.median(times[(count, every)])
            overhead = with_ / without - 1
            lines.append(
                f"| {count} | {every} | {without:.2f} | {with_:.2f} | {100 * overhead:+.1f}% | {100 * overhead / count:+.1f}% |"
            )
    raw = {f"{c} tasks, {'without' if e is None else f'every {e}'}": [round(t, 2) for t in v] for (c, e), v in times.items()}
    lines += [
        "",
        "Target: at most +30%. One measurement costs a forward with graph, one backward per task and one forward "
        "per task, so the overhead grows linearly with the number of tasks T, about T / every_n_steps training "
        f"steps' worth; raw times (s): {raw}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_section(text, Path(args.results))


if __name__ == "__main__":
    main()
