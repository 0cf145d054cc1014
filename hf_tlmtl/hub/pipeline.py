"""The ``"multitask-image-classification"`` pipeline: every task of a :class:`~hf_tlmtl.TimmMultiTaskModel` per image.

``import hf_tlmtl`` registers it with transformers, so ``transformers.pipeline(
"multitask-image-classification", model=saved_dir_or_repo_or_model)`` works like any other
pipeline (devices, ``batch_size=``, lists, generators and datasets as input). Lists, generators and
datasets of images go through the model :data:`DEFAULT_BATCH_SIZE` at a time unless ``batch_size=``
says otherwise (transformers' pipelines default to one image per forward pass, which is slower:
``benchmarks/RESULTS.md``, "Pipeline batching"). Each image gives one dict keyed by task name:

- classification: the ``top_k`` classes, ``[{"label": ..., "score": softmax probability}, ...]``;
- multilabel: the labels whose sigmoid probability is ``>= threshold``, highest first;
- regression: ``{"value": [one float per output]}``.

Example:
    >>> import tempfile
    >>> from PIL import Image
    >>> from transformers import pipeline
    >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
    >>> tasks = [TaskSpec(name="shape", type="classification", labels=["square", "circle"]),
    ...          TaskSpec(name="size", type="regression")]
    >>> d = tempfile.mkdtemp()
    >>> TimmMultiTaskModel.from_backbone("test_resnet", tasks, image_size=32).save_pretrained(d)
    >>> pipe = pipeline("multitask-image-classification", model=d, device="cpu")
    >>> result = pipe(Image.new("RGB", (40, 40)))
    >>> sorted(result), [r["label"] for r in result["shape"]] in (["square", "circle"], ["circle", "square"])
    (['shape', 'size'], True)
    >>> len(result["size"]["value"])
    1
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import Pipeline
from transformers.image_utils import load_image

from ..backbone.unwrap import unwrap
from ..image_processing import TimmMultiTaskImageProcessor, rgb_image
from ..tasks import TaskSpec

PIPELINE_TASK = "multitask-image-classification"
DEFAULT_TOP_K = 5
DEFAULT_THRESHOLD = 0.5
DEFAULT_BATCH_SIZE = 32
"""Images per forward pass for lists, generators and datasets when ``batch_size`` is not given."""


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return repr(os.fspath(image))
    return f"<{type(image).__name__}>"


def read_image(image: Any, mode: str = "RGB", timeout: float | None = None) -> Image.Image:
    """A PIL image in ``mode`` from a PIL image, a numpy array (``HWC``), a path or an ``http(s)`` URL.

    Raises ``ValueError`` naming the image when it cannot be read.

    Example:
        >>> read_image(np.zeros((4, 6, 3), dtype=np.uint8)).size
        (6, 4)
    """
    try:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif isinstance(image, os.PathLike):
            image = os.fspath(image)
        if isinstance(image, str) and not image.startswith(("http://", "https://", "data:image/")):
            if not Path(image).is_file():
                raise FileNotFoundError("no such file")
            # Opened here, not by transformers' load_image, which converts to RGB at once: a 16-bit image
            # would be clipped before rgb_image could scale it.
            with Image.open(image) as opened:
                image = ImageOps.exif_transpose(opened)
        elif isinstance(image, str):
            image = load_image(image, timeout=timeout)  # a URL or data URI: transformers reads it (as RGB)
        if not isinstance(image, Image.Image):
            raise TypeError("expected a PIL image, a numpy array, a path or a URL")
        return rgb_image(image) if mode == "RGB" else image.convert(mode)
    except (OSError, ValueError, TypeError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"Could not read image {_describe(image)} ({type(error).__name__}: {error}). Pass a PIL image, an "
            "HxWxC uint8 array, the path of an image file (PNG, JPEG, ...) or an http(s) URL."
        ) from error


class MultiTaskImageClassificationPipeline(Pipeline):
    """Predictions of every task of a :class:`~hf_tlmtl.TimmMultiTaskModel` for each image.

    Call arguments (also accepted by ``pipeline(...)`` as defaults):
        batch_size: Images per forward pass over a list / generator / dataset (default
            :data:`DEFAULT_BATCH_SIZE`; transformers' own default is 1).
        top_k: Classes returned per classification task (default 5, capped at the class count).
        threshold: Multilabel tasks return the labels with probability ``>= threshold`` (default 0.5).
        tasks: Only these tasks (default: all).
        timeout: Seconds to wait for images given as URLs.

    Example:
        >>> from PIL import Image
        >>> from hf_tlmtl import TaskSpec, TimmMultiTaskModel
        >>> model = TimmMultiTaskModel.from_backbone(
        ...     "test_resnet", [TaskSpec(name="attrs", type="multilabel", labels=["red", "big"])], image_size=32)
        >>> pipe = MultiTaskImageClassificationPipeline(model=model, device="cpu")
        >>> out = pipe([Image.new("RGB", (32, 32))] * 2, threshold=0.0)
        >>> len(out), sorted(r["label"] for r in out[0]["attrs"])
        (2, ['big', 'red'])
    """

    _load_processor = False
    _load_image_processor = None  # optional: built from the model config when the folder has none
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._batch_size is None:
            self._batch_size = DEFAULT_BATCH_SIZE
        try:
            base = unwrap(self.model)
        except ValueError:
            raise ValueError(
                f"The {PIPELINE_TASK!r} pipeline needs an hf_tlmtl TimmMultiTaskModel, got {type(self.model).__name__}; "
                "load one with TimmMultiTaskModel.from_pretrained(path) or pass the path of a saved model."
            ) from None
        # Inference: a model handed over in training mode would update BatchNorm statistics and drop units.
        self.model.eval()
        self.model_tasks: list[TaskSpec] = list(base.tasks)
        self.image_mode = "L" if base.config.in_chans == 1 else "RGB"
        if self.image_processor is None:
            self.image_processor = TimmMultiTaskImageProcessor.from_config(base.config)
        # Defaults given to pipeline(...) were sanitised before the tasks were known.
        self._check_tasks(self._postprocess_params.get("tasks"))

    def _check_tasks(self, tasks: list[str] | None) -> list[str] | None:
        known = [t.name for t in getattr(self, "model_tasks", [])]
        unknown = [t for t in tasks or [] if known and t not in known]
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown}; this model's tasks are {known}.")
        return tasks

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        threshold: float | None = None,
        tasks: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        postprocess: dict[str, Any] = {}
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
            postprocess["top_k"] = top_k
        if threshold is not None:
            if not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"threshold is a probability in [0, 1], got {threshold!r}.")
            postprocess["threshold"] = float(threshold)
        if tasks is not None:
            postprocess["tasks"] = self._check_tasks([tasks] if isinstance(tasks, str) else list(tasks))
        preprocess = {"timeout": timeout} if timeout is not None else {}
        return preprocess, {}, postprocess

    def __call__(self, inputs: Any, **kwargs: Any) -> dict[str, Any] | list[dict[str, Any]]:
        """Predict every task for one image (a dict) or a list of images (a list of dicts)."""
        if isinstance(inputs, tuple) or (isinstance(inputs, np.ndarray) and inputs.ndim == 4):
            inputs = list(inputs)  # a batch
        return super().__call__(inputs, **kwargs)

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        pil_image = read_image(image, mode=self.image_mode, timeout=timeout)
        pixel_values = self.image_processor(pil_image, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values.to(self.dtype or torch.float32)}

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # A flat {task: logits} dict: the pipeline's batching splits it back into single images.
        return dict(self.model(pixel_values=model_inputs["pixel_values"]).logits)

    def postprocess(
        self,
        model_outputs: dict[str, torch.Tensor],
        top_k: int = DEFAULT_TOP_K,
        threshold: float = DEFAULT_THRESHOLD,
        tasks: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for task in self.model_tasks:
            if tasks is not None and task.name not in tasks:
                continue
            values = task.predict(model_outputs[task.name].float())[0]
            if task.type == "regression":
                result[task.name] = {"value": values.tolist()}
                continue
            labels = task.id2label
            order = torch.argsort(values, descending=True, stable=True).tolist()
            if task.type == "classification":
                order = order[:top_k]
            else:
                order = [i for i in order if float(values[i]) >= threshold]
            result[task.name] = [{"label": labels[i], "score": float(values[i])} for i in order]
        return result


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_THRESHOLD", "DEFAULT_TOP_K", "MultiTaskImageClassificationPipeline", "PIPELINE_TASK", "read_image"]
