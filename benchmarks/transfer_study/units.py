"""One unit of the study, the transferability scores and then every contender on one (source, target, size, seed):
:func:`transferability_scores` (frozen features, nothing trains), :func:`run_once` (one contender trained and
evaluated), :func:`study_units` and :func:`run_unit`; and :func:`assemble_cases`, the per-case records built
from the units' outcomes. ``run.py`` runs the units, in one process or several.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, load_from_disk
from transformers import set_seed

from hf_tlmtl import TimmMultiTaskModel, transferability
from hf_tlmtl.data import MultiTaskCollator, build_transforms, prepare_dataset
from hf_tlmtl.multitask.metrics import MAIN_METRIC
from hf_tlmtl.training import MultiTaskTrainer
from hf_tlmtl.transferability import score_transferability
from hf_tlmtl.transferability.similarity import random_init_copy
from transfer_study.arguments import DECLARED_SIMILAR, SCORE_METHODS, StudyArguments, training_arguments
from transfer_study.inputs import Source, Target, on_disk, training_subset, transfer_model


# ---------------------------------------------------------------------------------- scores
def transferability_scores(
    study: StudyArguments, source: Source, target: Target, train: Dataset, cache_dir: Path
) -> dict[str, Any]:
    """Every score of the frozen source features (and of random features of its architecture) on ``train``,
    plus the measured similarity: nothing here trains."""
    model = transfer_model(study, source, target.task)
    if source.classifier is not None:
        model.source_classifier = source.classifier
    tasks = [target.task]
    started = time.perf_counter()
    measurement = transferability.measure_similarity(model, train, tasks, cache_dir=str(cache_dir), image_column=study.image_column)
    scores: dict[str, Any] = {"source": {}, "random": {"logme": measurement.random_score}}
    for method in SCORE_METHODS:
        if method == "leep" and source.classifier is None and source.source_task is None:
            continue
        if method == "leep" and source.saved:
            scorer, source_task = TimmMultiTaskModel.from_pretrained(source.spec), source.source_task
        else:
            scorer, source_task = model, None
        scores["source"][method] = score_transferability(
            scorer, train, tasks, method, cache_dir=str(cache_dir), image_column=study.image_column, source_task=source_task
        )[target.task.name]
    random_model = random_init_copy(model, seed=0)
    scores["random"]["h_score"] = score_transferability(random_model, train, tasks, "h_score", cache_dir=str(cache_dir), image_column=study.image_column)[target.task.name]
    scores["measurement"] = asdict(measurement)
    scores["seconds"] = time.perf_counter() - started
    return scores


# -------------------------------------------------------------------------------------- runs
_MATERIALIZED: dict[tuple[str, str], list[dict[str, Any]]] = {}
"""Per process: prepared rows by (dataset fingerprint, transform), reused by every contender and seed."""


def materialized(prepared: Dataset, config: Any, study: StudyArguments) -> list[dict[str, Any]]:
    """The rows of ``prepared`` (``prepare_dataset(..., train=False)``: deterministic, no augmentation) read once
    and kept in memory, so that the contenders of a unit and the units of a worker do not decode and resize the
    same images again (about a tenth of the study's time). A list of rows is a map-style dataset for the
    Trainer: same length, same sampler order, same tensors as ``prepared`` itself."""
    key = (prepared._fingerprint, repr(build_transforms(config, train=False)))
    if key not in _MATERIALIZED:
        if len(_MATERIALIZED) > 16:  # a few splits x architectures; bound the memory of long runs
            _MATERIALIZED.pop(next(iter(_MATERIALIZED)))
        _MATERIALIZED[key] = [prepared[i] for i in range(prepared.num_rows)]
    return _MATERIALIZED[key]


def run_once(
    study: StudyArguments,
    contender: str,
    source: Source,
    target: Target,
    train: Dataset,
    steps: int,
    seed: int,
    training_argv: list[str],
    output_dir: Path,
    contender_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one contender on one training subset; evaluate on the target's validation split.

    ``contender_args`` replace :func:`~transfer_study.arguments.contender_arguments` (other studies' variants, e.g. a BatchNorm
    policy). ``wall_seconds`` covers building the model, applying the strategy (feature caching
    included) and training; evaluation is left out.
    """
    args = training_arguments(training_argv, output_dir, seed, steps, contender, study, contender_args)
    start = time.perf_counter()
    set_seed(seed)
    if contender == "scratch":
        name, timm_kwargs = source.architecture
        model = TimmMultiTaskModel.from_backbone(name, [target.task], pretrained=False, image_size=study.image_size, **timm_kwargs)
    else:
        model = transfer_model(study, source, target.task)
    if study.channels_last:
        model = model.to(memory_format=torch.channels_last)
    prepared = prepare_dataset(train, model.config, train=False, image_column=study.image_column)
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        # feature_extraction caches backbone features from the images; every other contender reads tensors.
        train_dataset=prepared if args.cache_features else materialized(prepared, model.config, study),
        data_collator=MultiTaskCollator(model.tasks),
    )
    trainer.train()
    wall_seconds = time.perf_counter() - start
    # The images go through the (frozen, for feature_extraction) backbone: the same features the cache holds.
    evaluation = materialized(prepare_dataset(target.validation, model.config, train=False, image_column=study.image_column), model.config, study)
    metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate(eval_dataset=evaluation).items()}
    summary = trainer.transfer_summary
    return {
        "seed": seed,
        "metric": metrics[f"target_{MAIN_METRIC[target.task.type]}"],
        "metrics": metrics,
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
        "wall_seconds": wall_seconds,
        "steps": trainer.state.global_step,
    }


# ------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class Unit:
    """One independent piece of the study: the scores and every contender on one (source, target, size, seed)."""

    source: str
    target: str
    size: str
    n_train: int
    steps: int
    seed: int
    train_path: str  # the seed's training subset, written once by the main process and shared by both sources


@dataclass
class UnitContext:
    """What every unit needs; sent once to each worker process (datasets travel as their memory-mapped files)."""

    study: StudyArguments
    training_argv: list[str]
    output_dir: Path
    contenders: list[str]
    sources: list[Source]
    targets: list[Target]


SIZES = ("small", "large")


def study_units(study: StudyArguments, sources: list[Source], targets: list[Target], seeds: list[int], output_dir: Path) -> list[Unit]:
    """Every (source, target, size, seed) in report order; each training subset written to disk once."""
    sizes = {"small": (study.small_size, study.small_steps), "large": (study.large_size, study.large_steps)}
    paths = {}
    for target in targets:
        for size in SIZES:
            for seed in seeds:
                folder = output_dir / "data" / target.name / f"{size}-seed{seed}"  # feature caches go beside it
                on_disk(training_subset(target.train, target.task, sizes[size][0], seed), folder)
                paths[target.name, size, seed] = str(folder)
    return [
        Unit(source.name, target.name, size, sizes[size][0], sizes[size][1], seed, paths[target.name, size, seed])
        for source in sources for target in targets for size in SIZES for seed in seeds
    ]


def run_unit(context: UnitContext, unit: Unit) -> dict[str, Any]:
    """The transferability scores, then every contender, on one unit: ``{"scores": ..., "runs": {contender: run}}``."""
    source = next(s for s in context.sources if s.name == unit.source)
    target = next(t for t in context.targets if t.name == unit.target)
    train = load_from_disk(unit.train_path)
    label = f"{unit.source} -> {unit.target}, {unit.size}, seed {unit.seed}"
    print(f"== {label}: scores", flush=True)
    outcome: dict[str, Any] = {"scores": transferability_scores(context.study, source, target, train, context.output_dir / "features"), "runs": {}}
    for contender in context.contenders:
        print(f"== {label}: {contender}", flush=True)
        run = run_once(context.study, contender, source, target, train, unit.steps, unit.seed, context.training_argv,
                       context.output_dir / "runs" / unit.source / unit.target / unit.size / contender / f"seed{unit.seed}")
        if not math.isfinite(run["metric"]):
            raise RuntimeError(f"{label} {contender}: non-finite metric {run['metric']}")
        outcome["runs"][contender] = run
    return outcome


def assemble_cases(
    study: StudyArguments, sources: list[Source], targets: list[Target], contenders: list[str],
    units: list[Unit], outcomes: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The per-(source, target, size) case records, seeds in order, from the units' outcomes."""
    cases = []
    for source in sources:
        for target in targets:
            for size in SIZES:
                mine = [(u, o) for u, o in zip(units, outcomes) if (u.source, u.target, u.size) == (source.name, target.name, size)]
                declared = "similar" if target.name in DECLARED_SIMILAR.get(source.name, set()) else "different"
                cases.append({
                    "source": source.name, "target": target.name, "size": size, "n_train": mine[0][0].n_train,
                    "n_eval": target.validation.num_rows, "steps": mine[0][0].steps, "declared": declared,
                    "architecture": source.architecture[0],
                    "chance": 1.0 / target.task.num_outputs if target.task.type == "classification" else None,
                    "scores": [o["scores"] for _, o in mine],
                    "contenders": {c: {"runs": [o["runs"][c] for _, o in mine]} for c in contenders},
                })
    return cases
