"""Multi-task learning: one backbone, several tasks learned at once.

- :mod:`~hf_tlmtl.multitask.balancing`: how the task losses become one loss (one class per method).
- :mod:`~hf_tlmtl.multitask.metrics`: per-task metrics, the overall score and ``delta_m``;
  :mod:`~hf_tlmtl.multitask.baselines`: what a model that ignores the image scores on them.
- :mod:`~hf_tlmtl.multitask.affinity` and :mod:`~hf_tlmtl.multitask.grouping`: which tasks help each other,
  measured during training, and the grouping into backbones that follows.
- :mod:`~hf_tlmtl.multitask.curves`: per-task training curves.
"""

from .affinity import (
    AFFINITY_JSON,
    AFFINITY_PNG,
    AffinityMatrix,
    TaskAffinityCallback,
    format_matrix,
    measure_affinity,
    plot_affinity,
)
from .balancing import BALANCERS, LossBalancer, build_balancer
from .baselines import baseline_metrics
from .curves import curve_series, plot_training_curves
from .grouping import TaskGrouping, group_tasks, grouping_score
from .metrics import (
    LOWER_IS_BETTER,
    MAIN_METRIC,
    METRICS_BY_TYPE,
    SCORE_METRIC,
    build_compute_metrics,
    delta_m,
    task_metrics,
)

__all__ = [
    "AFFINITY_JSON",
    "AFFINITY_PNG",
    "BALANCERS",
    "LOWER_IS_BETTER",
    "MAIN_METRIC",
    "METRICS_BY_TYPE",
    "SCORE_METRIC",
    "AffinityMatrix",
    "LossBalancer",
    "TaskAffinityCallback",
    "TaskGrouping",
    "baseline_metrics",
    "build_balancer",
    "build_compute_metrics",
    "curve_series",
    "delta_m",
    "format_matrix",
    "group_tasks",
    "grouping_score",
    "measure_affinity",
    "plot_affinity",
    "plot_training_curves",
    "task_metrics",
]
