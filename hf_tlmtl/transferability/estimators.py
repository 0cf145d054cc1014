"""Transferability estimators on arrays: LogME, H-score (shrunk covariance) and LEEP.

Numpy and torch only: no model, no dataset. The references are in :mod:`hf_tlmtl.transferability`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf

_LOGME_MAX_ITERATIONS = 100
_LOGME_TOLERANCE = 1e-6
_PRECISION_MIN, _PRECISION_MAX = 1e-10, 1e10


@dataclass
class LogMEFit:
    """The evidence-maximising prior precision ``alpha`` and noise precision ``beta`` of one target column."""

    evidence: float
    alpha: float
    beta: float


def as_float64(features: Any) -> np.ndarray:
    """``features`` (tensor or array) as a 2-D float64 numpy array; ``ValueError`` for any other shape."""
    array = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be a 2-D array (rows, dimensions), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or inf; check the backbone (dtype, input normalisation).")
    return array


def logme_evidence(features: Any, targets: Any) -> list[LogMEFit]:
    """LogME's maximised evidence per sample for each column of ``targets`` (``(rows,)`` or ``(rows, k)``).

    The Bayesian linear model ``y = f w + e`` with ``w ~ N(0, I / alpha)`` and ``e ~ N(0, 1 / beta)``;
    its evidence ``log p(y | f, alpha, beta)`` is maximised over ``alpha`` and ``beta`` by MacKay's
    fixed-point updates, in the SVD form of the LogME paper (Algorithm 2): ``f = U S V^T`` once, then
    every iteration is O(rank).

    Example:
        >>> import numpy as np
        >>> f = np.random.default_rng(0).normal(size=(50, 4))
        >>> fit = logme_evidence(f, f @ np.array([1.0, -2.0, 0.0, 0.5]))[0]
        >>> fit.beta > 1e3  # the targets are an exact linear function of the features: almost no noise
        True
    """
    f = as_float64(features)
    y = np.asarray(targets, dtype=np.float64)
    y = y.reshape(len(y), -1)
    if len(y) != len(f):
        raise ValueError(f"features have {len(f)} rows but targets {len(y)}.")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2  # eigenvalues of f^T f (the rank-many non-zero ones)
    projections = u.T @ y  # (rank, k)
    fits = []
    for column in range(y.shape[1]):
        z, yy = projections[:, column], float(y[:, column] @ y[:, column])
        z2 = z**2
        alpha, beta = 1.0, 1.0
        for _ in range(_LOGME_MAX_ITERATIONS):
            shrink = beta * sigma / (alpha + beta * sigma)
            gamma = float(shrink.sum())
            m2 = float((shrink**2 / np.maximum(sigma, 1e-300) * z2).sum())  # ||m||^2 with m = beta A^-1 f^T y
            residual = _residual(yy, z2, shrink)
            # With more dimensions than rows the fit can be perfect (gamma -> n, residual -> 0) and the
            # evidence's supremum lies at beta -> infinity: bounded precisions keep the iteration finite.
            new_alpha = min(max(gamma / max(m2, 1e-300), _PRECISION_MIN), _PRECISION_MAX)
            new_beta = min(max((n - gamma) / max(residual, 1e-300), _PRECISION_MIN), _PRECISION_MAX)
            done = abs(new_alpha / new_beta - alpha / beta) <= _LOGME_TOLERANCE * (alpha / beta)
            alpha, beta = new_alpha, new_beta
            if done:
                break
        fits.append(LogMEFit(_evidence(n, d, sigma, z2, yy, alpha, beta) / n, alpha, beta))
    return fits


def _residual(yy: float, z2: np.ndarray, shrink: np.ndarray) -> float:
    """``||y - f m||^2``: the part of ``y`` outside the features' span plus what the shrunk fit leaves inside it."""
    outside = max(yy - float(z2.sum()), 0.0)  # >= 0 up to rounding
    return outside + float(((1 - shrink) ** 2 * z2).sum())


def _evidence(n: int, d: int, sigma: np.ndarray, z2: np.ndarray, yy: float, alpha: float, beta: float) -> float:
    """``log p(y | f, alpha, beta)`` in the SVD form (m, residual and log|A| at these alpha, beta)."""
    shrink = beta * sigma / (alpha + beta * sigma)
    m2 = float((shrink**2 / np.maximum(sigma, 1e-300) * z2).sum())
    residual = _residual(yy, z2, shrink)
    log_det_a = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
    return (
        d / 2 * math.log(alpha) + n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual - alpha / 2 * m2 - log_det_a / 2
    )


def _class_indices(labels: Any) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("classification labels must be integer class indices.")
    return y.astype(np.int64)


def logme(features: Any, labels: Any, task_type: str = "classification") -> float:
    """LogME score: mean evidence per sample over the target columns (one-hot classes, or regression outputs).

    Regression targets are standardised first, so the score does not depend on the unit of the label.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> f = rng.normal(size=(100, 8))
        >>> logme(f, f[:, 0] + 0.1 * rng.normal(size=100), "regression") > logme(f, rng.normal(size=100), "regression")
        True
    """
    if task_type == "classification":
        y = _class_indices(labels)
        targets = np.eye(int(y.max()) + 1)[y]
        targets = targets[:, targets.any(axis=0)]  # classes absent from these rows carry no information
    elif task_type == "regression":
        targets = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
        targets = (targets - targets.mean(axis=0)) / np.maximum(targets.std(axis=0), 1e-12)
    else:
        raise ValueError(f"logme scores 'classification' or 'regression' targets, got {task_type!r}.")
    return float(np.mean([fit.evidence for fit in logme_evidence(features, targets)]))


def h_score(features: Any, labels: Any) -> float:
    """H-score ``tr(cov(f)^-1 cov(E[f | y]))`` with a Ledoit-Wolf-shrunk feature covariance.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 2, 300)
        >>> f = np.c_[y + 0.1 * rng.normal(size=300), rng.normal(size=300)]
        >>> 0.9 < h_score(f, y) < 1.0  # one dimension carries the labels almost noise-free: close to 1
        True
    """

    f = as_float64(features)
    y = _class_indices(labels)
    f = f - f.mean(axis=0)
    covariance, _ = ledoit_wolf(f, assume_centered=True)
    class_means = np.zeros_like(f)
    for label in np.unique(y):
        rows = y == label
        class_means[rows] = f[rows].mean(axis=0)
    between = class_means.T @ class_means / len(f)
    return float(np.trace(np.linalg.pinv(covariance, hermitian=True) @ between))  # pinv: constant features give 0


def leep(source_probabilities: Any, labels: Any) -> float:
    """LEEP: ``mean log sum_z P(y | z) theta(x)_z`` from the source classifier's probabilities ``theta``.

    Example:
        >>> import numpy as np
        >>> y = np.array([0, 0, 1, 1])
        >>> sharp = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])
        >>> leep(sharp, y) > leep(np.full((4, 2), 0.5), y)
        True
    """
    theta = as_float64(source_probabilities)
    if (theta < 0).any() or not np.allclose(theta.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("leep needs source class probabilities (non-negative rows summing to 1): apply softmax first.")
    y = _class_indices(labels)
    joint = np.zeros((int(y.max()) + 1, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= len(y)  # P(y, z)
    conditional = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1e-300)  # P(y | z)
    expected = (theta * conditional[y]).sum(axis=1)
    return float(np.mean(np.log(np.maximum(expected, 1e-300))))
