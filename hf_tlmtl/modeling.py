"""TimmMultiTaskModel: any timm backbone, one head per task, as a ``transformers.PreTrainedModel``."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from timm.models import parse_model_name
from timm.models._hub import load_model_config_from_hf, load_model_config_from_path
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration import TimmMultiTaskConfig
from .tasks import TaskSpec, normalize_tasks

logger = logging.get_logger(__name__)


@dataclass
class MultiTaskOutput(ModelOutput):
    """Output of :class:`TimmMultiTaskModel`.

    Attributes:
        loss: Weighted sum of the task losses (only when labels were given).
        logits: Raw head outputs by task name, each ``(batch, num_outputs)``.
        task_losses: Each task's own (unweighted) loss, for the tasks that got labels.
        pooled: The shared pooled backbone features, ``(batch, head_in_features)``.
    """

    loss: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] | None = None
    task_losses: dict[str, torch.Tensor] | None = None
    pooled: torch.Tensor | None = None


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


class TaskHead(nn.Module):
    """Dropout + linear layer, or a 2-layer MLP when ``hidden_size`` is set."""

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


def _suggest_models(name: str) -> str:
    base = name.split(".")[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    return f" Close names in timm: {close}." if close else " See timm.list_models('*pattern*') for valid names."


def _network_error_message(source: str, error: Exception) -> str:
    return (
        f"Could not fetch pretrained weights for {source!r} from the Hugging Face Hub "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). The Hub is unreachable "
        "from here (offline machine, firewall, or HF_HUB_OFFLINE=1). Save the weights on a machine with access "
        "(timm.models.save_for_hf(timm.create_model(name, pretrained=True), DIR)) and use "
        "backbone='local-dir:DIR', or pass pretrained=False to start from random weights."
    )


def _is_network_error(error: Exception) -> bool:
    """Errors the Hub client raises when it cannot reach the Hub (or is told not to)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    module = type(error).__module__ or ""
    return module.startswith(("huggingface_hub", "httpx", "httpcore", "requests", "urllib3")) or (
        isinstance(error, OSError) and "huggingface" in str(error).lower()
    )


def resolve_backbone_source(name: str, timm_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Architecture name and creation kwargs for ``name`` (plain timm name, ``hf-hub:`` or ``local-dir:``).

    Validates early: unknown architectures get close-name suggestions, missing folders are named.
    Saved ``model_args`` of a source checkpoint become defaults of ``timm_kwargs`` so the
    architecture can be rebuilt later without the source.
    """
    try:
        source, model_id = parse_model_name(name)
    except ValueError as e:
        raise ValueError(str(e)) from None
    model_args: dict[str, Any] = {}
    if source == "local-dir":
        if not (Path(model_id) / "config.json").is_file():
            raise ValueError(
                f"backbone {name!r}: no timm checkpoint at {model_id!r} (config.json missing). Write one with "
                "timm.models.save_for_hf(model, DIR) and pass backbone='local-dir:DIR'."
            )
        pretrained_cfg, architecture, model_args = load_model_config_from_path(model_id)
    elif source == "hf-hub":
        try:
            pretrained_cfg, architecture, model_args = load_model_config_from_hf(model_id)
        except Exception as e:  # noqa: BLE001 - re-raised with a clear message
            if _is_network_error(e):
                raise ValueError(_network_error_message(name, e)) from e
            raise
    else:
        architecture = name.split(".")[0]
        if not timm.is_model(architecture):
            raise ValueError(f"Unknown timm architecture {architecture!r} (timm {timm.__version__}).{_suggest_models(name)}")
        return name, dict(timm_kwargs)
    if not timm.is_model(architecture):
        raise ValueError(
            f"backbone {name!r} uses architecture {architecture!r}, which timm {timm.__version__} does not know: "
            "upgrade timm (pip install -U timm)."
        )
    # The source's classifier size is irrelevant: heads replace it.
    saved_args = {k: v for k, v in (model_args or {}).items() if k != "num_classes"}
    return architecture, {**saved_args, **timm_kwargs}


def create_backbone(name: str, pretrained: bool = False, **timm_kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` with errors that say what to do."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"Unknown timm architecture {name!r} (timm {timm.__version__}).{_suggest_models(name)}") from e
        if pretrained and _is_network_error(e.__cause__ or e):
            raise ValueError(_network_error_message(name, e)) from e
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with a clear message
        if pretrained and _is_network_error(e):
            raise ValueError(_network_error_message(name, e)) from e
        raise


def _pool_type(backbone: nn.Module) -> str:
    """The backbone's global pooling type, wherever the family keeps it."""
    for owner in (backbone, getattr(backbone, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str) and pool:
            return pool
        if getattr(pool, "pool_type", None):
            return pool.pool_type
    return "avg"


def truncate_backbone(backbone: nn.Module, stage: int) -> None:
    """Keep the backbone up to ``feature_info[stage]`` (timm's ``prune_intermediate_layers``), pooled."""
    if not hasattr(backbone, "prune_intermediate_layers"):
        raise ValueError(
            f"{type(backbone).__name__} has no prune_intermediate_layers, so it cannot be truncated. Families "
            "that support it include ResNet, ConvNeXt, EfficientNet, ViT/DeiT/EVA, Swin, MaxViT, RegNet; "
            "use strategy='partial' instead."
        )
    num_stages = len(backbone.feature_info)
    if not 0 <= stage < num_stages - 1:
        raise ValueError(
            f"truncate_stage={stage} is out of range: {type(backbone).__name__} has {num_stages} stages "
            f"(feature_info indices 0..{num_stages - 1}); keep one of 0..{num_stages - 2} to drop at least the top stage."
        )
    pool = _pool_type(backbone)
    backbone.prune_intermediate_layers(indices=[stage], prune_head=True, prune_norm=False)
    # Pruning removes global pooling too; the heads need pooled features.
    backbone.reset_classifier(0, pool)


def _drop_load_report(record: Any) -> bool:
    """Logging filter: False for transformers' state-dict load report, True for everything else."""
    return "LOAD REPORT" not in str(record.msg)


def _check_saved_folder(path: Any, kwargs: dict[str, Any]) -> None:
    """A local folder: valid config.json and safetensors weights (see :mod:`hf_tlmtl.checkpoints`)."""
    if isinstance(path, (str, os.PathLike)) and kwargs.get("state_dict") is None:
        from .checkpoints import check_model_folder

        check_model_folder(path, allow_pickle=kwargs.get("use_safetensors") is False)


def _same_head(old: TaskSpec, new: TaskSpec) -> bool:
    """A saved head serves a new task of its name only if type, size and class names (when both have them) match."""
    same_labels = old.labels is None or new.labels is None or old.labels == new.labels
    return old.type == new.type and old.num_outputs == new.num_outputs and same_labels


@torch.no_grad()
def _reinit_heads(model: "TimmMultiTaskModel", names: list[str]) -> None:
    """Fresh weights for heads that a same-shaped but different saved head was loaded into (torch's own
    init: transformers' ``init`` functions skip weights that the load marked as initialised)."""
    for name in names:
        for module in model.heads[name].modules():
            if isinstance(module, HeadLinear):
                nn.init.trunc_normal_(module.weight, std=model.config.initializer_range)
                nn.init.zeros_(module.bias)


class TimmMultiTaskPreTrainedModel(PreTrainedModel):
    config_class = TimmMultiTaskConfig
    config: TimmMultiTaskConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    model_tags = ["timm", "hf_tlmtl", "multi-task"]
    supports_gradient_checkpointing = True
    # Labels arrive as **kwargs by task name: they are not loss kwargs for the Trainer.
    accepts_loss_kwargs = False
    _no_split_modules: list[str] = []
    # A backbone saved while frozen (FrozenBatchNorm2d) has no BatchNorm step counters; they are rebuilt as 0.
    _keys_to_ignore_on_load_missing = [r"num_batches_tracked"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise only what this package owns (the heads); timm initialised the backbone itself."""
        if isinstance(module, HeadLinear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_batches_tracked is not None:
            # After a meta-device load this is reached only for modules the checkpoint did not fully cover
            # (a backbone saved frozen has no counters), which would otherwise hold uninitialised memory.
            module.num_batches_tracked.zero_()
        elif hasattr(module, "init_non_persistent_buffers"):
            # Relative-position index buffers are not saved; rebuild them after a meta-device load.
            module.init_non_persistent_buffers()

    def _set_gradient_checkpointing(self, enable: bool = True, *args: Any, **kwargs: Any) -> None:
        if not hasattr(self.backbone, "set_grad_checkpointing"):
            raise ValueError(f"timm model {self.config.backbone!r} does not support gradient checkpointing.")
        self.backbone.set_grad_checkpointing(enable)


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
        self.tasks: list[TaskSpec] = config.task_specs
        if not self.tasks:
            raise ValueError("TimmMultiTaskConfig has no tasks; pass tasks=[TaskSpec(...), ...].")
        self._task_by_name = {t.name: t for t in self.tasks}
        self.backbone = create_backbone(config.backbone, pretrained=False, **config.timm_kwargs)
        if config.truncate_stage is not None:
            truncate_backbone(self.backbone, config.truncate_stage)
        self.heads = nn.ModuleDict(
            {
                t.name: TaskHead(self.head_in_features, t.num_outputs, config.head_hidden_size, config.head_dropout)
                for t in self.tasks
            }
        )
        self.post_init()

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
        data_config = timm.data.resolve_model_data_config(source_model)
        if image_size is not None or "img_size" in create_kwargs:
            size = image_size or create_kwargs["img_size"]
            size = size if isinstance(size, (list, tuple)) else (size, size)
            data_config["input_size"] = (data_config["input_size"][0], *size)
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
        _reinit_heads(model, [name for name in fresh if name in old])  # same name and size, other task: not reused
        logger.warning(
            "Re-headed %s: reused heads %s, new heads %s, dropped heads %s.",
            pretrained_model_name_or_path, reused, fresh, sorted(set(old) - {t.name for t in new}),
        )
        model.reused_heads, model.new_heads = reused, fresh
        return model

    @classmethod
    def _load_checked(cls, path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained`` from safetensors only; backbone weights left unloaded are an error."""
        from .checkpoints import backbone_load_error

        kwargs.setdefault("use_safetensors", True)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(path, *model_args, output_loading_info=True, **kwargs)
        error = backbone_load_error(path, model, info)
        if error:
            raise ValueError(error)
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
    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(batch, head_in_features)`` for a batch of images."""
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
        return self.backbone.forward_head(self.backbone.forward_features(pixel_values), pre_logits=True)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **labels: Any,
    ) -> MultiTaskOutput:
        """Run the backbone (or take precomputed pooled ``features``) and every head.

        Args:
            pixel_values: ``(batch, channels, height, width)`` images, normalised like
                ``build_transforms(config, train=False)`` does.
            features: Pooled backbone features instead of images (feature-extraction cache).
            **labels: Optional targets by task name; a task without labels gets no loss.
        """
        unknown = sorted(set(labels) - set(self._task_by_name))
        if unknown:
            raise ValueError(f"Labels given for unknown task(s) {unknown}; this model's tasks are {self.task_names}.")
        if features is None:
            if pixel_values is None:
                raise ValueError("Pass pixel_values (images) or features (pooled backbone features).")
            features = self.forward_features(pixel_values)
        logits = {name: head(features) for name, head in self.heads.items()}
        task_losses = {
            name: self._task_by_name[name].compute_loss(logits[name], target)
            for name, target in labels.items()
            if target is not None
        }
        loss = None
        if task_losses:
            loss = sum(self._task_by_name[name].weight * value for name, value in task_losses.items())
        return MultiTaskOutput(loss=loss, logits=logits, task_losses=task_losses or None, pooled=features)

    # ----------------------------------------------------------------------------------- save
    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained``, plus ``preprocessor_config.json`` (timm's eval transform for
        ``config.data_config``) so that ``AutoImageProcessor.from_pretrained(save_directory)`` works."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if self.should_save_on_this_rank(is_main_process):
            from .image_processing import TimmMultiTaskImageProcessor  # local: keeps modeling free of processor imports

            TimmMultiTaskImageProcessor.from_config(self.config).save_pretrained(save_directory)
