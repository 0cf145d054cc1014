"""Random in-memory data for Trainer tests whose models have a classification task ``c`` (3 classes)
and a regression task ``y``: the backbone sees noise, the assertions are about what trains."""

from __future__ import annotations

import numpy as np
from datasets import Dataset


def random_task_dataset(n: int, image: int = 32, seed: int = 0) -> Dataset:
    """``n`` rows of ``pixel_values`` (3 x image x image), a class index ``c`` and a float ``y``, as torch."""
    rng = np.random.default_rng(seed)
    return Dataset.from_dict(
        {
            "pixel_values": rng.standard_normal((n, 3, image, image)).astype("float32"),
            "c": rng.integers(0, 3, n),
            "y": rng.standard_normal(n).astype("float32"),
        }
    ).with_format("torch")
