"""Which strategy for a target: :func:`recommend_strategy`, the four classic cases, with measured rules.

Example:
    >>> recommend_strategy(500, "similar").strategy, recommend_strategy(500, "similar", rules="classic").strategy
    ('truncate', 'feature_extraction')
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..backbone.anatomy import backbone_groups, input_resolution_fraction
from ..backbone.unwrap import unwrap
from ..transferability.similarity import measure_similarity

SMALL_DATASET_MAX_SAMPLES = 5_000
"""A target set with fewer training samples than this is "small" (cases 1 and 2)."""


SIMILARITY_THRESHOLD = 0.5
"""A numeric similarity at or above this is "similar" (1.0 = the source task itself)."""


LARGE_SIMILAR_TRAINABLE_GROUPS = 2
"""Case 3 fine-tunes this many top layer groups."""


SMALL_DIFFERENT_LAYER_DECAY = 0.75
"""Case 2 tunes the kept (generic) layers gently: strong layer-wise LR decay."""


LARGE_DIFFERENT_LAYER_DECAY = 0.9
"""Case 4 fine-tunes everything, lower layers a little slower."""


RULES: tuple[str, ...] = ("study", "classic")
"""``recommend_strategy(rules=)``: measured with real sources (default), or the seed article's table."""


NATIVE_RESOLUTION_FRACTION = 0.5
"""Case 1 under ``rules="study"``: at or above this fraction of the backbone's native input side, feature
extraction (measured best at 1x); below it, truncation (measured best at 0.21x, 48 of 224 px). The threshold
lies between the two measured points; it is not itself measured."""


STUDY_RULES: dict[str, dict[str, Any]] = {
    "small": {
        "layer_decay": SMALL_DIFFERENT_LAYER_DECAY,
        "bn": "recalibrate",
        "learning_rate_scale": 1.0,
        "why": "On 100 training images this was best for the similar and the different target alike, ahead of "
               "frozen BatchNorm and of full fine-tuning; re-estimating BatchNorm's statistics with the final weights "
               "fixes the eval-mode collapse that few, small batches leave.",
    },
    "large": {
        "layer_decay": SMALL_DIFFERENT_LAYER_DECAY,
        "bn": "frozen",
        "learning_rate_scale": 0.1,
        "why": "On 600 training images frozen BatchNorm at a lower backbone learning rate kept the source's "
               "normalisation and was best or within noise of the best for both targets.",
    },
}
"""The advice of ``rules="study"`` by target size; see :func:`recommend_strategy`."""


@dataclass
class Recommendation:
    """Advice from :func:`recommend_strategy`; :meth:`training_kwargs` feeds ``MultiTaskTrainingArguments``.

    ``truncate_stage=None`` with ``strategy='truncate'`` means the default cut of
    :func:`apply_transfer_strategy`: drop only the top stage.
    """

    strategy: str
    trainable_groups: int | None
    truncate_stage: int | None
    case: int
    reason: str
    layer_decay: float | None = None
    measurement: Any = field(default=None, repr=False)
    """The :class:`~hf_tlmtl.transferability.SimilarityMeasurement` behind ``similarity="measured"``."""
    bn: str = "train"
    """The BatchNorm policy (:data:`~hf_tlmtl.transfer.batch_norm.BN_POLICIES`)."""
    learning_rate_scale: float = 1.0
    """The backbone's learning rate relative to the heads' (``learning_rate``); below 1 the backbone trains slower."""

    def training_kwargs(self, learning_rate: float | None = None) -> dict[str, Any]:
        """Keyword arguments for ``MultiTaskTrainingArguments`` that follow this advice.

        With ``learning_rate`` (the rate the heads should get), a ``learning_rate_scale`` below 1 becomes
        ``learning_rate * learning_rate_scale`` for the backbone and ``head_lr_scale = 1 / learning_rate_scale``.
        """
        kwargs = {
            "transfer_strategy": self.strategy,
            "trainable_groups": self.trainable_groups,
            "truncate_stage": self.truncate_stage,
            "layer_decay": self.layer_decay,
            "bn": self.bn,
        }
        if learning_rate is not None and self.learning_rate_scale != 1.0:
            kwargs["learning_rate"] = learning_rate * self.learning_rate_scale
            kwargs["head_lr_scale"] = 1.0 / self.learning_rate_scale
        return kwargs


def parse_similarity(text: str) -> str | float:
    """A ``similarity`` given as text (``--task_similarity``): a number becomes a float, a word stays a word.

    >>> parse_similarity("0.4"), parse_similarity("measured")
    (0.4, 'measured')
    """
    try:
        return float(text)
    except ValueError:
        return text


def _similarity_is_high(similarity: str | float, threshold: float) -> bool:
    if isinstance(similarity, str):
        if similarity.lower() not in ("similar", "different"):
            raise ValueError(f"similarity must be 'similar', 'different', 'measured' or a number in [0, 1]; got {similarity!r}.")
        return similarity.lower() == "similar"
    if isinstance(similarity, bool) or not isinstance(similarity, numbers.Real) or math.isnan(similarity):
        raise ValueError(f"similarity must be 'similar', 'different', 'measured' or a number in [0, 1]; got {similarity!r}.")
    if not 0.0 <= float(similarity) <= 1.0:
        raise ValueError(f"similarity must be in [0, 1] (1 = the source task itself), got {similarity}.")
    return float(similarity) >= threshold


def _default_truncate_stage(model: nn.Module | None) -> int | None:
    """The cut that drops only the top stage (``None`` without a model: decided when applied)."""
    return None if model is None else len(unwrap(model).backbone.feature_info) - 2


def recommend_strategy(
    num_train_samples: int,
    similarity: str | float | Any,
    *,
    small_dataset_max_samples: int = SMALL_DATASET_MAX_SAMPLES,
    similarity_threshold: float = SIMILARITY_THRESHOLD,
    top_groups: int = LARGE_SIMILAR_TRAINABLE_GROUPS,
    model: nn.Module | None = None,
    dataset: Any = None,
    tasks: Any = None,
    method: str = "logme",
    cache_dir: str | None = None,
    image_column: str = "image",
    rules: str = "study",
) -> Recommendation:
    """Advice for the four classic transfer-learning cases, from measurements (or from the classic table).

    ``num_train_samples < small_dataset_max_samples`` is a *small* target set; ``similarity`` is
    ``"similar"`` / ``"different"`` or a number in [0, 1] (1 = the source task itself), *similar*
    when ``>= similarity_threshold``; ``"measured"`` measures it (below). Size and similarity give the
    case (Yosinski et al. 2014; CS231n "Transfer Learning"); ``rules`` the advice for it.

    ``rules="study"`` (default): what ``benchmarks/bn_policies.py`` and ``benchmarks/transfer_study/`` measured
    with real sources (ImageNet EfficientNet-Lite0; a digits-trained ResNet), :data:`STUDY_RULES`:

    ====  ===============  ===============================================================
    case  data, similarity  advice
    ====  ===============  ===============================================================
    1     small, similar    with ``model`` at >= :data:`NATIVE_RESOLUTION_FRACTION` of its backbone's
                            native input side: ``feature_extraction``; otherwise as case 2
    1, 2  small             ``truncate`` (drop the top stage), the rest fine-tuned with layer decay
                            :data:`SMALL_DIFFERENT_LAYER_DECAY`, ``bn="recalibrate"``
    3, 4  large             ``truncate``, layer decay :data:`SMALL_DIFFERENT_LAYER_DECAY`,
                            ``bn="frozen"``, backbone at a tenth of the heads' learning rate
                            (``learning_rate_scale=0.1``)
    ====  ===============  ===============================================================

    At 48 px similarity did not change that advice: it was best or within noise of the best for the similar
    and the different target alike, and the classic table's feature extraction (case 1), top-groups
    fine-tuning (case 3) and full fine-tuning (case 4) lost to it. At the native 224 px (one seed, small
    targets), feature extraction won on the similar target and truncation on the different one.

    ``rules="classic"``: the seed article's table, as it is: case 1 ``feature_extraction``; case 2
    ``truncate`` with strong layer decay; case 3 ``partial`` (top ``top_groups`` groups); case 4
    ``fine_tune`` with mild layer decay (:data:`LARGE_DIFFERENT_LAYER_DECAY`); BatchNorm trains.

    With ``model``, ``truncate`` gets its concrete ``truncate_stage`` (drop the top stage) and
    ``partial`` its ``trainable_groups`` capped at the model's number of layer groups.

    ``similarity="measured"`` (with ``model`` = the source and ``dataset`` = the target data, its
    ``train`` split; ``tasks``, ``method``, ``cache_dir``, ``image_column`` as in
    :func:`~hf_tlmtl.transferability.measure_similarity`): the source's frozen features are scored (LogME)
    against the target labels and against random features of the same network; the gain becomes the
    similarity through the logistic calibrated on the study
    (:data:`~hf_tlmtl.transferability.MEASURED_GAIN_THRESHOLD`). Under the classic rules, a source whose
    top stage scores lower than the stage below (``top_stage_hurts``) is advised ``truncate`` whatever the case.
    ``reason`` names the scores and the case they led to; ``measurement`` keeps them. A
    :class:`~hf_tlmtl.transferability.SimilarityMeasurement` measured earlier can be passed as ``similarity`` too.

    Example:
        >>> rec = recommend_strategy(100, "similar")
        >>> rec.case, rec.strategy, rec.bn, rec.learning_rate_scale
        (1, 'truncate', 'recalibrate', 1.0)
        >>> rec = recommend_strategy(100_000, 0.2)
        >>> rec.case, rec.strategy, rec.bn, rec.training_kwargs(learning_rate=0.01)["learning_rate"]
        (4, 'truncate', 'frozen', 0.001)
        >>> recommend_strategy(100, "similar", rules="classic").strategy
        'feature_extraction'
        >>> recommend_strategy(4_999, "different", rules="classic").strategy, recommend_strategy(5_000, "different", rules="classic").strategy
        ('truncate', 'fine_tune')
    """
    if isinstance(num_train_samples, bool) or not isinstance(num_train_samples, numbers.Integral):
        raise ValueError(f"num_train_samples must be an int, got {num_train_samples!r}.")
    if num_train_samples < 1:
        raise ValueError(f"num_train_samples must be >= 1 (the size of the target training set), got {num_train_samples}.")
    if not 0.0 <= similarity_threshold <= 1.0:
        raise ValueError(f"similarity_threshold must be in [0, 1], got {similarity_threshold}.")
    if small_dataset_max_samples < 1 or top_groups < 1:
        raise ValueError("small_dataset_max_samples and top_groups must be >= 1.")
    if rules not in RULES:
        raise ValueError(f"rules must be one of {list(RULES)}, got {rules!r}.")
    measurement = similarity if hasattr(similarity, "top_stage_hurts") else None  # a SimilarityMeasurement
    if isinstance(similarity, str) and similarity.lower() == "measured":
        measurement = _measure(model, dataset, tasks, method, cache_dir, image_column)
    if measurement is not None:
        similarity = round(measurement.similarity, 3)
    similar = _similarity_is_high(similarity, similarity_threshold)
    small = num_train_samples < small_dataset_max_samples
    size = f"{num_train_samples:,} samples ({'<' if small else '>='} {small_dataset_max_samples:,}: {'small' if small else 'large'})"
    sim = f"similarity {similarity!r} ({'similar' if similar else 'different'})"
    if measurement is not None:
        sim += f" from {measurement.describe()}"
    if rules == "study":
        rec = _study_case(small, similar, size, sim, model)
    elif measurement is not None and measurement.top_stage_hurts:
        rec = _top_stage_too_specific(small, similar, size, sim, model)
    else:
        rec = _recommend_case(small, similar, size, sim, top_groups, model)
    rec.measurement = measurement
    return rec


def _case_number(small: bool, similar: bool) -> int:
    return (1 if similar else 2) if small else (3 if similar else 4)


def _case_label(small: bool, similar: bool) -> str:
    return f"{'small' if small else 'large'} & {'similar' if similar else 'different'}"


def _study_case(small: bool, similar: bool, size: str, sim: str, model: nn.Module | None) -> Recommendation:
    case = _case_number(small, similar)
    fraction = None if model is None else input_resolution_fraction(model)
    if case == 1 and fraction is not None and fraction >= NATIVE_RESOLUTION_FRACTION:
        return Recommendation(
            "feature_extraction", None, None, case,
            f"Case 1, small & similar: {size}, {sim}, input at {fraction:.2g}x the backbone's native resolution. "
            "Measured at the native 224 px (benchmarks/bn_policies/native_224): the frozen source features beat "
            "truncation and fine-tuning on a small similar target, as the classic table says; freeze the backbone "
            "and train the heads.",
            bn="frozen",
        )
    advice = STUDY_RULES["small" if small else "large"]
    lr = "" if advice["learning_rate_scale"] == 1.0 else f", the backbone at {advice['learning_rate_scale']:g}x the heads' learning rate"
    return Recommendation(
        "truncate", None, _default_truncate_stage(model), case,
        f"Case {case}, {_case_label(small, similar)}: {size}, {sim}. Measured with real sources (benchmarks/bn_policies, "
        f"benchmarks/transfer_study): drop the top stage, fine-tune the rest with layer decay {advice['layer_decay']}, "
        f"BatchNorm {advice['bn']}{lr}. {advice['why']}",
        layer_decay=advice["layer_decay"], bn=advice["bn"], learning_rate_scale=advice["learning_rate_scale"],
    )


def _top_stage_too_specific(small: bool, similar: bool, size: str, sim: str, model: nn.Module | None) -> Recommendation:
    case = _case_number(small, similar)
    label = _case_label(small, similar)
    return Recommendation(
        "truncate", None, _default_truncate_stage(model), case,
        f"Case {case}, {label}, top stage too specific: {size}, {sim}. The source without its top stage scores "
        "higher on the target than the whole source: its top stage is specific to the source task. Drop it, feed "
        f"the heads from the stage below and tune what remains with layer-wise LR decay ({SMALL_DIFFERENT_LAYER_DECAY}).",
        layer_decay=SMALL_DIFFERENT_LAYER_DECAY,
    )


def _measure(model: Any, dataset: Any, tasks: Any, method: str, cache_dir: str | None, image_column: str) -> Any:
    if model is None or dataset is None:
        raise ValueError(
            "similarity='measured' needs model= (the source, a TimmMultiTaskModel) and dataset= (the target data) "
            "to score the source's features on the target; or pass 'similar' / 'different' / a number in [0, 1]."
        )
    return measure_similarity(model, dataset, tasks=tasks, method=method, cache_dir=cache_dir, image_column=image_column)


def _recommend_case(
    small: bool, similar: bool, size: str, sim: str, top_groups: int, model: nn.Module | None
) -> Recommendation:
    if small and similar:
        return Recommendation(
            "feature_extraction", None, None, 1,
            f"Case 1, small & similar: {size}, {sim}. The source features already fit the target; freeze the "
            "backbone and train only the heads, which cannot over-fit the few samples.",
        )
    if small:
        return Recommendation(
            "truncate", None, _default_truncate_stage(model), 2,
            f"Case 2, small & different: {size}, {sim}. Early layers are generic, the top stage is specific to "
            "the source task: drop the top stage, feed the heads from the one below, and tune what remains with "
            f"strong layer-wise LR decay ({SMALL_DIFFERENT_LAYER_DECAY}).",
            layer_decay=SMALL_DIFFERENT_LAYER_DECAY,
        )
    if similar:
        groups = top_groups if model is None else min(top_groups, len(backbone_groups(model)))
        return Recommendation(
            "partial", groups, None, 3,
            f"Case 3, large & similar: {size}, {sim}. Initialise from the source and fine-tune the top {groups} "
            "layer groups; enough data to adapt them without over-fitting, the generic bottom stays frozen.",
        )
    return Recommendation(
        "fine_tune", None, None, 4,
        f"Case 4, large & different: {size}, {sim}. Enough data to fine-tune the whole network; the source "
        f"weights are a good start, lower layers move slower (layer_decay={LARGE_DIFFERENT_LAYER_DECAY}).",
        layer_decay=LARGE_DIFFERENT_LAYER_DECAY,
    )
