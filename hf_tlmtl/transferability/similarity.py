"""Source/target similarity measured on the target data (:func:`measure_similarity`).

The source's features are scored against the target labels, against random features of the same network
and without its top stage; the gain over random becomes a similarity in [0, 1] through a logistic calibrated
on the transfer study (:data:`MEASURED_GAIN_THRESHOLD`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch import nn

from ..backbone.unwrap import unwrap
from ..modeling import TimmMultiTaskModel
from ..tasks import TaskSpec
from .scoring import as_split, resolve_task_specs, score_transferability

MEASURED_GAIN_THRESHOLD = 0.29
"""LogME gain over random init (nats per sample) at which a measured similarity is 0.5. Calibrated on the
default run of the transfer study (``benchmarks/transfer_study/``): the midpoint of the gains that
put all 12 (source, target, size) cases on the side of the rules that measured better. Only 2 of the 12
favoured the "similar" side, so it is a coarse calibration."""


MEASURED_GAIN_SCALE = 0.05
"""Width of the logistic that maps the gain to a similarity in (0, 1)."""


TRUNCATED_SCORE_MARGIN = 0.0
"""Case 1 becomes ``truncate`` when the backbone without its top stage scores more than this above the full one."""


@dataclass
class SimilarityMeasurement:
    """How much the source's frozen features beat random features of the same network on the target.

    ``similarity`` (0..1) is the calibrated logistic of ``gain = source_score - random_score``; the
    scores are means over tasks. ``truncated_score`` is the source without its top stage (``None``
    when the backbone cannot be truncated or already is).
    """

    similarity: float
    gain: float
    source_score: float
    random_score: float
    truncated_score: float | None
    method: str
    per_task: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def top_stage_hurts(self) -> bool:
        """The stage below the top scores higher than the top: the top stage is specific to the source task."""
        return self.truncated_score is not None and self.truncated_score > self.source_score + TRUNCATED_SCORE_MARGIN

    def describe(self) -> str:
        text = (
            f"measured {self.method}: source {self.source_score:.3f} vs random init {self.random_score:.3f} "
            f"(gain {self.gain:+.3f}; similarity {self.similarity:.2f} = logistic((gain - {MEASURED_GAIN_THRESHOLD}) / "
            f"{MEASURED_GAIN_SCALE}))"
        )
        if self.truncated_score is not None:
            text += f", without the top stage {self.truncated_score:.3f}"
        return text


def similarity_from_gain(gain: float) -> float:
    """The calibrated map from a score gain over random init to a similarity in (0, 1).

    Example:
        >>> similarity_from_gain(MEASURED_GAIN_THRESHOLD)
        0.5
        >>> similarity_from_gain(1.0) > 0.99 and similarity_from_gain(-1.0) < 0.01
        True
    """
    z = (gain - MEASURED_GAIN_THRESHOLD) / MEASURED_GAIN_SCALE
    return float(1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0))))


def random_init_copy(model: nn.Module, seed: int) -> nn.Module:
    """A fresh ``model`` of the same config with seeded random weights, in eval mode (the caller's random state kept).

    The baseline a source's features are measured against (:func:`measure_similarity`, the transfer study).

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> a, b = random_init_copy(m, seed=1), random_init_copy(m, seed=1)
        >>> all(bool((p == q).all()) for p, q in zip(a.parameters(), b.parameters())), a.training
        (True, False)
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TimmMultiTaskModel(copy.deepcopy(model.config)).to(next(model.parameters()).device).eval()


def _truncated_copy(model: nn.Module) -> nn.Module | None:
    backbone = model.backbone
    if model.config.truncate_stage is not None or not hasattr(backbone, "prune_intermediate_layers"):
        return None
    stage = len(backbone.feature_info) - 2
    if stage < 0:
        return None
    with torch.random.fork_rng(devices=[]):  # the rebuilt heads' initialisation leaves the caller's random state alone
        return copy.deepcopy(model).truncate(stage)


def measure_similarity(
    model: nn.Module,
    dataset: Dataset | DatasetDict,
    tasks: Sequence[TaskSpec | dict[str, Any]] | str | None = None,
    method: str = "logme",
    batch_size: int = 64,
    cache_dir: str | None = None,
    image_column: str = "image",
    seed: int = 0,
) -> SimilarityMeasurement:
    """Source/target similarity measured on the target data: the source's features scored against the labels,
    against random features of the same architecture (seeded: reproducible) and without the top stage.

    Three feature passes (each cached): source, random init, source without its top stage.

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.data.embedded import load_embedded_dataset
        >>> ds = load_embedded_dataset("digits", n_train=60, n_eval=10, image_size=32)
        >>> model = TimmMultiTaskModel.from_backbone(
        ...     "test_resnet", [TaskSpec(name="digit", type="classification", num_labels=10)], image_size=32)
        >>> m = measure_similarity(model, ds, cache_dir=tempfile.mkdtemp())
        >>> 0.0 < m.similarity < 1.0, m.gain == m.source_score - m.random_score
        (True, True)
    """
    base = unwrap(model)
    split = as_split(dataset)
    task_specs = resolve_task_specs(split, tasks, image_column)
    if method == "leep":
        raise ValueError("measure_similarity compares against random features, which have no source classifier: use 'logme' or 'h_score'.")

    def score(candidate: nn.Module) -> dict[str, float]:
        return score_transferability(candidate, split, task_specs, method, batch_size, cache_dir, image_column)

    source = score(base)
    random = score(random_init_copy(base, seed))
    truncated_model = _truncated_copy(base)
    truncated = score(truncated_model) if truncated_model is not None else None
    source_mean, random_mean = float(np.mean(list(source.values()))), float(np.mean(list(random.values())))
    gain = source_mean - random_mean
    per_task = {t: {"source": source[t], "random": random[t], **({"truncated": truncated[t]} if truncated else {})} for t in source}
    return SimilarityMeasurement(
        similarity=similarity_from_gain(gain),
        gain=gain,
        source_score=source_mean,
        random_score=random_mean,
        truncated_score=None if truncated is None else float(np.mean(list(truncated.values()))),
        method=method,
        per_task=per_task,
    )
