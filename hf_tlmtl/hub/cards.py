"""Model cards: :func:`create_model_card` and :func:`metrics_from_card`.

- :func:`create_model_card` renders the packaged Jinja template ``hf_tlmtl/model_cards/model_card.md``
  with ``huggingface_hub.ModelCard``: YAML metadata (license, ``library_name: transformers``,
  tags, ``base_model``, datasets, ``pipeline_tag``, a ``model-index`` with one entry per task
  and metric) and a body (backbone, parameters, tasks, transfer, hyperparameters, results,
  ``delta_m``, training curves, usage, limitations).

``library_name`` is ``transformers``: the model loads with ``AutoModel`` (after ``import
hf_tlmtl``), which is what the Hub's "Use this model" snippet shows for that library; ``timm``
would advertise ``timm.create_model("hf-hub:...")``, which cannot load the task heads.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> model = TimmMultiTaskModel.from_backbone(
    ...     "test_resnet", [TaskSpec(name="shape", type="classification", labels=["square", "circle"])])
    >>> card = create_model_card(model, metrics={"shape": {"accuracy": 0.75}}, dataset="shapes")
    >>> metrics_from_card(card)
    {'shape': {'accuracy': 0.75}}
    >>> card.data.library_name, card.data.pipeline_tag
    ('transformers', 'image-classification')
"""

from __future__ import annotations

import contextlib
import importlib.resources
import math
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from huggingface_hub import (
    EvalResult,
    ModelCard,
    ModelCardData,
)
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from timm.models import get_pretrained_cfg, parse_model_name

from ..backbone.unwrap import is_peft_model, unwrap
from ..configuration import TimmMultiTaskConfig
from ..multitask.metrics import METRICS_BY_TYPE
from ..tasks import TaskSpec

LIBRARY_NAME = "transformers"
PIPELINE_TAG = "image-classification"
CARD_TAGS = ("timm", "multi-task", "transfer-learning", "image-classification", "hf_tlmtl")
ADAPTER_TAGS = ("hf_tlmtl", "peft", "timm", "multi-task", "transfer-learning", "image-classification")
MODEL_CARD_TEMPLATE = "model_card.md"
ADAPTER_CARD_TEMPLATE = "adapter_card.md"
CARD_NAME = "README.md"
ADAPTER_CONFIG_NAME = "adapter_config.json"


# What huggingface_hub's default template (peft writes it for a fresh adapter) starts its body with.
_DEFAULT_CARD_HEADING = "# Model Card for Model ID"
_EVAL_PREFIX = re.compile(r"^(eval|test|validation|val|predict)_")
_STRATEGY_DESCRIPTIONS = {
    "feature_extraction": "backbone frozen, BatchNorm statistics frozen, only the heads trained",
    "fine_tune": "every parameter trained",
    "partial": "bottom layer groups frozen, the top groups and the heads trained",
    "truncate": "top stages dropped, the heads read an earlier stage",
    "lora": "backbone frozen with low-rank (LoRA) adapters trained, heads trained",
}
_HYPERPARAMETERS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "optim",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "label_smoothing_factor",
    "seed",
    "bf16",
    "fp16",
    "transfer_strategy",
    "trainable_groups",
    "truncate_stage",
    "keep_depth",
    "trainable_fraction",
    "bn",
    "keep_frozen",
    "layer_decay",
    "head_lr_scale",
    "gradual_unfreeze",
    "unfreeze_every_n_steps",
    "cache_features",
    "loss_balancing",
)
_LORA_HYPERPARAMETERS = ("lora_r", "lora_alpha", "lora_target_modules")




# ------------------------------------------------------------------------------------ template
@contextlib.contextmanager
def template_path(name: str = MODEL_CARD_TEMPLATE) -> Iterator[Path]:
    """A filesystem path to a card template shipped inside the installed package.

    Found with ``importlib.resources``, so it works from a wheel (also a zipped one).

    Example:
        >>> with template_path() as path:
        ...     path.name, path.is_file()
        ('model_card.md', True)
    """
    resource = importlib.resources.files("hf_tlmtl").joinpath("model_cards", name)
    if not resource.is_file():
        raise FileNotFoundError(
            f"Card template {name!r} is missing from the installed hf_tlmtl package (expected "
            "hf_tlmtl/model_cards/): reinstall hf_tlmtl; templates ship as package data."
        )
    with importlib.resources.as_file(resource) as path:
        yield path


# ---------------------------------------------------------------------------------- metadata
def base_model_id(backbone_source: str | None) -> str | None:
    """The Hub id of the source weights (the card's ``base_model``), or ``None`` when there is none.

    ``hf-hub:org/name`` gives ``org/name``; a pretrained timm name gives the ``timm/...`` repo its
    weights come from; ``local-dir:`` and random initialisation (``None``) have no Hub id.

    Example:
        >>> base_model_id("hf-hub:timm/resnet18.a1_in1k"), base_model_id("resnet50.a1_in1k")
        ('timm/resnet18.a1_in1k', 'timm/resnet50.a1_in1k')
        >>> base_model_id("local-dir:/tmp/x") is None and base_model_id(None) is None
        True
    """
    if not backbone_source:
        return None
    source, name = parse_model_name(backbone_source)
    if source == "hf-hub":
        return name.split("@")[0]
    if source:
        return None
    cfg = get_pretrained_cfg(name, allow_unregistered=False)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    return hub_id + f"{cfg.architecture}.{cfg.tag}" if hub_id.endswith("/") else hub_id


def _source_weights_description(backbone_source: str | None, base_model: str | None) -> str:
    if base_model:
        return f"[{base_model}](https://huggingface.co/{base_model}) (`{backbone_source or base_model}`)"
    if not backbone_source:
        return "none: the backbone started from random initialisation"
    source, name = parse_model_name(backbone_source)
    if source == "local-dir":
        return f"a local timm checkpoint (`{backbone_source}`)"
    return f"timm pretrained weights `{name}`"


def _as_dict(obj: Any) -> dict[str, Any]:
    """Mapping view of training arguments / summaries given as dataclasses, objects or dicts."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def _check_value(task: str, metric: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Metric {task}.{metric} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"Metric {task}.{metric} is {number}; a model card needs finite values.")
    return number


def normalize_metrics(metrics: Mapping[str, Any] | None, tasks: Sequence[TaskSpec]) -> dict[str, dict[str, float]]:
    """Per-task metrics ``{task: {metric: value}}`` from that form or from Trainer output.

    Trainer output is flat (``{"eval_shape_accuracy": 0.9, "eval_loss": ..., "epoch": ...}``):
    keys that start with a task name are kept, run statistics are skipped. A task the model
    does not have raises ``ValueError``.

    Example:
        >>> tasks = [TaskSpec(name="shape", type="classification", num_labels=3), TaskSpec(name="scale", type="regression")]
        >>> normalize_metrics({"eval_shape_accuracy": 0.9, "eval_scale_mae": 0.1, "eval_loss": 1.0, "epoch": 2}, tasks)
        {'shape': {'accuracy': 0.9}, 'scale': {'mae': 0.1}}
    """
    if not metrics:
        return {}
    names = [t.name for t in tasks]
    nested = {k: v for k, v in metrics.items() if isinstance(v, Mapping)}
    result: dict[str, dict[str, float]] = {}
    for task, values in nested.items():
        if task not in names:
            raise ValueError(
                f"Metrics given for task {task!r}, which this model does not have (its tasks: {names}). "
                "Remove it, or evaluate a model that has this task."
            )
        result[task] = {str(m): _check_value(task, m, v) for m, v in values.items()}
    by_length = sorted(names, key=len, reverse=True)
    known_metrics = _known_metric_names()
    for key, value in metrics.items():
        if key in nested:
            continue
        name = _EVAL_PREFIX.sub("", key)
        task = next((t for t in by_length if name.startswith(t + "_")), None)
        if task is None:
            metric = next((m for m in known_metrics if name.endswith("_" + m)), None)
            if metric is not None:
                raise ValueError(
                    f"Metric {key!r} looks like {metric!r} of task {name[: -len(metric) - 1]!r}, which this model "
                    f"does not have (its tasks: {names}). Remove it or rename it to '<task>_{metric}'."
                )
            continue  # loss, runtime, epoch, score ...: not a task metric
        metric = name[len(task) + 1 :]
        result.setdefault(task, {})[metric] = _check_value(task, metric, value)
    return result


def _known_metric_names() -> list[str]:
    return sorted({m for ms in METRICS_BY_TYPE.values() for m in ms}, key=len, reverse=True)


def _check_hub_id(value: str, what: str) -> None:
    try:
        validate_repo_id(value)
    except HFValidationError as error:
        raise ValueError(f"{what}={value!r} is not a Hub id ({error}); use 'org/name'.") from None


def _dataset_info(dataset: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"id", "name", "split", "config"}`` from a dataset id/name or a dict with those keys."""
    if dataset is None:
        return {}
    if isinstance(dataset, (str, os.PathLike)):
        info = {"id": os.fspath(dataset)}
    elif isinstance(dataset, Mapping):
        info = dict(dataset)
        unknown = set(info) - {"id", "name", "split", "config", "revision"}
        if unknown or "id" not in info:
            raise ValueError(
                f"dataset must be an id/name or a dict with 'id' and optional 'name', 'split', 'config', "
                f"'revision'; got keys {sorted(info)}."
            )
    else:
        raise ValueError(f"dataset must be a str or a dict, got {type(dataset).__name__}.")
    info.setdefault("name", info["id"])
    return info


def _hub_dataset_id(info: Mapping[str, Any]) -> str | None:
    """A dataset id worth listing in ``datasets:``: ``org/name`` that is not a local path."""
    dataset_id = info.get("id")
    if not dataset_id or os.path.exists(dataset_id) or dataset_id.count("/") != 1:
        return None
    try:
        validate_repo_id(dataset_id)
    except HFValidationError:
        return None
    return dataset_id


def _dataset_description(info: Mapping[str, Any], with_split: bool = True) -> str:
    if not info:
        return ""
    hub_id = _hub_dataset_id(info)
    text = f"[{info['name']}](https://huggingface.co/datasets/{hub_id})" if hub_id else f"`{info['name']}`"
    if not with_split:
        return text
    details = [f"config `{info['config']}`" if info.get("config") else "", f"split `{info['split']}`" if info.get("split") else ""]
    details = [d for d in details if d]
    return text + (f" ({', '.join(details)})" if details else "")


def _eval_results(metrics: Mapping[str, Mapping[str, float]], info: Mapping[str, Any]) -> list[EvalResult]:
    """One ``EvalResult`` per task and metric; ``metric_name`` is ``"<task> <metric>"``.

    The model-index groups results by task type and dataset, not by ``task_name``, so the
    hf_tlmtl task travels in each metric's name (task names are identifiers: no spaces).
    """
    return [
        EvalResult(
            task_type=PIPELINE_TAG,
            task_name="Multi-task image classification",
            dataset_type=info.get("id") or "custom",
            dataset_name=info.get("name") or "evaluation set",
            dataset_config=info.get("config"),
            dataset_split=info.get("split"),
            dataset_revision=info.get("revision"),
            metric_type=metric,
            metric_name=f"{task} {metric}",
            metric_value=value,
        )
        for task, values in metrics.items()
        for metric, value in values.items()
    ]


def metrics_from_card(card: ModelCard | str | os.PathLike) -> dict[str, dict[str, float]]:
    """Per-task metrics ``{task: {metric: value}}`` read back from a card's ``model-index``.

    ``card`` is a ``ModelCard`` or the path of a ``README.md``.

    Example:
        >>> from huggingface_hub import ModelCard
        >>> text = ("---\\nmodel-index:\\n- name: m\\n  results:\\n  - task: {type: image-classification}\\n"
        ...         "    dataset: {name: d, type: d}\\n    metrics:\\n    - {type: mae, name: size mae, value: 0.5}\\n---\\n")
        >>> metrics_from_card(ModelCard(text))
        {'size': {'mae': 0.5}}
    """
    if not isinstance(card, ModelCard):
        card = ModelCard.load(card)
    result: dict[str, dict[str, float]] = {}
    for item in card.data.eval_results or []:
        task, _, metric = (item.metric_name or "").partition(" ")
        if task and metric == item.metric_type:
            result.setdefault(task, {})[metric] = item.metric_value
    return result


# ------------------------------------------------------------------------------ body pieces
def _task_rows(tasks: Sequence[TaskSpec]) -> list[dict[str, Any]]:
    rows = []
    for task in tasks:
        if task.labels:
            shown = ", ".join(task.labels[:10]) + (f", ... ({len(task.labels)} in total)" if len(task.labels) > 10 else "")
        else:
            shown = f"{task.num_outputs} {'value' if task.type == 'regression' else 'class'}{'s' if task.num_outputs != 1 else ''}"
        loss = task.loss + (f" (label smoothing {task.label_smoothing})" if task.label_smoothing else "")
        if task.type == "regression" and task.loss in ("huber", "smooth_l1"):
            loss += f" (delta {task.huber_delta})"
        rows.append({"name": task.name, "type": task.type, "outputs": shown, "loss": loss, "weight": _plain(task.weight)})
    return rows


def _unwrap(model: Any) -> tuple[Any, Any | None]:
    """``(TimmMultiTaskModel, peft model or None)``; a clear error for anything else."""
    return unwrap(model), (model if is_peft_model(model) else None)


def _lora_description(peft_model: Any) -> str:
    config = next(iter(peft_model.peft_config.values()))
    parts = [str(getattr(config, "peft_type", "adapter")).split(".")[-1]]
    if getattr(config, "r", None):
        parts.append(f"r={config.r}, lora_alpha={config.lora_alpha}")
    targets = getattr(config, "target_modules", None)
    if targets:
        parts.append(f"target modules {sorted(targets) if not isinstance(targets, str) else targets}")
    return ", ".join(parts)


def _transfer_section(
    transfer_summary: Any, recommendation: Any, args: Mapping[str, Any], peft_model: Any | None
) -> dict[str, Any]:
    summary = _as_dict(transfer_summary) if transfer_summary is not None else {}
    strategy = summary.get("strategy") or args.get("transfer_strategy")
    if peft_model is not None and not strategy:
        strategy = "lora"
    groups = []
    for group in summary.get("groups") or []:
        group = _as_dict(group)
        trainable, total = int(group["trainable"]), int(group["total"])
        status = "trained" if trainable == total and total else ("partly trained" if trainable else "frozen")
        groups.append({"name": group["name"], "trainable": f"{trainable:,}", "total": f"{total:,}", "status": status})
    rec = _as_dict(recommendation) if recommendation is not None else None
    adapters = None
    if peft_model is not None:
        adapters = _lora_description(peft_model)
    elif strategy == "lora" and args:
        adapters = f"LoRA r={args.get('lora_r')}, lora_alpha={args.get('lora_alpha')}, target modules {args.get('lora_target_modules')}"
    unfreeze = None
    if args.get("gradual_unfreeze"):
        every = args.get("unfreeze_every_n_steps")
        unfreeze = f"every {every} steps" if every else "every epoch"
    return {
        "strategy": strategy,
        "strategy_description": _STRATEGY_DESCRIPTIONS.get(strategy, "custom"),
        "recommendation": {k: rec.get(k) for k in ("case", "strategy", "reason")} if rec else None,
        "layer_decay": args.get("layer_decay"),
        "head_lr_scale": _plain(args.get("head_lr_scale", 1.0)),
        "gradual_unfreeze": unfreeze,
        "adapters": adapters,
        "groups": groups,
    }


def _hyperparameters(args: Mapping[str, Any]) -> list[tuple[str, Any]]:
    keys = list(_HYPERPARAMETERS) + (list(_LORA_HYPERPARAMETERS) if args.get("transfer_strategy") == "lora" else [])
    rows = []
    for key in keys:
        value = args.get(key)
        unset = value is None or value is False or (key in ("max_steps", "warmup_steps") and value in (0, -1))
        if unset or (key in ("warmup_ratio", "label_smoothing_factor") and not value):
            continue
        rows.append((key, _plain(value)))
    return rows


def _result_rows(per_task: Mapping[str, Mapping[str, float]]) -> list[dict[str, str]]:
    return [{"task": t, "metric": m, "value": f"{v:.4g}"} for t, values in per_task.items() for m, v in values.items()]


def _format_params(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit} ({count:,})"
    return f"{count:,}"


# ------------------------------------------------------------------------------------- cards
def create_model_card(
    model: Any,
    metrics: Mapping[str, Any] | None = None,
    dataset: str | Mapping[str, Any] | None = None,
    training_args: Any = None,
    transfer_summary: Any = None,
    base_model: str | None = None,
    curves_image: str | os.PathLike | None = None,
    delta_m: float | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
    recommendation: Any = None,
    example_image: str = "image.jpg",
) -> ModelCard:
    """A Hub model card for a :class:`~hf_tlmtl.TimmMultiTaskModel` (or a peft model wrapping one).

    Args:
        model: The model (its config gives the backbone, tasks, input size and source weights).
        metrics: ``{task: {metric: value}}`` or flat Trainer output (``eval_<task>_<metric>``).
            Each becomes a ``model-index`` entry and a row of the results table.
        dataset: Dataset id / name, or ``{"id", "name", "split", "config", "revision"}``.
            ``org/name`` ids are also listed under ``datasets:``.
        training_args: ``MultiTaskTrainingArguments`` (or a dict): hyperparameters, strategy, LLRD.
        transfer_summary: ``hf_tlmtl.transfer.TransferSummary`` (or its dict): frozen/trained groups.
        base_model: Hub id of the source weights; default: derived from ``config.backbone_source``.
        curves_image: Training-curve image, linked by file name (keep it beside ``README.md``).
        delta_m: Multi-task gain over single-task baselines, in percent.
        license: SPDX-like Hub license id.
        repo_id: Hub id (or local path) used in the usage snippets.
        recommendation: ``hf_tlmtl.transfer.Recommendation`` that chose the strategy (case, reason).
        example_image: Image path shown in the usage snippets.

    Raises:
        ValueError: metrics for a task the model does not have, or non-numeric metric values.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="size", type="regression")])
        >>> card = create_model_card(model, metrics={"size": {"mae": 0.12}}, repo_id="me/sizes")
        >>> "| `size` | regression |" in card.text and 'AutoModel.from_pretrained("me/sizes")' in card.text
        True
    """
    base, peft_model = _unwrap(model)
    config: TimmMultiTaskConfig = base.config
    tasks = list(base.tasks)
    per_task = normalize_metrics(metrics, tasks)
    info = _dataset_info(dataset)
    args = {k: _plain(v) for k, v in _as_dict(training_args).items()}
    base_model = base_model or base_model_id(config.backbone_source)
    if base_model:
        _check_hub_id(base_model, "base_model")

    total = sum(p.numel() for p in model.parameters())
    summary = _as_dict(transfer_summary) if transfer_summary is not None else {}
    trainable = int(summary.get("trainable_params") or sum(p.numel() for p in model.parameters() if p.requires_grad))
    input_size = list(config.data_config.get("input_size") or [])
    resolution = "x".join(str(s) for s in input_size[1:]) or "the model's input size"
    title_name = repo_id.rstrip("/").split("/")[-1] if repo_id else f"{config.backbone} multi-task model"

    tags = list(dict.fromkeys([*CARD_TAGS, *(getattr(base, "model_tags", None) or [])]))
    if peft_model is not None or args.get("transfer_strategy") == "lora":
        tags += ["peft", "lora"]
    hub_dataset = _hub_dataset_id(info) if info else None
    card_data = ModelCardData(
        license=license,
        library_name=LIBRARY_NAME,
        tags=tags,
        base_model=base_model,
        datasets=[hub_dataset] if hub_dataset else None,
        pipeline_tag=PIPELINE_TAG,
        model_name=title_name,
        eval_results=_eval_results(per_task, info) or None,
    )
    curves_name = Path(curves_image).name if curves_image else None
    template_vars = {
        "title": title_name,
        "backbone": config.backbone,
        "timm_kwargs": ", ".join(f"{k}={v!r}" for k, v in sorted(config.timm_kwargs.items())) or None,
        "truncate_stage": config.truncate_stage,
        "bn_policy": getattr(config, "bn_policy", None),
        "source_weights": _source_weights_description(config.backbone_source, base_model),
        "head_description": (
            f"2-layer MLP per task (hidden width {config.head_hidden_size})" if config.head_hidden_size else "one linear layer per task"
        )
        + (f", dropout {config.head_dropout}" if config.head_dropout else "")
        + f", on {base.head_in_features}-d pooled features",
        "total_params": _format_params(total),
        "trainable_params": _format_params(trainable),
        "trainable_percent": f"{100 * trainable / max(total, 1):.1f}%",
        "input_description": (
            f"{input_size[0] if input_size else 3}-channel {resolution} images, mean {config.data_config.get('mean')}, "
            f"std {config.data_config.get('std')}, {config.data_config.get('interpolation', 'bilinear')} resize "
            f"(crop_pct {config.data_config.get('crop_pct')}); `AutoImageProcessor` applies exactly this eval transform"
        ),
        "input_resolution": resolution,
        "license": license,
        "tasks": _task_rows(tasks),
        "transfer": _transfer_section(transfer_summary, recommendation, args, peft_model),
        "hyperparameters": _hyperparameters(args),
        "dataset_description": _dataset_description(info, with_split=False),
        "eval_dataset_description": _dataset_description(info),
        "curves_image": curves_name,
        "results": _result_rows(per_task),
        "delta_m": None if delta_m is None else f"{_check_value('delta_m', 'delta_m', delta_m):+.2f}",
        "model_id": repo_id or "path/to/model",
        "example_image": example_image,
        "base_model": base_model,
    }
    with template_path(MODEL_CARD_TEMPLATE) as path:
        return ModelCard.from_template(card_data, template_path=str(path), **template_vars)




def _nested_metrics(metrics: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` checked for numbers only, for cards whose tasks are unknown."""
    if not metrics:
        return {}
    if not all(isinstance(v, Mapping) for v in metrics.values()):
        raise ValueError("Without the base model's tasks, metrics must be nested: {task: {metric: value}}.")
    return {t: {m: _check_value(t, m, v) for m, v in values.items()} for t, values in metrics.items()}


__all__ = [
    "base_model_id",
    "create_model_card",
    "metrics_from_card",
    "normalize_metrics",
    "template_path",
]
