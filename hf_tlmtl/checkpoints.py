"""Checks on a saved folder before anything is loaded from it, each failing with what to do.

- :func:`check_model_folder`: a saved model's ``config.json`` parses (else the file and the JSON
  error's line and column are named) and its weights are safetensors. This package loads
  ``model.safetensors`` (or sharded safetensors) only: a folder with only ``pytorch_model.bin`` (a
  pickle) is refused with the one-line conversion instead of torch.load's text.
- :func:`backbone_load_error`: after a load, backbone weights the checkpoint did not provide (or
  provided in another shape) make it an error: a model that silently trains from random weights
  is worse than one that does not start.
- :func:`checkpoint_mismatch`: a Trainer checkpoint to resume from holds the weights of *this* model
  (names and shapes, read from the safetensors headers without loading a tensor).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "config.json").write_text('{"model_type": "timm_multitask",}')
    >>> try:
    ...     check_model_folder(d)
    ... except ValueError as e:
    ...     print(str(e).split("JSON: ")[1])
    Expecting property name enclosed in double quotes at line 1 column 33; fix it, or save the model again with save_pretrained
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .backbone.unwrap import is_peft_model, unwrap

CONFIG_NAME = "config.json"
MODEL_TYPE = "timm_multitask"
"""The ``model_type`` of every folder this package loads (``TimmMultiTaskConfig.model_type``)."""
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """``json.loads`` of a file; a ``ValueError`` that names the file and the error position otherwise."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{what + ': ' if what else ''}{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
            "fix it, or save the model again with save_pretrained"
        ) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what + ': ' if what else ''}{path} is not a UTF-8 text file ({e.reason}); save the model again") from None


def conversion_command(folder: str | os.PathLike) -> str:
    """The one line that turns a trusted ``pytorch_model.bin`` folder into ``model.safetensors``."""
    return (
        "python -c \"from hf_tlmtl import TimmMultiTaskModel as M; "
        f"M.from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}')\""
    )


def check_model_folder(folder: str | os.PathLike, what: str = "", allow_pickle: bool = False) -> None:
    """A local saved-model folder: ``config.json`` is valid JSON, and the weights are safetensors.

    Not a local folder (a Hub id): nothing to check here. ``allow_pickle=True`` (``from_pretrained(...,
    use_safetensors=False)``) accepts ``pytorch_model.bin``, which transformers then reads with torch's
    ``weights_only=True``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    prefix = f"{what}: " if what else ""
    if (folder / CONFIG_NAME).is_file():
        config = read_json(folder / CONFIG_NAME, what)
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type != MODEL_TYPE:
            code = " Its auto_map points to Python files in the folder, which hf_tlmtl never runs." if "auto_map" in config else ""
            raise ValueError(
                f"{prefix}{folder / CONFIG_NAME} describes a {model_type!r} model, not an hf_tlmtl one (model_type "
                f"{MODEL_TYPE!r}).{code} Pass a folder written by save_pretrained / recipes/finetune.py."
            )
    if (folder / SAFE_WEIGHTS[0]).is_file():
        safetensors_shapes([folder / SAFE_WEIGHTS[0]])  # a damaged file is named now, not by the loader
        return
    if (folder / SAFE_WEIGHTS[1]).is_file():
        index = read_json(folder / SAFE_WEIGHTS[1], what)
        shards = sorted({folder / shard for shard in index.get("weight_map", {}).values()})
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise ValueError(f"{prefix}{folder / SAFE_WEIGHTS[1]} names weight files that are not there: {missing}; copy them too")
        safetensors_shapes(shards)
        return
    if allow_pickle:
        return
    pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin")) + [n for n in PICKLE_WEIGHTS[1:] if (folder / n).is_file()]
    if pickles:
        raise ValueError(
            f"{prefix}{folder} has only {', '.join(pickles)} (a pickle); only safetensors are loaded. If you trust "
            f"the file, convert it once with: {conversion_command(folder)}"
        )
    if (folder / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"{prefix}{folder} holds a peft adapter ({ADAPTER_WEIGHTS}), not a model; pass the folder of the merged "
            "model (recipes/finetune.py writes it to output_dir, the adapter to output_dir/adapter)"
        )
    raise ValueError(f"{prefix}{folder} has no model.safetensors; pass a folder written by save_pretrained / recipes/finetune.py")


def _is_backbone_weight(key: str) -> bool:
    """Backbone tensors a checkpoint must hold. BatchNorm statistics may be absent: they start at transformers'
    defaults (mean 0, variance 1), as a checkpoint saved frozen lacks its step counters."""
    return key.startswith("backbone.") and not key.endswith(("num_batches_tracked", "running_mean", "running_var"))


def backbone_load_error(source: Any, model: Any, loading_info: dict[str, Any]) -> str | None:
    """Why a load left backbone weights unset (missing from the checkpoint or of another shape), or None."""
    missing = sorted(k for k in loading_info.get("missing_keys", ()) if _is_backbone_weight(k))
    mismatched = [item for item in loading_info.get("mismatched_keys", ()) if _is_backbone_weight(item[0])]
    if not missing and not mismatched:
        return None
    total = sum(1 for k in model.state_dict() if _is_backbone_weight(k))
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the {total} backbone weights are missing (e.g. {', '.join(missing[:3])})")
    if mismatched:
        key, saved, wanted = mismatched[0][:3]
        parts.append(f"{len(mismatched)} have another shape (e.g. {key}: saved {tuple(saved)}, model {tuple(wanted)})")
    return (
        f"{source}: the checkpoint does not hold a {model.config.backbone!r} backbone: {'; '.join(parts)}. "
        "Its weights were not saved from this architecture (or the file is incomplete); save the source model "
        "again with save_pretrained, or build a new model with TimmMultiTaskModel.from_backbone"
    )


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in safetensors ``files``, read from their headers (no tensor is loaded).

    A damaged file (cut short, or a header that does not describe the file) is a ``ValueError`` naming it.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
        >>> save_file({"w": torch.zeros(3, 2)}, path)
        >>> safetensors_shapes([path])
        {'w': (3, 2)}
        >>> _ = path.write_bytes(path.read_bytes()[:-4])
        >>> safetensors_shapes([path])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../model.safetensors is damaged (incomplete metadata, file not fully covered): it was cut short or overwritten; save or copy it again.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except SafetensorError as e:
            reason = str(e).removeprefix("Error while deserializing header: ")
            raise ValueError(f"{file} is damaged ({reason}): it was cut short or overwritten; save or copy it again.") from None
    return shapes


def _checkpoint_weights(checkpoint: Path) -> tuple[str, dict[str, tuple[int, ...]]] | None:
    """(kind, name -> shape) of the weights in a Trainer checkpoint: ``model`` or ``adapter``."""
    if (checkpoint / SAFE_WEIGHTS[0]).is_file():
        return "model", safetensors_shapes([checkpoint / SAFE_WEIGHTS[0]])
    if (checkpoint / SAFE_WEIGHTS[1]).is_file():
        index = read_json(checkpoint / SAFE_WEIGHTS[1])
        shards = sorted({checkpoint / name for name in index.get("weight_map", {}).values()})
        return "model", safetensors_shapes(shards)
    if (checkpoint / ADAPTER_WEIGHTS).is_file():
        return "adapter", safetensors_shapes([checkpoint / ADAPTER_WEIGHTS])
    return None


def _describe_config(config: dict[str, Any]) -> str:
    tasks = ", ".join(f"{t.get('name')} ({t.get('type')}, {t.get('num_labels')})" for t in config.get("tasks") or [])
    stage = f", truncated at stage {config['truncate_stage']}" if config.get("truncate_stage") is not None else ""
    return f"backbone {config.get('backbone')!r}{stage}, tasks {tasks or '?'}"


def checkpoint_mismatch(model: Any, checkpoint: str | os.PathLike) -> str | None:
    """How the weights of Trainer checkpoint ``checkpoint`` differ from ``model``'s (what
    ``Trainer.train(resume_from_checkpoint=...)`` would load into it), or None when they fit."""
    checkpoint = Path(checkpoint)
    found = _checkpoint_weights(checkpoint)
    if found is None:
        return None  # nothing this check can read; the Trainer reports what it misses
    kind, saved = found
    if is_peft_model(model):
        if kind != "adapter":
            return "it holds a full model, this run trains a peft adapter"
        from peft.utils import get_peft_model_state_dict  # peft only for a peft model: plain loads never need it

        wanted = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    else:
        if kind != "model":
            return "it holds a peft adapter, this run trains the full model"
        wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ignore = lambda k: k.endswith("num_batches_tracked")  # noqa: E731 - absent when BatchNorm is frozen
    missing = sorted(k for k in wanted if k not in saved and not ignore(k))
    extra = sorted(k for k in saved if k not in wanted and not ignore(k))
    reshaped = sorted(k for k in wanted if k in saved and saved[k] != wanted[k])
    if not (missing or extra or reshaped):
        return None
    parts = []
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} weights differ in shape (e.g. {k}: checkpoint {saved[k]}, this run {wanted[k]})")
    if missing:
        parts.append(f"{len(missing)} of this run's weights are not in it (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} of its weights are not in this run's model (e.g. {extra[0]})")
    described = "; ".join(parts)
    if (checkpoint / CONFIG_NAME).is_file():
        try:
            described = f"it was written for {_describe_config(read_json(checkpoint / CONFIG_NAME))}: " + described
        except ValueError:
            pass
    base = unwrap(model)
    return f"{described}; this run builds {_describe_config(base.config.to_dict())}"


__all__ = ["backbone_load_error", "check_model_folder", "checkpoint_mismatch", "conversion_command", "read_json"]
