"""A frozen backbone's pooled features, computed once and cached by ``datasets`` (:func:`cache_features`),
fingerprinted by the backbone's weights, the data and the transform.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

import datasets
import torch
from datasets import Dataset, Features, List, Value

from .labels import plan_label_columns, require_dataset
from .preparation import (
    FEATURES_COLUMN,
    BatchTransform,
    check_image_column,
    raw_dataset,
    to_rgb,
)
from .transforms import as_config, build_transforms

# Bumped when the layout of the feature cache changes, so old cache files are not reused.
_FEATURE_CACHE_VERSION = "1"


def backbone_fingerprint(model: Any) -> str:
    """Hash of the backbone's architecture settings and every weight/buffer byte.

    BatchNorm's ``num_batches_tracked`` counter is left out: it does not change the features
    and disappears when timm freezes BatchNorm.

    Example:
        >>> import torch
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> m = TimmMultiTaskModel.from_backbone("test_resnet", [TaskSpec(name="y", type="regression")])
        >>> before = backbone_fingerprint(m)
        >>> with torch.no_grad():
        ...     _ = next(m.backbone.parameters()).add_(1e-3)
        >>> before == backbone_fingerprint(m)
        False
    """
    config = as_config(model)
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(repr((config.backbone, sorted(config.timm_kwargs.items()), config.truncate_stage)).encode())
    for name, tensor in sorted(model.backbone.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "hf_tlmtl_features"


def cache_features(
    model: Any,
    dataset: Dataset,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    image_column: str | None = None,
    labelled_tasks: Iterable[str] | None = None,
    device: str | torch.device | None = None,
) -> Dataset:
    """Run the (frozen) backbone once over ``dataset``; return pooled features + labels, ready to train heads.

    Features come from ``model.forward_features`` in eval mode under ``torch.no_grad`` with the
    deterministic eval transform (:func:`build_transforms` ``train=False``): un-augmented. They are
    stored by ``datasets.Dataset.map`` in an Arrow file whose fingerprint hashes the backbone
    weights (:func:`backbone_fingerprint`), the dataset's own ``_fingerprint``, the transform
    and the columns. Same model + same data -> the file on disk is reused without running the
    backbone; changed weights -> a new file. (With ``datasets.disable_caching()`` the file is
    rebuilt on every call, as for any ``map``.)

    The result is prepared like :func:`prepare_dataset` output, with ``features`` in place of
    ``pixel_values``: feed it through :class:`MultiTaskCollator` to ``model(features=..., ...)``.

    Args:
        model: A :class:`~hf_tlmtl.TimmMultiTaskModel` (its training mode is restored afterwards).
        dataset: A raw split, or one returned by :func:`prepare_dataset` (its image column and
            labelled tasks are reused; its augmentation is not).
        batch_size: Images per backbone forward.
        cache_dir: Folder for the cache file. Default: next to the dataset's own cache files, or
            ``<HF_DATASETS_CACHE>/hf_tlmtl_features`` for an in-memory dataset.
        image_column: Defaults to the prepared dataset's, else ``"image"``.
        labelled_tasks: As in :func:`prepare_dataset`.
        device: Where the backbone runs (default: where the model is); the model is moved back after.

    Example:
        >>> import tempfile
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> from hf_tlmtl.data import MultiTaskCollator
        >>> from hf_tlmtl.data.embedded import load_embedded_dataset
        >>> ds = load_embedded_dataset("digits", n_train=20, n_eval=10, image_size=32)
        >>> model = TimmMultiTaskModel.from_backbone(
        ...     "test_resnet", [TaskSpec(name="digit", type="classification", num_labels=10)], image_size=32)
        >>> cached = cache_features(model, ds["train"], cache_dir=tempfile.mkdtemp())
        >>> batch = MultiTaskCollator(model.tasks)([cached[i] for i in range(4)])
        >>> batch["features"].shape
        torch.Size([4, 96])
        >>> model(**batch).logits["digit"].shape
        torch.Size([4, 10])
    """
    dataset = require_dataset(dataset, "cache_features")
    config = as_config(model)
    prepared = dataset.format["format_kwargs"].get("transform") if dataset.format["type"] == "custom" else None
    if isinstance(prepared, BatchTransform):
        image_column = image_column or prepared.image_column
        labelled_tasks = prepared.labelled_tasks if labelled_tasks is None else labelled_tasks
    image_column = image_column or "image"
    raw = raw_dataset(dataset)
    check_image_column(raw, image_column)
    if FEATURES_COLUMN in raw.column_names:
        raise ValueError(
            f"The dataset already has a {FEATURES_COLUMN!r} column; rename it "
            f"(dataset.rename_column({FEATURES_COLUMN!r}, ...)) before caching features."
        )
    labels = plan_label_columns(raw, config.task_specs, labelled_tasks)
    label_columns = list(dict.fromkeys(label.column for label in labels))
    transform = build_transforms(config, train=False)

    fingerprint = hashlib.blake2b(
        repr(
            (_FEATURE_CACHE_VERSION, raw._fingerprint, backbone_fingerprint(model), repr(transform), image_column, label_columns)
        ).encode(),
        digest_size=16,
    ).hexdigest()
    cache_file_name = None
    if cache_dir is not None or not raw.cache_files:
        folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        cache_file_name = str(folder / f"features-{fingerprint}.arrow")

    width = int(model.head_in_features)
    features = Features({**{c: raw.features[c] for c in label_columns}, FEATURES_COLUMN: List(Value("float32"), length=width)})
    run_device = torch.device(device) if device is not None else next(model.parameters()).device
    original_device = next(model.parameters()).device
    was_training = model.training

    def extract(batch: dict[str, list]) -> dict[str, Any]:
        pixels = torch.stack([transform(to_rgb(image, image_column)) for image in batch[image_column]])
        pooled = model.forward_features(pixels.to(run_device)).float().cpu().numpy()
        return {FEATURES_COLUMN: pooled}

    model.eval().to(run_device)
    try:
        with torch.no_grad():
            cached = raw.map(
                extract,
                batched=True,
                batch_size=batch_size,
                remove_columns=[c for c in raw.column_names if c not in label_columns],
                features=features,
                new_fingerprint=fingerprint,
                cache_file_name=cache_file_name,
                desc="Caching backbone features",
            )
    finally:
        model.train(was_training).to(original_device)
    return cached.with_transform(BatchTransform(labels, image_column=None, image_transform=None))
