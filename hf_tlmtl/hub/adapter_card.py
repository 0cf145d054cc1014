"""A card for a PEFT adapter saved on its own, naming its base model (:func:`create_adapter_card`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import (
    ModelCard,
    ModelCardData,
)
from safetensors import safe_open

from ..backbone.unwrap import is_peft_model
from ..configuration import TimmMultiTaskConfig
from ..tasks import TaskSpec
from .cards import (
    _DEFAULT_CARD_HEADING,
    ADAPTER_CARD_TEMPLATE,
    ADAPTER_CONFIG_NAME,
    ADAPTER_TAGS,
    CARD_NAME,
    PIPELINE_TAG,
    _check_hub_id,
    _dataset_description,
    _dataset_info,
    _eval_results,
    _format_params,
    _hub_dataset_id,
    _nested_metrics,
    _result_rows,
    _task_rows,
    normalize_metrics,
    template_path,
)


def _adapter_config(adapter: Any) -> tuple[Any, Path | None, Any | None]:
    """``(peft config, adapter folder or None, peft model or None)``."""
    if is_peft_model(adapter):
        return next(iter(adapter.peft_config.values())), None, adapter
    folder = Path(adapter)
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        raise ValueError(
            f"{folder} is not a saved PEFT adapter ({ADAPTER_CONFIG_NAME} missing). Save one with "
            "peft_model.save_pretrained(DIR) or pass the peft model itself."
        )
    from peft import PeftConfig  # peft only for an adapter folder: model cards and the pipeline never need it

    return PeftConfig.from_pretrained(str(folder)), folder, None


def _count_adapter_params(folder: Path) -> int | None:

    files = sorted(folder.glob("adapter_model*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def _base_tasks(base_model: str, peft_model: Any | None) -> list[TaskSpec]:
    if peft_model is not None:
        return list(peft_model.get_base_model().tasks)
    try:
        return TimmMultiTaskConfig.from_pretrained(base_model, local_files_only=True).task_specs
    except (OSError, ValueError):
        return []  # base model not available locally: the card then omits the tasks table


def can_replace_card(path: Path) -> bool:
    """Only a missing card or peft's untouched default card may be replaced without ``overwrite=True``."""
    return not path.exists() or _DEFAULT_CARD_HEADING in path.read_text(encoding="utf-8")


def create_adapter_card(
    adapter: Any,
    base_model: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    dataset: str | Mapping[str, Any] | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
    subfolder: str | None = None,
    tasks: Sequence[TaskSpec] | None = None,
    save: bool = True,
    overwrite: bool = False,
) -> ModelCard:
    """A card for a PEFT adapter saved on its own, naming the hf_tlmtl base model it needs.

    Args:
        adapter: The adapter folder (with ``adapter_config.json``) or the ``peft.PeftModel``.
        base_model: Hub id or local path of the hf_tlmtl model the adapter was trained on;
            default: ``base_model_name_or_path`` of the adapter config. A Hub id is also the
            card's ``base_model`` metadata.
        metrics, dataset: As in :func:`create_model_card` (tasks come from the base model's config
            when it can be read locally).
        license: Hub license id.
        repo_id: Hub id (or path) of the adapter, for the usage snippet.
        subfolder: Folder of the adapter inside ``repo_id`` (e.g. ``adapters/<name>`` when it was
            pushed with its base model by :func:`push_model_to_hub`).
        tasks: The base model's tasks (default: read from the base model's config when it is
            a local folder or in the local Hub cache; else the card has no tasks table).
        save: Write the card to ``<adapter folder>/README.md`` (folders only).
        overwrite: Replace an existing ``README.md`` that is not peft's untouched default card.

    Raises:
        ValueError: the base model is unknown, the folder is not an adapter, or a README.md
            written by someone would be overwritten without ``overwrite=True``.

    Example:
        >>> import json, tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = open(f"{d}/adapter_config.json", "w").write(json.dumps(
        ...     {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["conv1"]}))
        >>> card = create_adapter_card(d, base_model="me/shapes-model")
        >>> card.data.base_model, "PeftModel.from_pretrained(base" in open(f"{d}/README.md").read()
        ('me/shapes-model', True)
    """
    peft_config, folder, peft_model = _adapter_config(adapter)
    base_model = base_model or getattr(peft_config, "base_model_name_or_path", None)
    where = folder or "this peft model"
    if not base_model:
        raise ValueError(
            f"The adapter at {where} does not record its base model (base_model_name_or_path is null): pass "
            "base_model='org/name' (the Hub id or local path of the hf_tlmtl model it was trained on)."
        )
    if folder is not None and save and not overwrite and not can_replace_card(folder / CARD_NAME):
        raise ValueError(f"{folder / CARD_NAME} already exists; pass overwrite=True to replace it (or save=False).")
    is_local_base = os.path.exists(base_model)
    if not is_local_base:
        _check_hub_id(base_model, "base_model")
    tasks = list(tasks) if tasks is not None else _base_tasks(base_model, peft_model)
    per_task = normalize_metrics(metrics, tasks) if tasks else _nested_metrics(metrics)
    info = _dataset_info(dataset)
    peft_type = str(getattr(peft_config, "peft_type", "adapter")).split(".")[-1]
    targets = getattr(peft_config, "target_modules", None)
    saved = getattr(peft_config, "modules_to_save", None)
    if peft_model is not None:
        adapter_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    else:
        adapter_params = _count_adapter_params(folder)
    adapter_id = repo_id or (str(folder) if folder else "path/to/adapter")
    hub_dataset = _hub_dataset_id(info) if info else None
    card_data = ModelCardData(
        license=license,
        library_name="peft",
        tags=list(dict.fromkeys([*ADAPTER_TAGS, peft_type.lower()])),
        base_model=None if is_local_base else base_model,
        datasets=[hub_dataset] if hub_dataset else None,
        pipeline_tag=PIPELINE_TAG,
        model_name=adapter_id.rstrip("/").split("/")[-1],
        eval_results=_eval_results(per_task, info) or None,
    )
    template_vars = {
        "title": f"{peft_type} adapter for {base_model}",
        "peft_type": peft_type,
        "base_model": base_model,
        "base_model_link": f"`{base_model}` (local path)" if is_local_base else f"[{base_model}](https://huggingface.co/{base_model})",
        "rank": getattr(peft_config, "r", None),
        "alpha": getattr(peft_config, "lora_alpha", None),
        "dropout": getattr(peft_config, "lora_dropout", None),
        "target_modules": f"`{targets}`" if isinstance(targets, str) else ", ".join(f"`{t}`" for t in sorted(targets or [])) or "none",
        "modules_to_save": ", ".join(f"`{m}`" for m in saved or []) or "none",
        "adapter_params": _format_params(adapter_params) if adapter_params is not None else "unknown",
        "license": license,
        "tasks": _task_rows(tasks),
        "results": _result_rows(per_task),
        "dataset_description": _dataset_description(info),
        "adapter_id": adapter_id,
        "subfolder": subfolder,
    }
    with template_path(ADAPTER_CARD_TEMPLATE) as path:
        card = ModelCard.from_template(card_data, template_path=str(path), **template_vars)
    if folder is not None and save:
        card.save(folder / CARD_NAME)
    return card
