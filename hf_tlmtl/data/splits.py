"""A run's data: train and validation splits, and the tasks their columns hold; loaded, or the training split streamed.

:func:`load_splits` is :func:`~hf_tlmtl.data.sources.load_image_dataset` + :func:`~hf_tlmtl.data.sources.resolve_tasks`
(any source, held in memory or memory-mapped), or with ``streaming=True``
:func:`~hf_tlmtl.data.streaming.load_streaming_dataset` (the training split an ``IterableDataset``).

Example:
    >>> splits, tasks = load_splits("shapes", tasks="shape,scale", n_train=8, n_eval=4, image_size=32)
    >>> len(splits["train"]), len(splits["validation"]), [(t.name, t.type) for t in tasks]
    (8, 4, [('shape', 'classification'), ('scale', 'regression')])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tasks import TaskSpec
from .sources import load_image_dataset
from .streaming import load_streaming_dataset
from .task_columns import resolve_tasks


def load_splits(
    source: str,
    *,
    tasks: str | Sequence[str | dict[str, Any]] | None = None,
    image_column: str = "image",
    streaming: bool = False,
    n_train: int | None = None,
    n_eval: int | None = None,
    image_size: int = 64,
    seed: int = 0,
    validation_fraction: float = 0.2,
    verify_images: bool = True,
) -> tuple[Any, list[TaskSpec]]:
    """``{"train", "validation"}`` splits of ``source`` and its tasks (stated in ``tasks`` or inferred from the columns).

    ``streaming=True`` streams the training split (``n_train``, ``image_size``, ``seed``, ``validation_fraction`` and
    ``verify_images`` do not apply: the source brings its own validation split, of which ``n_eval`` keeps the first
    rows). The other arguments are :func:`~hf_tlmtl.data.sources.load_image_dataset`'s.
    """
    if streaming:
        return load_streaming_dataset(source, image_column, tasks, n_eval)
    data = load_image_dataset(
        source,
        image_column=image_column,
        n_train=n_train,
        n_eval=n_eval,
        image_size=image_size,
        seed=seed,
        validation_fraction=validation_fraction,
        verify_images=verify_images,
    )
    return resolve_tasks(data, tasks, image_column)


__all__ = ["load_splits"]
