"""Candidate backbones ranked for one target by a transferability score (:func:`rank_backbones`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from datasets import Dataset, DatasetDict
from torch import nn

from ..tasks import TaskSpec
from .scoring import as_split, check_method, check_source, resolve_task_specs, score_transferability


@dataclass
class Ranked:
    """One backbone in :func:`rank_backbones`: per-task scores, their normalised mean and the time taken."""

    name: str
    scores: dict[str, float]
    normalized_score: float
    seconds: float
    normalized: dict[str, float] = field(default_factory=dict)


def normalize_scores(raw: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per task, min-max normalise scores across backbones to [0, 1] (1 = best; all equal -> 1).

    Example:
        >>> normalize_scores({"a": {"t": 2.0}, "b": {"t": 1.0}, "c": {"t": 1.5}})
        {'a': {'t': 1.0}, 'b': {'t': 0.0}, 'c': {'t': 0.5}}
    """
    tasks = next(iter(raw.values())).keys() if raw else []
    out: dict[str, dict[str, float]] = {name: {} for name in raw}
    for task in tasks:
        values = [scores[task] for scores in raw.values()]
        low, high = min(values), max(values)
        for name, scores in raw.items():
            out[name][task] = 1.0 if high == low else (scores[task] - low) / (high - low)
    return out


def rank_backbones(
    backbones: Sequence[str | nn.Module],
    dataset: Dataset | DatasetDict,
    tasks: Sequence[TaskSpec | dict[str, Any]] | str | None = None,
    method: str = "logme",
    image_size: int | None = None,
    batch_size: int = 64,
    cache_dir: str | None = None,
    image_column: str = "image",
) -> list[Ranked]:
    """Score every backbone on the same target data; best first by the mean of per-task normalised scores.

    Args:
        backbones: timm names with weights, ``hf-hub:`` / ``local-dir:`` sources, saved hf_tlmtl folders,
            or models; names must be distinct.
        dataset, tasks, method, batch_size, cache_dir, image_column: as in :func:`score_transferability`.
        image_size: Input side for every backbone (default: each source's own data config).

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.data.embedded import load_embedded_dataset
        >>> ds = load_embedded_dataset("digits", n_train=60, n_eval=10, image_size=32)
        >>> tasks = [TaskSpec(name="digit", type="classification", num_labels=10)]
        >>> a = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=32)
        >>> b = TimmMultiTaskModel.from_backbone("test_convnext", tasks, image_size=32)
        >>> ranked = rank_backbones([a, b], ds, cache_dir=tempfile.mkdtemp())
        >>> len(ranked), ranked[0].normalized_score
        (2, 1.0)
    """
    if not backbones:
        raise ValueError("rank_backbones needs at least one backbone.")
    names = [b if isinstance(b, str) else f"{b.config.backbone}#{i}" for i, b in enumerate(backbones)]
    if len(set(names)) != len(names):
        raise ValueError(f"backbones must be distinct; got {names}.")
    for backbone in backbones:  # every source checked before the first one is scored
        if isinstance(backbone, str):
            check_source(backbone)
    split = as_split(dataset)
    task_specs = resolve_task_specs(split, tasks, image_column)
    check_method(method, task_specs, has_source_classifier=True)
    raw, seconds = {}, {}
    for name, backbone in zip(names, backbones):
        start = time.perf_counter()
        raw[name] = score_transferability(
            backbone, split, task_specs, method=method, batch_size=batch_size, cache_dir=cache_dir,
            image_column=image_column, image_size=image_size,
        )
        seconds[name] = time.perf_counter() - start
    normalized = normalize_scores(raw)
    ranked = [
        Ranked(name, raw[name], float(np.mean(list(normalized[name].values()))), seconds[name], normalized[name])
        for name in names
    ]
    return sorted(ranked, key=lambda r: -r.normalized_score)


def ranking_markdown(ranked: Sequence[Ranked], method: str) -> str:
    """The ranking as a Markdown table (one column per task, then the normalised mean and seconds).

    Example:
        >>> print(ranking_markdown([Ranked("a", {"t": 1.25}, 1.0, 0.5)], "logme"))
        | rank | backbone | t (logme) | normalised mean | seconds |
        | ---: | --- | ---: | ---: | ---: |
        | 1 | `a` | 1.250 | 1.000 | 0.5 |
    """
    tasks = list(ranked[0].scores) if ranked else []
    lines = [
        "| rank | backbone | " + " | ".join(f"{t} ({method})" for t in tasks) + " | normalised mean | seconds |",
        "| ---: | --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: |",
    ]
    for i, r in enumerate(ranked, 1):
        cells = " | ".join(f"{r.scores[t]:.3f}" for t in tasks)
        lines.append(f"| {i} | `{r.name}` | {cells} | {r.normalized_score:.3f} | {r.seconds:.1f} |")
    return "\n".join(lines)
