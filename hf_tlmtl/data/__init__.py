"""Data for :class:`~hf_tlmtl.TimmMultiTaskModel`: where it comes from, and how it reaches the model.

- :mod:`~hf_tlmtl.data.sources`, :mod:`~hf_tlmtl.data.streaming`, :mod:`~hf_tlmtl.data.embedded`: image folders, tables,
  Hub datasets, streams and the code-generated / bundled sets.
- :mod:`~hf_tlmtl.data.task_columns`: the tasks of a dataset, stated or inferred from its columns.
- :mod:`~hf_tlmtl.data.splits`: a run's train and validation splits and tasks, from any of them.
- :mod:`~hf_tlmtl.data.labels`: label columns checked against the tasks and encoded as targets;
  :mod:`~hf_tlmtl.data.partial_labels`: datasets that label different tasks, concatenated.
- :mod:`~hf_tlmtl.data.transforms` (timm's), :mod:`~hf_tlmtl.data.preparation` (the lazy batch transform),
  :mod:`~hf_tlmtl.data.collator`, :mod:`~hf_tlmtl.data.feature_cache` (a frozen backbone's features, cached).

The flow for a ``datasets.Dataset`` with an image column and one column per task::

    train = prepare_dataset(ds["train"], model.config, train=True)        # checks + lazy timm transform
    evals = prepare_dataset(ds["validation"], model.config, train=False)
    trainer = MultiTaskTrainer(model, args, train_dataset=train, eval_dataset=evals,
                               data_collator=MultiTaskCollator(model.tasks))

With a frozen backbone, :func:`cache_features` runs it once and stores the pooled features in
an Arrow cache that ``datasets`` reuses as long as the backbone weights, the data and the
transform are unchanged; the heads then train on ``model(features=...)``.

Example:
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> from hf_tlmtl.data import MultiTaskCollator, prepare_dataset
    >>> from hf_tlmtl.data import load_embedded_dataset
    >>> ds = load_embedded_dataset("shapes", n_train=4, n_eval=2, image_size=32)
    >>> tasks = [TaskSpec(name="shape", type="classification", labels=ds["train"].features["shape"].names),
    ...          TaskSpec(name="scale", type="regression")]
    >>> model = TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=32)
    >>> train = prepare_dataset(ds["train"], model.config, train=True)
    >>> batch = MultiTaskCollator(model.tasks)([train[i] for i in range(4)])
    >>> batch["pixel_values"].shape, batch["shape"].dtype, batch["scale"].shape
    (torch.Size([4, 3, 32, 32]), torch.int64, torch.Size([4]))
    >>> bool(model(**batch).loss.isfinite())
    True
"""

from .collator import MultiTaskCollator, check_first_batch
from .embedded import EMBEDDED_DATASETS, load_embedded_dataset
from .feature_cache import FEATURES_COLUMN, backbone_fingerprint, cache_features
from .labels import encode_labels, plan_label_columns
from .partial_labels import concatenate_partially_labelled, missing_label_value
from .preparation import (
    ROW_COLUMN,
    STREAM_MAP_BATCH,
    check_image_column,
    check_worker_picklable,
    prepare_dataset,
    raw_dataset,
)
from .sources import TABLE_FORMATS, embedded_dataset_names, load_image_dataset, load_table
from .splits import load_splits
from .streaming import load_streaming_dataset, read_per_process
from .task_columns import infer_tasks, parse_task_arg, resolve_tasks
from .transforms import DEFAULT_TRAIN_SCALE, build_transforms

__all__ = [
    "DEFAULT_TRAIN_SCALE",
    "EMBEDDED_DATASETS",
    "FEATURES_COLUMN",
    "ROW_COLUMN",
    "STREAM_MAP_BATCH",
    "TABLE_FORMATS",
    "MultiTaskCollator",
    "backbone_fingerprint",
    "build_transforms",
    "cache_features",
    "check_first_batch",
    "check_image_column",
    "check_worker_picklable",
    "concatenate_partially_labelled",
    "embedded_dataset_names",
    "encode_labels",
    "infer_tasks",
    "load_embedded_dataset",
    "load_image_dataset",
    "load_splits",
    "load_streaming_dataset",
    "load_table",
    "missing_label_value",
    "parse_task_arg",
    "plan_label_columns",
    "prepare_dataset",
    "raw_dataset",
    "read_per_process",
    "resolve_tasks",
]
