"""TimmMultiTaskModel: any timm backbone, one head per task, as a ``transformers.PreTrainedModel``."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
from timm.models import parse_model_name
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .backbone.anatomy import block_class_names
from .backbone.create import (
    backbone_data_config,
    create_backbone,
    resolve_backbone_source,
    truncate_backbone,
)
from .checkpoints import backbone_load_error, check_model_folder
from .configuration import TimmMultiTaskConfig
from .image_processing import TimmMultiTaskImageProcessor
from .tasks import TaskSpec, normalize_tasks

logger = logging.get_logger(__name__)


@dataclass
class MultiTaskOutput(ModelOutput):
    """Output of :class:`TimmMultiTaskModel`.

    With ``return_dict=False`` (or ``config.return_dict=False``) the model returns the plain tuple of
    the fields that are not ``None``, in this order.

    Attributes:
        loss: Weighted sum of the task losses (only when labels were given).
        logits: Raw head outputs by task name, each ``(batch, num_outputs)``.
        task_losses: Each task's own (unweighted) loss, for the tasks that got labels.
        pooled: The shared pooled backbone features, ``(batch, head_in_features)``.
        hidden_states: Only with ``output_hidden_states``: the backbone's per-stage features, one
            ``(batch, channels, height, width)`` map per ``backbone.feature_info`` entry (timm's
            ``forward_intermediates``; ViTs give their tokens as a grid).
        labelled_tasks: The tasks (of those given targets) with at least one labelled row in the batch, in
            ``task_losses`` order; a task whose targets are all missing has an exact-zero loss and is not
            here. Kept out of the tuple form (``return_dict=False`` keeps the fields above) and of the
            predictions the Trainer gathers.
    """

    loss: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] | None = None
    task_losses: dict[str, torch.Tensor] | None = None
    pooled: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    labelled_tasks: tuple[str, ...] | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-``None`` fields but ``labelled_tasks``, in order (what ``return_dict=False`` returns)."""
        return tuple(value for key, value in self.items() if key != "labelled_tasks")


class HeadLinear(nn.Linear):
    """A linear layer of a task head: the model initialises these itself (``_init_weights``), timm the rest.

    Its own type, because transformers initialises missing weights module by module and skips
    modules without direct parameters (``TaskHead``): the layers must be recognisable on their own.

    Example:
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> type(m.heads["y"].fc).__name__, m.heads["y"].fc.bias.abs().sum().item()
        ('HeadLinear', 0.0)
    """


class TaskHead(GradientCheckpointingLayer):
    """Dropout + linear layer, or a 2-layer MLP when ``hidden_size`` is set.

    A ``GradientCheckpointingLayer``: ``model.gradient_checkpointing_enable(...)`` checkpoints each head
    with transformers' checkpoint function (and its ``use_reentrant``), while timm checkpoints the
    backbone's own blocks.
    """

    def __init__(self, in_features: int, num_outputs: int, hidden_size: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        if hidden_size:
            self.hidden = nn.Sequential(HeadLinear(in_features, hidden_size), nn.GELU(), nn.Dropout(dropout))
            in_features = hidden_size
        else:
            self.hidden = nn.Identity()
        self.fc = HeadLinear(in_features, num_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.dropout(pooled)))




def _drop_load_report(record: Any) -> bool:
    """Logging filter: False for transformers' state-dict load report, True for everything else."""
    return "LOAD REPORT" not in str(record.msg)


def _check_saved_folder(path: Any, kwargs: dict[str, Any]) -> None:
    """A local folder: valid config.json and safetensors weights (see :mod:`hf_tlmtl.checkpoints`)."""
    if isinstance(path, (str, os.PathLike)) and kwargs.get("state_dict") is None:
        check_model_folder(path, allow_pickle=kwargs.get("use_safetensors") is False)


def _same_head(old: TaskSpec, new: TaskSpec) -> bool:
    """A saved head serves a new task of its name only if type, size and class names (when both have them) match."""
    same_labels = old.labels is None or new.labels is None or old.labels == new.labels
    return old.type == new.type and old.num_outputs == new.num_outputs and same_labels


def _supports_grad_checkpointing(backbone: nn.Module) -> bool:
    """Whether timm can checkpoint this backbone (some families have the method but raise), as TimmWrapper checks."""
    if not hasattr(backbone, "set_grad_checkpointing"):
        return False
    enabled = bool(getattr(backbone, "grad_checkpointing", False))
    try:
        backbone.set_grad_checkpointing(True)
        backbone.set_grad_checkpointing(enabled)
    except Exception:  # noqa: BLE001 - any failure means "not supported"
        return False
    return True


@contextmanager
def _timm_reentrant_checkpointing(use_reentrant: bool | None) -> Iterator[None]:
    """Run timm's own checkpoint calls with ``use_reentrant`` (timm reads a process-wide flag); ``None``: timm's default."""
    if use_reentrant is None:
        yield
        return
    previous = use_reentrant_ckpt()
    set_reentrant_ckpt(bool(use_reentrant))
    try:
        yield
    finally:
        set_reentrant_ckpt(previous)


class TimmMultiTaskPreTrainedModel(PreTrainedModel):
    config_class = TimmMultiTaskConfig
    config: TimmMultiTaskConfig
    # The model is its own base model (there is no inner PreTrainedModel): the prefix is the model type and
    # names no attribute, so ``model.base_model is model`` and ``model.base_model.save_pretrained`` works.
    base_model_prefix = "timm_multitask"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    model_tags = ["timm", "hf_tlmtl", "multi-task"]
    supports_gradient_checkpointing = True
    # Labels arrive as **kwargs by task name: they are not loss kwargs for the Trainer.
    accepts_loss_kwargs = False
    _no_split_modules: list[str] = []
    # timm attention layers call F.scaled_dot_product_attention themselves (as transformers' TimmWrapper declares).
    _supports_sdpa = True
    # A backbone saved while frozen (FrozenBatchNorm2d) has no BatchNorm step counters; they are rebuilt as 0.
    _keys_to_ignore_on_load_missing = [r"num_batches_tracked"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the heads; leave the backbone to timm, except after a meta-device build.

        A fresh model: timm initialised its backbone (zero-init of last BatchNorm gammas included), so
        only the heads are touched. Built on the meta device (``from_pretrained``, or ``init_weights``
        after ``to_empty``), BatchNorm tensors the checkpoint lacks get transformers' defaults
        (running mean 0, variance 1, counters 0, weight 1, bias 0) instead of uninitialised memory;
        loaded tensors are flagged by transformers and left alone.
        """
        if isinstance(module, HeadLinear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if getattr(self, "_built_on_meta", False):
                super()._init_weights(module)
        elif hasattr(module, "init_non_persistent_buffers"):
            # Relative-position index buffers are not saved; rebuild them after a meta-device load.
            module.init_non_persistent_buffers()

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ) -> None:
        """transformers' switch (the heads are ``GradientCheckpointingLayer``), plus timm's for the backbone.

        timm checkpoints its blocks with its own calls; ``use_reentrant`` from
        ``gradient_checkpointing_kwargs`` is applied to them during this model's forward.
        """
        if enable and not _supports_grad_checkpointing(self.backbone):
            raise ValueError(
                f"timm backbone {self.config.backbone!r} ({type(self.backbone).__name__}) does not support gradient "
                "checkpointing (timm's set_grad_checkpointing): train without it, or pick a family that has it "
                "(ResNet, ConvNeXt, ViT, EfficientNet, Swin, ...)."
            )
        super()._set_gradient_checkpointing(
            enable=enable, gradient_checkpointing_func=gradient_checkpointing_func, every_n_layers=every_n_layers
        )
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)
        keywords = getattr(gradient_checkpointing_func, "keywords", {}) if enable else {}
        self._checkpoint_use_reentrant = keywords.get("use_reentrant")
        if enable and every_n_layers != 1:
            logger.warning("every_n_layers=%d applies to the task heads; timm checkpoints every backbone block.", every_n_layers)


class TimmMultiTaskModel(TimmMultiTaskPreTrainedModel):
    """A timm backbone shared by one head per task.

    Labels are passed by task name; the loss is the weighted sum of the task losses, each
    ignoring missing labels (``-100`` / ``NaN``).

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> tasks = [TaskSpec(name="shape", type="classification", labels=["square", "ellipse", "heart"]),
        ...          TaskSpec(name="scale", type="regression")]
        >>> model = TimmMultiTaskModel.from_backbone("test_resnet", tasks=tasks, pretrained=False)
        >>> out = model(pixel_values=torch.randn(2, 3, 64, 64), shape=torch.tensor([0, 2]),
        ...             scale=torch.tensor([0.5, 1.0]))
        >>> out.logits["shape"].shape, out.logits["scale"].shape
        (torch.Size([2, 3]), torch.Size([2, 1]))
        >>> sorted(out.task_losses)
        ['scale', 'shape']
    """

    def __init__(self, config: TimmMultiTaskConfig):
        super().__init__(config)
        if config._attn_implementation == "eager":
            logger.warning_once(
                "attn_implementation='eager' does not reach the timm backbone: timm picks its own attention "
                "(F.scaled_dot_product_attention where available), as in transformers' TimmWrapper."
            )
        self.tasks: list[TaskSpec] = config.task_specs
        if not self.tasks:
            raise ValueError("TimmMultiTaskConfig has no tasks; pass tasks=[TaskSpec(...), ...].")
        self._task_by_name = {t.name: t for t in self.tasks}
        self.backbone = create_backbone(config.backbone, pretrained=False, **config.timm_kwargs)
        # Built on the meta device (from_pretrained, or to_empty + init_weights): _init_weights then fills in BatchNorm.
        self._built_on_meta = any(p.is_meta for p in self.backbone.parameters())
        self._checkpoint_use_reentrant: bool | None = None
        if not config.data_config:  # a bare config: preprocessing follows timm's own data config for the backbone
            config.set_data_config(backbone_data_config(self.backbone, config.timm_kwargs.get("img_size")))
        if config.truncate_stage is not None:
            truncate_backbone(self.backbone, config.truncate_stage)
        # FSDP's wrap units (accelerate's transformer_based_wrap, the Trainer's --fsdp auto_wrap): timm's blocks.
        self._no_split_modules = block_class_names(self.backbone)
        self.heads = nn.ModuleDict({t.name: self._new_head(t) for t in self.tasks})
        self.post_init()

    # ---------------------------------------------------------------------------------- heads
    def _new_head(self, task: TaskSpec) -> TaskHead:
        """The one place a head is built: width of the backbone's pooled features, the config's head settings."""
        return TaskHead(self.head_in_features, task.num_outputs, self.config.head_hidden_size, self.config.head_dropout)

    @torch.no_grad()
    def reset_heads(self, names: Sequence[str] | None = None) -> list[str]:
        """New, freshly initialised heads for the tasks ``names`` (default: all), for the backbone's current width.

        Heads are initialised as the model initialises them (truncated normal weights, zero biases), with
        torch's own functions: transformers' skip weights that a load marked as initialised. They land on the
        backbone's device and dtype. Returns the names reset.

        Example:
            >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
            >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
            >>> old = m.heads["y"]; m.reset_heads(["y"]), m.heads["y"] is old, m.heads["y"].fc.bias.abs().sum().item()
            (['y'], False, 0.0)
        """
        names = list(self.heads) if names is None else list(names)
        reference = next(self.backbone.parameters())
        for name in names:
            head = self._new_head(self.get_task(name))
            for module in head.modules():
                if isinstance(module, HeadLinear):
                    nn.init.trunc_normal_(module.weight, std=self.config.initializer_range)
                    nn.init.zeros_(module.bias)
            self.heads[name] = head.to(device=reference.device, dtype=reference.dtype)
        return names

    def truncate(self, stage: int) -> "TimmMultiTaskModel":
        """Cut the backbone after ``feature_info[stage]`` (timm's ``prune_intermediate_layers``), in place.

        ``config.truncate_stage`` records the cut, so the model saves and reloads truncated; every head is
        rebuilt for the width of the stage kept (:meth:`reset_heads`). Returns the model.

        Example:
            >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
            >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
            >>> m.truncate(2).config.truncate_stage, m.head_in_features, m.heads["y"].fc.in_features
            (2, 48, 48)
        """
        if self.config.truncate_stage is not None:
            raise ValueError(
                f"The model is already truncated at stage {self.config.truncate_stage}; cannot cut again at {stage}. "
                "Truncate the untruncated source model instead."
            )
        truncate_backbone(self.backbone, stage)
        self.config.truncate_stage = int(stage)
        self.reset_heads()
        return self

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        tasks: Sequence[TaskSpec | dict[str, Any]],
        pretrained: bool = False,
        head_hidden_size: int | None = None,
        head_dropout: float = 0.0,
        image_size: int | None = None,
        **timm_kwargs: Any,
    ) -> "TimmMultiTaskModel":
        """Build from a timm model name, ``hf-hub:org/name`` or ``local-dir:/path``.

        With ``pretrained=True`` (or a ``local-dir:`` source) timm's own loaders bring the
        source weights; heads start fresh. ``image_size`` overrides the input size of the data
        config (ViT-like models also need ``img_size=`` in ``timm_kwargs``).

        Example:
            >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
            >>> m = TimmMultiTaskModel.from_backbone("test_vit", [TaskSpec(name="y", type="regression")])
            >>> m.config.backbone, m.config.data_config["input_size"]
            ('test_vit', [3, 160, 160])
        """
        specs = normalize_tasks(tasks)
        if "num_classes" in timm_kwargs:
            raise ValueError("num_classes is set by the tasks; describe outputs with TaskSpec instead.")
        architecture, create_kwargs = resolve_backbone_source(backbone, timm_kwargs)
        source, _ = parse_model_name(backbone)
        load_weights = pretrained or source == "local-dir"
        source_model = create_backbone(backbone if load_weights and source else architecture, pretrained=load_weights, **(timm_kwargs if source else create_kwargs))
        data_config = backbone_data_config(source_model, image_size or create_kwargs.get("img_size"))
        config = TimmMultiTaskConfig(
            backbone=architecture,
            backbone_source=backbone if (load_weights or source) else None,
            timm_kwargs=create_kwargs,
            tasks=specs,
            head_hidden_size=head_hidden_size,
            head_dropout=head_dropout,
            data_config=data_config,
        )
        model = cls(config)
        model.backbone.load_state_dict(source_model.state_dict())
        return model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        tasks: Sequence[TaskSpec | dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> "TimmMultiTaskModel":
        """``PreTrainedModel.from_pretrained``, plus re-heading with ``tasks=``.

        With ``tasks``, the backbone and every head whose task name, type, output size and class
        names still match are loaded; the other heads start fresh (transfer to new tasks). Weights
        load from safetensors only, and backbone weights the checkpoint lacks are a ``ValueError``.

        Example:
            >>> import tempfile
            >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
            >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="a", type="regression")])
            >>> d = tempfile.mkdtemp(); m.save_pretrained(d)
            >>> m2 = TimmMultiTaskModel.from_pretrained(d, tasks=[TaskSpec(name="b", num_labels=4, type="classification")])
            >>> list(m2.heads)
            ['b']
        """
        _check_saved_folder(pretrained_model_name_or_path, kwargs)
        if tasks is None:
            return cls._load_checked(pretrained_model_name_or_path, *model_args, **kwargs)
        config = kwargs.pop("config", None) or TimmMultiTaskConfig.from_pretrained(
            pretrained_model_name_or_path, **{k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "local_files_only", "token")}
        )
        old = {t.name: t for t in config.task_specs}
        config.set_tasks(list(tasks))
        new = config.task_specs
        reused = [t.name for t in new if t.name in old and _same_head(old[t.name], t)]
        fresh = [t.name for t in new if t.name not in reused]
        kwargs.setdefault("ignore_mismatched_sizes", True)
        # transformers' load report would list every new and dropped head key as MISSING / UNEXPECTED with
        # generic advice; re-heading expects exactly that, so one line below says what happened instead.
        # (A filter, not a level: transformers runs extra tensor-parallel checks when that logger's level is raised.)
        load_logger = logging.get_logger("transformers.modeling_utils")
        load_logger.addFilter(_drop_load_report)
        try:
            model = cls._load_checked(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        finally:
            load_logger.removeFilter(_drop_load_report)
        model.reset_heads([name for name in fresh if name in old])  # same name and size, other task: not reused
        logger.warning(
            "Re-headed %s: reused heads %s, new heads %s, dropped heads %s.",
            pretrained_model_name_or_path, reused, fresh, sorted(set(old) - {t.name for t in new}),
        )
        model.reused_heads, model.new_heads = reused, fresh
        return model

    @classmethod
    def _load_checked(cls, path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained`` from safetensors only; backbone weights left unloaded are an error.

        With ``output_loading_info=True`` the caller asked to inspect what is missing itself (transformers'
        contract, which its common tests check): the problem is logged and the model returned with the info.
        """
        kwargs.setdefault("use_safetensors", True)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        error = backbone_load_error(path, model, info)
        if error and not want_info:
            raise ValueError(error)
        if error:
            logger.warning(error)
        return (model, info) if want_info else model

    # ---------------------------------------------------------------------------------- shape
    @property
    def head_in_features(self) -> int:
        """Width of the pooled features the heads read (follows truncation)."""
        return int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def get_task(self, name: str) -> TaskSpec:
        try:
            return self._task_by_name[name]
        except KeyError:
            raise ValueError(f"Unknown task {name!r}; this model's tasks are {self.task_names}.") from None

    # -------------------------------------------------------------------------------- forward
    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Checked ``pixel_values`` on the model's device and in its dtype (fp32 images into a bf16 / fp16 model)."""
        expected = self.config.in_chans
        if pixel_values.dim() != 4 or pixel_values.shape[1] != expected:
            raise ValueError(
                f"pixel_values must be (batch, {expected}, height, width); got shape {tuple(pixel_values.shape)}. "
                + (
                    "Convert images to RGB (PIL: image.convert('RGB'))."
                    if pixel_values.dim() == 4 and expected == 3
                    else f"The backbone was built with in_chans={expected}."
                )
            )
        return self._as_model_input(pixel_values)

    def _as_model_input(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` in the model's dtype, on its device (unless its weights are offloaded: accelerate's hooks move them)."""
        device = self.device
        return inputs.to(device=None if device.type == "meta" else device, dtype=self.dtype)

    @property
    def num_stages(self) -> int:
        """How many per-stage features ``output_hidden_states=True`` returns (``feature_info`` entries kept).

        Example:
            >>> from hf_tlmtl import TaskSpec, TimmMultiTaskConfig, TimmMultiTaskModel
            >>> tasks = [TaskSpec(name="y", type="regression")]
            >>> TimmMultiTaskModel(TimmMultiTaskConfig(backbone="test_resnet", tasks=tasks)).num_stages
            5
            >>> TimmMultiTaskModel(TimmMultiTaskConfig(backbone="test_resnet", tasks=tasks, truncate_stage=2)).num_stages
            3
        """
        if self.config.truncate_stage is not None:
            return self.config.truncate_stage + 1
        return len(self.backbone.feature_info)

    def _stage_indices(self, selection: bool | Sequence[int]) -> list[int]:
        """Stage indices for timm's ``forward_intermediates``: all kept stages, or the selected ones (negative: from the end)."""
        n = self.num_stages
        if isinstance(selection, bool):
            return list(range(n))
        indices = [int(i) + n if int(i) < 0 else int(i) for i in selection]
        bad = [i for i, j in zip(selection, indices) if not 0 <= j < n]
        if bad:
            raise ValueError(
                f"output_hidden_states={list(selection)}: indices {bad} are out of range; the backbone has {n} "
                f"stages (0..{n - 1}, or -{n}..-1 from the end)."
            )
        return indices

    def _backbone(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | Sequence[int] = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Pooled features and, when asked, the per-stage features (timm's ``forward_intermediates``)."""
        pixel_values = self._grad_for_reentrant(self._check_pixels(pixel_values))
        reentrant = self._checkpoint_use_reentrant if getattr(self.backbone, "grad_checkpointing", False) else None
        with _timm_reentrant_checkpointing(reentrant):
            if not output_hidden_states:
                return self.backbone.forward_head(self.backbone.forward_features(pixel_values), pre_logits=True), None
            if not hasattr(self.backbone, "forward_intermediates"):
                raise ValueError(
                    f"{type(self.backbone).__name__} has no forward_intermediates, so it cannot return hidden states; "
                    "upgrade timm (pip install -U timm) or call the model without output_hidden_states."
                )
            last, stages = self.backbone.forward_intermediates(pixel_values, indices=self._stage_indices(output_hidden_states))
        return self.backbone.forward_head(last, pre_logits=True), tuple(stages)

    def get_input_embeddings(self) -> None:
        """None: images reach the backbone as pixels, there is no token embedding (accelerate's FSDP2 asks)."""
        return None

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(batch, head_in_features)`` for a batch of images."""
        return self._backbone(pixel_values)[0]

    def _collect_labels(self, labels: Mapping[str, Any] | None, task_labels: dict[str, Any]) -> dict[str, Any]:
        """Targets by task name, from ``labels={...}`` and/or task-name keywords; unknown names refused."""
        if labels is not None and not isinstance(labels, Mapping):
            raise ValueError(
                f"labels must map task names to targets (labels={{'{self.task_names[0]}': y, ...}}), got "
                f"{type(labels).__name__}; or pass each task's target as a keyword ({self.task_names[0]}=y)."
            )
        targets = {**(labels or {}), **task_labels}
        unknown = sorted(set(targets) - set(self._task_by_name))
        if unknown:
            raise ValueError(f"Labels given for unknown task(s) {unknown}; this model's tasks are {self.task_names}.")
        return {name: target for name, target in targets.items() if target is not None}

    def _grad_for_reentrant(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` as reentrant checkpointing needs them.

        With ``use_reentrant=True`` a checkpointed segment whose input needs no gradient (images, frozen
        layers below it, cached features) gives its parameters none either. As transformers'
        ``enable_input_require_grads`` does for embeddings, such an input becomes a leaf that asks for one.
        """
        if self._checkpoint_use_reentrant and self.training and torch.is_grad_enabled() and not inputs.requires_grad:
            return inputs.detach().requires_grad_(True)
        return inputs

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        labels: Mapping[str, Any] | None = None,
        output_hidden_states: bool | Sequence[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **task_labels: Any,
    ) -> MultiTaskOutput | tuple[Any, ...]:
        """Run the backbone (or take precomputed pooled ``features``) and every head.

        Args:
            pixel_values: ``(batch, channels, height, width)`` images, normalised like
                ``build_transforms(config, train=False)`` does; cast to the model's device and dtype.
            features: Pooled backbone features instead of images (feature-extraction cache).
            labels: Optional targets by task name (``{"shape": y, ...}``), the same as keywords.
            output_hidden_states: ``True`` for the backbone's per-stage features
                (``out.hidden_states``), or a list of stage indices (``[-2, -1]``); default
                ``config.output_hidden_states``.
            output_attentions: timm backbones return no attention weights: must be falsy.
            return_dict: ``False`` returns the tuple of the non-``None`` fields of
                :class:`MultiTaskOutput`, in order; default ``config.return_dict``.
            **task_labels: Optional targets by task name; a task without labels gets no loss.

        Example:
            >>> import torch
            >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
            >>> model = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
            >>> out = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
            >>> [tuple(h.shape[1:]) for h in out.hidden_states]  # stem + 4 stages
            [(32, 16, 16), (32, 8, 8), (48, 4, 4), (192, 2, 2), (96, 1, 1)]
            >>> loss, logits, task_losses, pooled = model(torch.randn(2, 3, 32, 32), y=torch.zeros(2), return_dict=False)
        """
        targets = self._collect_labels(labels, task_labels)
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if output_attentions:
            raise ValueError(
                "timm backbones do not return attention weights (as in transformers' TimmWrapper): call the model "
                "with output_attentions=False and leave config.output_attentions False."
            )
        hidden_states = None
        if features is None:
            if pixel_values is None:
                raise ValueError("Pass pixel_values (images) or features (pooled backbone features).")
            features, hidden_states = self._backbone(pixel_values, output_hidden_states)
        elif output_hidden_states:
            raise ValueError("features= are already pooled, so there are no stage features: pass pixel_values for hidden states.")
        else:
            features = self._grad_for_reentrant(self._as_model_input(features))
        logits = {name: head(features) for name, head in self.heads.items()}
        task_losses, labelled = {}, []
        for name, target in targets.items():
            task = self._task_by_name[name]
            task_losses[name], has_labels = task.loss_and_presence(logits[name], target)
            if has_labels:
                labelled.append(name)
        loss = None
        if task_losses:
            loss = sum(self._task_by_name[name].weight * value for name, value in task_losses.items())
        output = MultiTaskOutput(
            loss=loss,
            logits=logits,
            task_losses=task_losses or None,
            pooled=features,
            hidden_states=hidden_states,
            labelled_tasks=tuple(labelled) if targets else None,
        )
        return output if return_dict else output.to_tuple()

    # ----------------------------------------------------------------------------------- save
    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained``, plus ``preprocessor_config.json`` (timm's eval transform for
        ``config.data_config``) so that ``AutoImageProcessor.from_pretrained(save_directory)`` works."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if self.should_save_on_this_rank(is_main_process):
            TimmMultiTaskImageProcessor.from_config(self.config).save_pretrained(save_directory)
