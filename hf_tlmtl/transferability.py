"""Transferability: how well a frozen backbone's features fit a target task, measured without training.

Three estimators from the literature, each scoring pooled features against one task's labels:

- **LogME** (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
  ICML 2021): the log marginal likelihood (evidence) per sample of a Bayesian linear model from the
  features to each target column, with its prior and noise precisions maximised by the paper's
  fixed-point iteration; one SVD of the features serves every column. Classification and regression.
- **H-score** (Bao et al., "An Information-Theoretic Approach to Transferability in Task Transfer
  Learning", ICIP 2019): ``tr(cov(f)^-1 cov(E[f | y]))``, how much of the feature variance separates the
  classes. With more feature dimensions than images the plain covariance is singular and the score
  saturates, so the feature covariance is shrunk (Ledoit-Wolf), as Ibrahim et al. ("Newer is not always
  better: rethinking transferability metrics, their peculiarities, stability and performance", ECML-PKDD
  2022) recommend. Classification only.
- **LEEP** (Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
  Representations", ICML 2020): the log-likelihood of the target labels under the source classifier's
  predictions pushed through the empirical P(target | source class). Needs a source that still has its
  classifier: a timm checkpoint with ``num_classes > 0`` (``local-dir:``, ``hf-hub:``, a timm name), or a
  saved hf_tlmtl model's classification head (``source_task=``). Classification only.

Which to trust: LogME is the default. It is the one with a probabilistic meaning for every task type,
it needs no source classifier, and in the comparisons above (and Agostinelli et al., "How stable are
transferability metrics evaluations?", ECCV 2022) it is among the most consistent; no estimator wins
everywhere, and all of them rank backbones for *one* target, they are not comparable across targets.
``recipes/transfer_study.py`` measures how well each predicts fine-tuned accuracy here (Kendall's tau).

Missing labels (``-100`` / ``NaN``) drop that row for that task only. A multilabel task is scored as one
binary classification per label, averaged. Features come from :func:`hf_tlmtl.data.cache_features`, so a
backbone already run over the data costs no second pass.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 3, 200)
    >>> informative = np.eye(3)[labels] + 0.3 * rng.normal(size=(200, 3))
    >>> noise = rng.normal(size=(200, 3))
    >>> logme(informative, labels) > logme(noise, labels)
    True
    >>> h_score(informative, labels) > h_score(noise, labels)
    True
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch import nn

from .data import FEATURES_COLUMN, cache_features
from .tasks import IGNORE_INDEX, TaskSpec, normalize_tasks

METHODS: tuple[str, ...] = ("logme", "h_score", "leep")
"""Valid values of ``method``."""

MIN_ROWS = 10
"""Fewest labelled rows a task needs to be scored (and at least two classes among them)."""

_LOGME_MAX_ITERATIONS = 100
_LOGME_TOLERANCE = 1e-6
_PRECISION_MIN, _PRECISION_MAX = 1e-10, 1e10


# ------------------------------------------------------------------------------- estimators
@dataclass
class LogMEFit:
    """The evidence-maximising prior precision ``alpha`` and noise precision ``beta`` of one target column."""

    evidence: float
    alpha: float
    beta: float


def _as_float64(features: Any) -> np.ndarray:
    array = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be a 2-D array (rows, dimensions), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or inf; check the backbone (dtype, input normalisation).")
    return array


def logme_evidence(features: Any, targets: Any) -> list[LogMEFit]:
    """LogME's maximised evidence per sample for each column of ``targets`` (``(rows,)`` or ``(rows, k)``).

    The Bayesian linear model ``y = f w + e`` with ``w ~ N(0, I / alpha)`` and ``e ~ N(0, 1 / beta)``;
    its evidence ``log p(y | f, alpha, beta)`` is maximised over ``alpha`` and ``beta`` by MacKay's
    fixed-point updates, in the SVD form of the LogME paper (Algorithm 2): ``f = U S V^T`` once, then
    every iteration is O(rank).

    Example:
        >>> import numpy as np
        >>> f = np.random.default_rng(0).normal(size=(50, 4))
        >>> fit = logme_evidence(f, f @ np.array([1.0, -2.0, 0.0, 0.5]))[0]
        >>> fit.beta > 1e3  # the targets are an exact linear function of the features: almost no noise
        True
    """
    f = _as_float64(features)
    y = np.asarray(targets, dtype=np.float64)
    y = y.reshape(len(y), -1)
    if len(y) != len(f):
        raise ValueError(f"features have {len(f)} rows but targets {len(y)}.")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # eigenvalues of f^T f (the rank-many non-zero ones)
    projections = u.T @ y  # (rank, k)
    fits = []
    for column in range(y.shape[1]):
        z, yy = projections[:, column], float(y[:, column] @ y[:, column])
        z2 = z**2
        alpha, beta = 1.0, 1.0
        for _ in range(_LOGME_MAX_ITERATIONS):
            shrink = beta * sigma / (alpha + beta * sigma)
            gamma = float(shrink.sum())
            m2 = float((shrink**2 / np.maximum(sigma, 1e-300) * z2).sum())  # ||m||^2 with m = beta A^-1 f^T y
            residual = _residual(yy, z2, shrink)
            # With more dimensions than rows the fit can be perfect (gamma -> n, residual -> 0) and the
            # evidence's supremum lies at beta -> infinity: bounded precisions keep the iteration finite.
            new_alpha = min(max(gamma / max(m2, 1e-300), _PRECISION_MIN), _PRECISION_MAX)
            new_beta = min(max((n - gamma) / max(residual, 1e-300), _PRECISION_MIN), _PRECISION_MAX)
            done = abs(new_alpha / new_beta - alpha / beta) <= _LOGME_TOLERANCE * (alpha / beta)
            alpha, beta = new_alpha, new_beta
            if done:
                break
        fits.append(LogMEFit(_evidence(n, d, sigma, z2, yy, alpha, beta) / n, alpha, beta))
    return fits


def _residual(yy: float, z2: np.ndarray, shrink: np.ndarray) -> float:
    """``||y - f m||^2``: the part of ``y`` outside the features' span plus what the shrunk fit leaves inside it."""
    outside = max(yy - float(z2.sum()), 0.0)  # >= 0 up to rounding
    return outside + float(((1 - shrink) ** 2 * z2).sum())


def _evidence(n: int, d: int, sigma: np.ndarray, z2: np.ndarray, yy: float, alpha: float, beta: float) -> float:
    """``log p(y | f, alpha, beta)`` in the SVD form (m, residual and log|A| at these alpha, beta)."""
    shrink = beta * sigma / (alpha + beta * sigma)
    m2 = float((shrink**2 / np.maximum(sigma, 1e-300) * z2).sum())
    residual = _residual(yy, z2, shrink)
    log_det_a = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
    return (
        d / 2 * math.log(alpha) + n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual - alpha / 2 * m2 - log_det_a / 2
    )


def _class_indices(labels: Any) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("classification labels must be integer class indices.")
    return y.astype(np.int64)


def logme(features: Any, labels: Any, task_type: str = "classification") -> float:
    """LogME score: mean evidence per sample over the target columns (one-hot classes, or regression outputs).

    Regression targets are standardised first, so the score does not depend on the unit of the label.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> f = rng.normal(size=(100, 8))
        >>> logme(f, f[:, 0] + 0.1 * rng.normal(size=100), "regression") > logme(f, rng.normal(size=100), "regression")
        True
    """
    if task_type == "classification":
        y = _class_indices(labels)
        targets = np.eye(int(y.max()) + 1)[y]
        targets = targets[:, targets.any(axis=0)]  # classes absent from these rows carry no information
    elif task_type == "regression":
        targets = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
        targets = (targets - targets.mean(axis=0)) / np.maximum(targets.std(axis=0), 1e-12)
    else:
        raise ValueError(f"logme scores 'classification' or 'regression' targets, got {task_type!r}.")
    return float(np.mean([fit.evidence for fit in logme_evidence(features, targets)]))


def h_score(features: Any, labels: Any) -> float:
    """H-score ``tr(cov(f)^-1 cov(E[f | y]))`` with a Ledoit-Wolf-shrunk feature covariance.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 2, 300)
        >>> f = np.c_[y + 0.1 * rng.normal(size=300), rng.normal(size=300)]
        >>> 0.9 < h_score(f, y) < 1.0  # one dimension carries the labels almost noise-free: close to 1
        True
    """
    from sklearn.covariance import ledoit_wolf

    f = _as_float64(features)
    y = _class_indices(labels)
    f = f - f.mean(axis=0)
    covariance, _ = ledoit_wolf(f, assume_centered=True)
    class_means = np.zeros_like(f)
    for label in np.unique(y):
        rows = y == label
        class_means[rows] = f[rows].mean(axis=0)
    between = class_means.T @ class_means / len(f)
    return float(np.trace(np.linalg.pinv(covariance, hermitian=True) @ between))  # pinv: constant features give 0


def leep(source_probabilities: Any, labels: Any) -> float:
    """LEEP: ``mean log sum_z P(y | z) theta(x)_z`` from the source classifier's probabilities ``theta``.

    Example:
        >>> import numpy as np
        >>> y = np.array([0, 0, 1, 1])
        >>> sharp = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
        >>> leep(sharp, y) > leep(np.full((4, 2), 0.5), y)
        True
    """
    theta = _as_float64(source_probabilities)
    if (theta < 0).any() or not np.allclose(theta.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("leep needs source class probabilities (non-negative rows summing to 1): apply softmax first.")
    y = _class_indices(labels)
    joint = np.zeros((int(y.max()) + 1, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= len(y)  # P(y, z)
    conditional = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1e-300)  # P(y | z)
    expected = (theta * conditional[y]).sum(axis=1)
    return float(np.mean(np.log(np.maximum(expected, 1e-300))))


# ---------------------------------------------------------------------------- task scoring
def _labelled_rows(task: TaskSpec, labels: torch.Tensor) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(what, row mask, labels)`` per scored problem: one for classification / regression, one per label."""
    values = labels.numpy()
    if task.type == "classification":
        return [(task.name, values != IGNORE_INDEX, values)]
    values = values.reshape(len(values), -1)
    if task.type == "regression":
        return [(task.name, ~np.isnan(values).any(axis=1), values)]
    names = task.labels or [str(i) for i in range(task.num_outputs)]
    return [(f"{task.name}[{names[i]}]", ~np.isnan(values[:, i]), values[:, i]) for i in range(values.shape[1])]


def _check_rows(what: str, task: TaskSpec, rows: np.ndarray, labels: np.ndarray) -> None:
    count = int(rows.sum())
    if count == 0:
        raise ValueError(
            f"Task {what!r} has no labelled row in this dataset; drop it from tasks=, or score data that labels it."
        )
    if count < MIN_ROWS:
        raise ValueError(f"Task {what!r} has {count} labelled rows; scoring needs at least {MIN_ROWS}. Pass more data.")
    if len(np.unique(labels[rows], axis=0)) < 2:
        raise ValueError(
            f"Task {what!r} has {count} labelled rows, but every one has the same label: a transferability score "
            "needs at least two different labels."
        )


def score_features(
    features: Any,
    labels: dict[str, torch.Tensor],
    tasks: Sequence[TaskSpec],
    method: str = "logme",
    source_probabilities: Any = None,
) -> dict[str, float]:
    """Score pooled ``features`` against each task's ``labels`` (as :class:`~hf_tlmtl.data.MultiTaskCollator`
    encodes them: ``-100`` / ``NaN`` = missing). ``leep`` needs ``source_probabilities`` (rows x source classes).

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec
        >>> y = torch.arange(40) % 2
        >>> f = torch.stack([y.float(), torch.randn(40)], dim=1)
        >>> scores = score_features(f, {"odd": y}, [TaskSpec(name="odd", type="classification", num_labels=2)])
        >>> list(scores), scores["odd"] > 0
        (['odd'], True)
    """
    _check_method(method, tasks, has_source_classifier=source_probabilities is not None)
    f = _as_float64(features)
    theta = None if source_probabilities is None else _as_float64(source_probabilities)
    scores = {}
    for task in normalize_tasks(tasks):
        per_problem = []
        for what, rows, values in _labelled_rows(task, labels[task.name]):
            _check_rows(what, task, rows, values)
            if method == "logme":
                per_problem.append(logme(f[rows], values[rows], "regression" if task.type == "regression" else "classification"))
            elif method == "h_score":
                per_problem.append(h_score(f[rows], values[rows]))
            else:
                per_problem.append(leep(theta[rows], values[rows]))
        scores[task.name] = float(np.mean(per_problem))
    return scores


def check_labels(dataset: Dataset, tasks: Sequence[TaskSpec]) -> None:
    """Every task has enough labelled rows (and two labels) in ``dataset``: checked on the label columns alone,
    before any backbone pass.

    Example:
        >>> from datasets import ClassLabel, Dataset, Features, Value
        >>> from hf_tlmtl import TaskSpec
        >>> ds = Dataset.from_dict({"image": ["a.png"] * 12, "kind": [0] * 12},
        ...                        features=Features({"image": Value("string"), "kind": ClassLabel(names=["a", "b"])}))
        >>> check_labels(ds, [TaskSpec(name="kind", type="classification", num_labels=2)])
        Traceback (most recent call last):
        ...
        ValueError: Task 'kind' has 12 labelled rows, but every one has the same label: a transferability score needs at least two different labels.
    """
    from .data import _encode_labels, _plan_label_columns

    for plan in _plan_label_columns(dataset, tasks, None):
        for what, rows, values in _labelled_rows(plan.task, _encode_labels(plan, dataset[plan.column])):
            _check_rows(what, plan.task, rows, values)


def _check_method(method: str, tasks: Sequence[TaskSpec], has_source_classifier: bool) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown transferability method {method!r}; valid methods: {list(METHODS)}.")
    if method in ("h_score", "leep"):
        regression = [t.name for t in normalize_tasks(tasks) if t.type == "regression"]
        if regression:
            raise ValueError(
                f"method={method!r} scores class labels; task(s) {regression} are regression. Use method='logme' "
                "(it scores regression too), or leave those tasks out (tasks=[...])."
            )
    if method == "leep" and not has_source_classifier:
        raise ValueError(
            "method='leep' needs the source's classifier: pass a timm source that still has one (a timm name, "
            "hf-hub: or local-dir: checkpoint with num_classes > 0) or, for a saved hf_tlmtl model, "
            "source_task='<its classification task>'; else use method='logme'."
        )


# ------------------------------------------------------------------------------ on a model
def _as_split(dataset: Any) -> Dataset:
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"Pass a split (datasets.Dataset) or a DatasetDict with a 'train' split; got splits {list(dataset)}.")
        return dataset["train"]
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset or DatasetDict, got {type(dataset).__name__}.")
    return dataset


def _resolve_tasks(dataset: Dataset, tasks: Sequence[TaskSpec | dict[str, Any]] | str | None, image_column: str) -> list[TaskSpec]:
    """Stated tasks, or tasks inferred from the columns (all typed label columns, or the ones named in ``"a,b"``)."""
    from .sources import infer_tasks

    if tasks is None or isinstance(tasks, str):
        names = None if tasks is None else [n.strip() for n in tasks.split(",") if n.strip()]
        return infer_tasks(dataset.features, image_column=image_column, names=names)
    return normalize_tasks(tasks)


def _with_tasks(model: nn.Module, tasks: list[TaskSpec]) -> nn.Module:
    """``model`` itself when it already has these tasks, else a re-headed sibling sharing its backbone."""
    from .modeling import TimmMultiTaskModel

    if [t.to_dict() for t in model.config.task_specs] == [t.to_dict() for t in tasks]:
        return model
    config = copy.deepcopy(model.config)
    config.set_tasks(tasks)
    with torch.device("meta"):  # the sibling's own backbone is replaced at once: do not allocate it
        sibling = TimmMultiTaskModel(config)
    sibling.backbone = model.backbone
    sibling.heads = nn.ModuleDict()  # scoring reads pooled features only
    return sibling


def _source_classifier(model: nn.Module, source_task: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Source class probabilities from pooled features: a kept timm classifier, or a saved model's head."""
    if source_task is not None:
        head = model.heads[model.get_task(source_task).name]
        if model.get_task(source_task).type != "classification":
            raise ValueError(f"source_task={source_task!r} is not a classification task; LEEP needs source classes.")
        return lambda pooled: torch.softmax(head.eval()(pooled), dim=-1)
    classifier = getattr(model, "source_classifier", None)
    if classifier is None:
        return None
    return lambda pooled: torch.softmax(classifier.eval()(pooled), dim=-1)


def load_source(
    backbone: str, tasks: Sequence[TaskSpec], image_size: int | None = None, keep_classifier: bool = False, **timm_kwargs: Any
) -> nn.Module:
    """A :class:`~hf_tlmtl.TimmMultiTaskModel` on ``backbone``'s pretrained weights (timm name, ``hf-hub:``,
    ``local-dir:``) with heads for ``tasks``, or a saved hf_tlmtl model folder as saved (scoring reads its
    backbone; its heads are source classifiers for LEEP).

    With ``keep_classifier`` the source's own classifier (timm ``get_classifier()``) is attached as
    ``model.source_classifier`` for LEEP; ``ValueError`` if the source has none (``num_classes=0``).

    Example:
        >>> import tempfile, timm
        >>> from hf_tlmtl import TaskSpec
        >>> d = tempfile.mkdtemp()
        >>> timm.models.save_for_hf(timm.create_model("test_resnet", num_classes=7), d)
        >>> m = load_source(f"local-dir:{d}", [TaskSpec(name="y", type="regression")], keep_classifier=True)
        >>> m.source_classifier.out_features
        7
    """
    from .modeling import TimmMultiTaskModel

    if _is_saved_model(backbone):
        if keep_classifier:
            raise ValueError(
                f"{backbone!r} is a saved hf_tlmtl model: its classifiers are its task heads; pass "
                "source_task='<task>' for LEEP instead of keep_classifier."
            )
        return TimmMultiTaskModel.from_pretrained(backbone)  # its own heads stay: LEEP's source_task reads them
    model = TimmMultiTaskModel.from_backbone(backbone, tasks, pretrained=True, image_size=image_size, **timm_kwargs)
    if keep_classifier:
        import timm

        source = timm.create_model(backbone, pretrained=True, **timm_kwargs)
        classifier = source.get_classifier() if source.num_classes else None
        if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
            raise ValueError(
                f"backbone {backbone!r} has no classifier (num_classes=0), so LEEP cannot score it; use method='logme'."
            )
        model.source_classifier = classifier.eval()
    return model


def _is_saved_model(path: str) -> bool:
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "timm_multitask"


def pooled_features(
    model: nn.Module,
    dataset: Dataset,
    tasks: list[TaskSpec],
    batch_size: int = 64,
    cache_dir: str | None = None,
    image_column: str = "image",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The frozen backbone's pooled features of every row (from the feature cache) and each task's labels.

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.embedded import load_embedded_dataset
        >>> ds = load_embedded_dataset("digits", n_train=20, n_eval=10, image_size=32)["train"]
        >>> tasks = [TaskSpec(name="digit", type="classification", num_labels=10)]
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=32)
        >>> features, labels = pooled_features(model, ds, tasks, cache_dir=tempfile.mkdtemp())
        >>> tuple(features.shape), tuple(labels["digit"].shape)
        ((20, 96), (20,))
    """
    cached = cache_features(
        _with_tasks(model, tasks), dataset, batch_size=batch_size, cache_dir=cache_dir, image_column=image_column
    )
    rows = cached[:]
    return rows.pop(FEATURES_COLUMN), rows


def score_transferability(
    model: nn.Module | str,
    dataset: Dataset | DatasetDict,
    tasks: Sequence[TaskSpec | dict[str, Any]] | str | None = None,
    method: str = "logme",
    batch_size: int = 64,
    cache_dir: str | None = None,
    image_column: str = "image",
    source_task: str | None = None,
    image_size: int | None = None,
) -> dict[str, float]:
    """Score a frozen backbone on a target dataset, one number per task, without training.

    Args:
        model: A :class:`~hf_tlmtl.TimmMultiTaskModel`, or a source to load with pretrained weights (a timm
            name, ``hf-hub:``, ``local-dir:``, or a saved hf_tlmtl model folder; see :func:`load_source`).
        dataset: A split, or a DatasetDict (its ``train`` split is scored).
        tasks: The target tasks; ``None`` infers them from the columns (as the recipes do); a string
            ``"digit,scale"`` names columns.
        method: ``"logme"`` (default), ``"h_score"`` or ``"leep"``.
        batch_size: Images per backbone forward (progress bar: "Caching backbone features").
        cache_dir: Folder of the feature cache (see :func:`~hf_tlmtl.data.cache_features`).
        source_task: ``leep`` on a saved hf_tlmtl model: its classification task whose head is the source classifier.
        image_size: Input side when ``model`` is a name (default: the source's data config).

    Returns:
        ``{task name: score}``; higher is better, comparable across backbones for the same task only.

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.embedded import load_embedded_dataset
        >>> ds = load_embedded_dataset("digits", n_train=60, n_eval=10, image_size=32)
        >>> model = TimmMultiTaskModel.from_backbone(
        ...     "test_resnet", [TaskSpec(name="digit", type="classification", num_labels=10)], image_size=32)
        >>> scores = score_transferability(model, ds, cache_dir=tempfile.mkdtemp())
        >>> sorted(scores)
        ['digit']
    """
    split = _as_split(dataset)
    task_specs = _resolve_tasks(split, tasks, image_column)
    _check_method(method, task_specs, has_source_classifier=True)  # the classifier itself is checked once loaded
    check_labels(split, task_specs)
    if isinstance(model, str):
        model = load_source(model, task_specs, image_size=image_size, keep_classifier=method == "leep" and source_task is None)
    features, labels = pooled_features(model, split, task_specs, batch_size, cache_dir, image_column)
    probabilities = None
    if method == "leep":
        classifier = _source_classifier(model, source_task)
        _check_method(method, task_specs, has_source_classifier=classifier is not None)
        with torch.no_grad():
            probabilities = classifier(features.to(next(model.parameters()).dtype)).float()
    return score_features(features, labels, task_specs, method, probabilities)


# ------------------------------------------------------------------------- similarity
MEASURED_GAIN_THRESHOLD = 0.29
"""LogME gain over random init (nats per sample) at which a measured similarity is 0.5. Calibrated on the
default run of ``recipes/transfer_study.py`` (``benchmarks/transfer_study/``): the midpoint of the gains that
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


def _random_init_copy(model: nn.Module, seed: int) -> nn.Module:
    from .modeling import TimmMultiTaskModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TimmMultiTaskModel(copy.deepcopy(model.config)).to(next(model.parameters()).device).eval()


def _truncated_copy(model: nn.Module) -> nn.Module | None:
    from .modeling import truncate_backbone

    backbone = model.backbone
    if model.config.truncate_stage is not None or not hasattr(backbone, "prune_intermediate_layers"):
        return None
    stage = len(backbone.feature_info) - 2
    if stage < 0:
        return None
    truncated = copy.deepcopy(model)
    truncate_backbone(truncated.backbone, stage)
    truncated.config.truncate_stage = stage
    return truncated


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
        >>> from hf_tlmtl.embedded import load_embedded_dataset
        >>> ds = load_embedded_dataset("digits", n_train=60, n_eval=10, image_size=32)
        >>> model = TimmMultiTaskModel.from_backbone(
        ...     "test_resnet", [TaskSpec(name="digit", type="classification", num_labels=10)], image_size=32)
        >>> m = measure_similarity(model, ds, cache_dir=tempfile.mkdtemp())
        >>> 0.0 < m.similarity < 1.0, m.gain == m.source_score - m.random_score
        (True, True)
    """
    from .transfer import base_model

    base = base_model(model)
    split = _as_split(dataset)
    task_specs = _resolve_tasks(split, tasks, image_column)
    if method == "leep":
        raise ValueError("measure_similarity compares against random features, which have no source classifier: use 'logme' or 'h_score'.")

    def score(candidate: nn.Module) -> dict[str, float]:
        return score_transferability(candidate, split, task_specs, method, batch_size, cache_dir, image_column)

    source = score(base)
    random = score(_random_init_copy(base, seed))
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


# ------------------------------------------------------------------------------- ranking
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
        >>> from hf_tlmtl.embedded import load_embedded_dataset
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
    split = _as_split(dataset)
    task_specs = _resolve_tasks(split, tasks, image_column)
    _check_method(method, task_specs, has_source_classifier=True)
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
