"""Configuration of :class:`~hf_tlmtl.TimmMultiTaskModel`."""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedConfig

from .tasks import TaskSpec, normalize_tasks

HOW_TO_LOAD = (
    "pip install hf_tlmtl; import hf_tlmtl  # before transformers.AutoModel / AutoConfig / pipeline: importing it "
    "registers model_type 'timm_multitask' (no trust_remote_code). Without it transformers says it 'does not "
    "recognize this architecture'."
)
"""Saved in every ``config.json`` (``how_to_load``): transformers' own error for an unknown model type cannot be changed."""


def _jsonable(value: Any) -> Any:
    """Tuples become lists so a config equals itself after a JSON round trip."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class TimmMultiTaskConfig(PreTrainedConfig):
    r"""Configuration of a timm backbone with one head per task.

    Args:
        backbone: timm architecture name (``"resnet50"``, ``"vit_small_patch16_224"``, ...). Backbones
            loaded from ``hf-hub:`` / ``local-dir:`` store the resolved architecture here.
        backbone_source: Where the source weights came from (``"resnet50.a1_in1k"``,
            ``"hf-hub:timm/..."``, ``"local-dir:/path"``); provenance for model cards, never re-read.
        timm_kwargs: Extra arguments to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ...).
        tasks: The tasks, as :class:`~hf_tlmtl.TaskSpec` or their dicts (stored as dicts).
        head_hidden_size: ``None`` for linear heads, else the hidden width of a 2-layer MLP head.
        head_dropout: Dropout before each head's linear layer(s).
        truncate_stage: Index into the backbone's ``feature_info`` of the last stage kept
            (``None``: the whole backbone). Set by the ``truncate`` transfer strategy.
        bn_policy: The BatchNorm policy it was trained with (``"train"``, ``"frozen"``, ``"recalibrate"``;
            ``None``: not set by a transfer strategy). Set by :func:`~hf_tlmtl.transfer.apply_transfer_strategy`;
            provenance for model cards (a reloaded model's BatchNorm layers are ordinary ones again).
        data_config: timm data config (``input_size``, ``mean``, ``std``, ``interpolation``,
            ``crop_pct``, ``crop_mode``) resolved when the model is created (from the backbone when
            the config has none).
        how_to_load: Not a setting: the line ``config.json`` carries for someone who opens it after
            transformers failed to load it (``pip install hf_tlmtl; import hf_tlmtl``).

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskConfig
        >>> config = TimmMultiTaskConfig(backbone="test_resnet", tasks=[TaskSpec(name="y", type="regression")])
        >>> config.task_specs[0].num_outputs
        1
        >>> TimmMultiTaskConfig.from_json_string(config.to_json_string()).to_dict() == config.to_dict()
        True
    """

    model_type = "timm_multitask"
    # The Trainer drops these output keys when it gathers predictions: only logits are evaluated.
    keys_to_ignore_at_inference = ["task_losses", "pooled", "hidden_states", "labelled_tasks"]

    backbone: str = "resnet18"
    backbone_source: str | None = None
    timm_kwargs: dict[str, Any] | None = None
    tasks: list[dict[str, Any]] | None = None
    head_hidden_size: int | None = None
    head_dropout: float = 0.0
    truncate_stage: int | None = None
    bn_policy: str | None = None
    data_config: dict[str, Any] | None = None
    initializer_range: float = 0.02
    how_to_load: str = HOW_TO_LOAD

    def __post_init__(self, **kwargs: Any) -> None:
        self.how_to_load = HOW_TO_LOAD  # always today's wording, whatever an older file said
        self.timm_kwargs = _jsonable(dict(self.timm_kwargs or {}))
        self.tasks = [t.to_dict() for t in normalize_tasks(self.tasks)] if self.tasks else []
        self.data_config = _jsonable(dict(self.data_config or {}))
        if self.head_hidden_size is not None and int(self.head_hidden_size) < 1:
            raise ValueError(f"head_hidden_size must be a positive int or None, got {self.head_hidden_size}.")
        if not 0.0 <= float(self.head_dropout) < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}.")
        super().__post_init__(**kwargs)

    @classmethod
    def from_json_string(cls, text: str) -> "TimmMultiTaskConfig":

        return cls.from_dict(json.loads(text))

    @property
    def task_specs(self) -> list[TaskSpec]:
        """The tasks as :class:`~hf_tlmtl.TaskSpec` objects (validated)."""
        return normalize_tasks(self.tasks) if self.tasks else []

    def set_data_config(self, data_config: dict[str, Any]) -> None:
        """Replace timm's data config (stored JSON-ready: tuples become lists)."""
        self.data_config = _jsonable(dict(data_config))

    def set_tasks(self, tasks: list[TaskSpec | dict[str, Any]]) -> None:
        """Replace the tasks (validated), e.g. to re-head a trained model for new tasks."""
        self.tasks = [t.to_dict() for t in normalize_tasks(tasks)]

    @property
    def in_chans(self) -> int:
        input_size = self.data_config.get("input_size") or [self.timm_kwargs.get("in_chans", 3)]
        return int(input_size[0])
