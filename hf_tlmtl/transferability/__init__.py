"""Transferability: how well a frozen backbone's features fit a target task, measured without training.

- :mod:`~hf_tlmtl.transferability.estimators`: LogME, H-score and LEEP on feature and label arrays (numpy / torch only).
- :mod:`~hf_tlmtl.transferability.scoring`: a backbone's cached features scored against a dataset's tasks.
- :mod:`~hf_tlmtl.transferability.similarity`: source/target similarity, measured (the advice's ``similarity="measured"``).
- :mod:`~hf_tlmtl.transferability.ranking`: candidate backbones ranked for one target.

Three estimators from the literature, each scoring pooled features against one task's labels:

- **LogME** (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
  ICML 2021): the log marginal likelihood (evidence) per sample of a Bayesian linear model from the
  features to each target column, with its prior and noise precisions maximised by the paper's
  fixed-point iteration; one SVD of the features serves every column. Classification and regression.
- **H-score** (Bao et al., "An Information-Theoretic Approach to Transferability in Task Transfer
  Learning", ICIP 2019): ``tr(cov(f)^-1 cov(E[f | y]))``, how much of the feature variance separates the
  classes. With more feature dimensions than images the plain covariance is singular and the score
  saturates, so the feature covariance is shrunk (Ledoit-Wolf), as Ibrahim et al. ("Newer is not always
  better: rethinking transferability metrics, their peculiarities, stability and performance", ECML-PKDD
  2022) recommend. Classification only.
- **LEEP** (Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of Learned
  Representations", ICML 2020): the log-likelihood of the target labels under the source classifier's
  predictions pushed through the empirical P(target | source class). Needs a source that still has its
  classifier: a timm checkpoint with ``num_classes > 0`` (``local-dir:``, ``hf-hub:``, a timm name), or a
  saved hf_tlmtl model's classification head (``source_task=``). Classification only.

Which to trust: LogME is the default. It is the one with a probabilistic meaning for every task type,
it needs no source classifier, and in the comparisons above (and Agostinelli et al., "How stable are
transferability metrics evaluations?", ECCV 2022) it is among the most consistent; no estimator wins
everywhere, and all of them rank backbones for *one* target, they are not comparable across targets.
``benchmarks/transfer_study`` measures how well each predicts fine-tuned accuracy here (Kendall's tau).

Missing labels (``-100`` / ``NaN``) drop that row for that task only. A multilabel task is scored as one
binary classification per label, averaged. Features come from :func:`hf_tlmtl.data.cache_features`, so a
backbone already run over the data costs no second pass.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 3, 200)
    >>> informative = np.eye(3)[labels] + 0.3 * rng.normal(size=(200, 3))
    >>> noise = rng.normal(size=(200, 3))
    >>> logme(informative, labels) > logme(noise, labels)
    True
    >>> h_score(informative, labels) > h_score(noise, labels)
    True
"""

from .estimators import LogMEFit, h_score, leep, logme, logme_evidence
from .ranking import Ranked, normalize_scores, rank_backbones, ranking_markdown
from .scoring import (
    METHODS,
    MIN_ROWS,
    check_labels,
    load_source,
    pooled_features,
    score_features,
    score_transferability,
)
from .similarity import (
    MEASURED_GAIN_SCALE,
    MEASURED_GAIN_THRESHOLD,
    TRUNCATED_SCORE_MARGIN,
    SimilarityMeasurement,
    measure_similarity,
    similarity_from_gain,
)

__all__ = [
    "MEASURED_GAIN_SCALE",
    "MEASURED_GAIN_THRESHOLD",
    "METHODS",
    "MIN_ROWS",
    "TRUNCATED_SCORE_MARGIN",
    "LogMEFit",
    "Ranked",
    "SimilarityMeasurement",
    "check_labels",
    "h_score",
    "leep",
    "load_source",
    "logme",
    "logme_evidence",
    "measure_similarity",
    "normalize_scores",
    "pooled_features",
    "rank_backbones",
    "ranking_markdown",
    "score_features",
    "score_transferability",
    "similarity_from_gain",
]
