"""A backbone's frozen, cached features scored against the tasks of a dataset (:func:`score_transferability`).

Tasks are stated or inferred from the columns; each task's labelled rows are scored with one estimator of
:mod:`~hf_tlmtl.transferability.estimators`. Sources are timm names, ``local-dir:`` / ``hf-hub:`` checkpoints or
saved hf_tlmtl models (:func:`load_source`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import timm
import torch
from datasets import Dataset, DatasetDict
from torch import nn

from ..backbone.create import resolve_backbone_source
from ..checkpoints import check_model_folder
from ..data.feature_cache import cache_features
from ..data.labels import encode_labels, plan_label_columns
from ..data.preparation import FEATURES_COLUMN
from ..data.task_columns import infer_tasks
from ..modeling import TimmMultiTaskModel
from ..tasks import IGNORE_INDEX, TaskSpec, normalize_tasks
from .estimators import as_float64, h_score, leep, logme

METHODS: tuple[str, ...] = ("logme", "h_score", "leep")
"""Valid values of ``method``."""

MIN_ROWS = 10
"""Fewest labelled rows a task needs to be scored (and at least two classes among them)."""


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
    check_method(method, tasks, has_source_classifier=source_probabilities is not None)
    f = as_float64(features)
    theta = None if source_probabilities is None else as_float64(source_probabilities)
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
    for plan in plan_label_columns(dataset, tasks, None):
        for what, rows, values in _labelled_rows(plan.task, encode_labels(plan, dataset[plan.column])):
            _check_rows(what, plan.task, rows, values)


def check_method(method: str, tasks: Sequence[TaskSpec], has_source_classifier: bool) -> None:
    """``ValueError`` for an unknown estimator, or one that cannot score these tasks with this source."""
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
def as_split(dataset: Any) -> Dataset:
    """The ``train`` split of a ``DatasetDict``, or the ``Dataset`` itself; ``ValueError`` for anything else."""
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"Pass a split (datasets.Dataset) or a DatasetDict with a 'train' split; got splits {list(dataset)}.")
        return dataset["train"]
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset or DatasetDict, got {type(dataset).__name__}.")
    return dataset


def resolve_task_specs(
    dataset: Dataset, tasks: Sequence[TaskSpec | dict[str, Any] | str] | str | None, image_column: str, model: Any = None
) -> list[TaskSpec]:
    """The tasks to score: stated ones; the columns named (``"a,b"`` or ``["a", "b"]``), inferred from their features;
    with ``tasks=None``, ``model``'s own tasks when the dataset has all their columns, else every typed label column.

    Example:
        >>> from datasets import ClassLabel, Dataset, Features, Value
        >>> ds = Dataset.from_dict({"image": [], "color": [], "size": []},
        ...                        features=Features({"image": Value("string"), "color": ClassLabel(names=["r", "g"]), "size": Value("float32")}))
        >>> [t.name for t in resolve_task_specs(ds, None, "image")], [t.name for t in resolve_task_specs(ds, ["color"], "image")]
        (['color', 'size'], ['color'])
    """
    if tasks is None and model is not None and not isinstance(model, str):
        own = list(getattr(model.config, "task_specs", None) or [])
        if own and all(t.source_column in dataset.column_names for t in own):
            return own
    if tasks is None or isinstance(tasks, str) or (not isinstance(tasks, dict) and all(isinstance(t, str) for t in tasks)):
        names = None if tasks is None else [n.strip() for n in (tasks.split(",") if isinstance(tasks, str) else tasks) if n.strip()]
        return infer_tasks(dataset.features, image_column=image_column, names=names)
    return normalize_tasks(tasks)


def _with_tasks(model: nn.Module, tasks: list[TaskSpec]) -> nn.Module:
    """``model`` itself when it already has these tasks, else a re-headed sibling sharing its backbone."""
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
    if _is_saved_model(backbone):
        if keep_classifier:
            raise ValueError(
                f"{backbone!r} is a saved hf_tlmtl model: its classifiers are its task heads; pass "
                "source_task='<task>' for LEEP instead of keep_classifier."
            )
        return TimmMultiTaskModel.from_pretrained(backbone)  # its own heads stay: LEEP's source_task reads them
    model = TimmMultiTaskModel.from_backbone(backbone, tasks, pretrained=True, image_size=image_size, **timm_kwargs)
    if keep_classifier:

        source = timm.create_model(backbone, pretrained=True, **timm_kwargs)
        classifier = source.get_classifier() if source.num_classes else None
        if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
            raise ValueError(
                f"backbone {backbone!r} has no classifier (num_classes=0), so LEEP cannot score it; use method='logme'."
            )
        model.source_classifier = classifier.eval()
    return model


def _is_saved_model(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "timm_multitask"


def check_source(name: str) -> None:
    """``ValueError`` now, before any backbone runs, for a source :func:`load_source` could not load: an unknown timm
    architecture (with close names), a missing ``local-dir:`` checkpoint, a damaged saved model folder.

    Example:
        >>> check_source("resnet_18")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Unknown timm architecture 'resnet_18' (timm ...
    """
    if Path(name).is_dir() and (Path(name) / "config.json").is_file():
        check_model_folder(name)
    else:
        resolve_backbone_source(name, {})


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
        >>> from hf_tlmtl.data.embedded import load_embedded_dataset
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
        tasks: The target tasks: ``TaskSpec`` s, or column names (``"digit,scale"`` or ``["digit", "scale"]``) whose
            features say the task type. ``None``: ``model``'s own tasks when the dataset has their columns, else
            every typed label column (as the recipes infer them).
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
        >>> from hf_tlmtl.data.embedded import load_embedded_dataset
        >>> ds = load_embedded_dataset("digits", n_train=60, n_eval=10, image_size=32)
        >>> model = TimmMultiTaskModel.from_backbone(
        ...     "test_resnet", [TaskSpec(name="digit", type="classification", num_labels=10)], image_size=32)
        >>> scores = score_transferability(model, ds, cache_dir=tempfile.mkdtemp())
        >>> sorted(scores)
        ['digit']
    """
    split = as_split(dataset)
    task_specs = resolve_task_specs(split, tasks, image_column, model)
    check_method(method, task_specs, has_source_classifier=True)  # the classifier itself is checked once loaded
    check_labels(split, task_specs)
    if isinstance(model, str):
        model = load_source(model, task_specs, image_size=image_size, keep_classifier=method == "leep" and source_task is None)
    features, labels = pooled_features(model, split, task_specs, batch_size, cache_dir, image_column)
    probabilities = None
    if method == "leep":
        classifier = _source_classifier(model, source_task)
        check_method(method, task_specs, has_source_classifier=classifier is not None)
        with torch.no_grad():
            probabilities = classifier(features.to(next(model.parameters()).dtype)).float()
    return score_features(features, labels, task_specs, method, probabilities)


# ------------------------------------------------------------------------- similarity


# ------------------------------------------------------------------------------- ranking
