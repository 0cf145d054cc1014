"""Task groupings from an affinity matrix: which tasks share a backbone (:func:`group_tasks`).

Example:
    >>> import numpy as np
    >>> z = np.array([[0.3, 0.2, -0.1], [0.2, 0.3, -0.1], [-0.1, -0.1, 0.3]])
    >>> grouping = group_tasks(z, max_groups=2, tasks=["a", "b", "c"])
    >>> grouping.groups, round(grouping.score, 3), grouping.exact
    ((('a', 'b'), ('c',)), 0.4, True)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .affinity import DEFAULT_BUDGET, AffinityMatrix


@dataclass(frozen=True)
class TaskGrouping:
    """A partition of the tasks, one backbone per group, and its total affinity (:func:`grouping_score`)."""

    groups: tuple[tuple[str, ...], ...]
    score: float
    exact: bool
    """True when every admissible grouping was scored (the optimum); False for the beam-search approximation."""


def grouping_score(affinity: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """Total affinity of a grouping, TAG's criterion: each task of a group of two or more scores the mean
    affinity onto it from its group mates, ``mean_{i in G, i != j} Z(i -> j)``; a task alone scores 0.

    Example:
        >>> grouping_score(np.array([[0.0, 0.2], [0.4, 0.0]]), [[0, 1]])
        0.6000000000000001
    """
    total = 0.0
    for group in groups:
        if len(group) < 2:
            continue
        block = affinity[np.ix_(group, group)]
        total += float((block.sum(axis=0) - np.diag(block)).sum()) / (len(group) - 1)
    return total


def _partitions(n: int, low: int, high: int) -> Iterator[list[list[int]]]:
    """Every partition of ``range(n)`` into ``low..high`` non-empty groups (restricted growth strings)."""

    def grow(item: int, groups: list[list[int]]) -> Iterator[list[list[int]]]:
        if len(groups) + (n - item) < low:
            return
        if item == n:
            yield [list(g) for g in groups]
            return
        for group in groups:
            group.append(item)
            yield from grow(item + 1, groups)
            group.pop()
        if len(groups) < high:
            groups.append([item])
            yield from grow(item + 1, groups)
            groups.pop()

    yield from grow(0, [])


def _count_partitions(n: int, low: int, high: int) -> int:
    """Sum of the Stirling numbers of the second kind ``S(n, k)`` for ``k`` in ``low..high``."""
    stirling = [[0] * (n + 1) for _ in range(n + 1)]
    stirling[0][0] = 1
    for i in range(1, n + 1):
        for k in range(1, i + 1):
            stirling[i][k] = k * stirling[i - 1][k] + stirling[i - 1][k - 1]
    return sum(stirling[n][k] for k in range(low, high + 1))


def _beam_search(affinity: np.ndarray, low: int, high: int, width: int) -> list[list[int]]:
    """Tasks placed one at a time into an existing group or a new one; the ``width`` best partial groupings
    (by :func:`grouping_score`) survive each placement. Then single-task moves while they raise the score."""
    n = len(affinity)
    beam: list[list[list[int]]] = [[]]
    for item in range(n):
        candidates = []
        for groups in beam:
            options = [[*groups[:k], [*groups[k], item], *groups[k + 1:]] for k in range(len(groups))]
            if len(groups) < high:
                options.append([*groups, [item]])
            candidates += [o for o in options if len(o) + (n - item - 1) >= low]
        candidates.sort(key=lambda gs: grouping_score(affinity, gs), reverse=True)
        beam = candidates[:width]
    best = beam[0]
    improved = True
    while improved:
        improved = False
        current = grouping_score(affinity, best)
        for item, target in itertools.product(range(n), range(len(best) + 1)):
            moved = [[t for t in g if t != item] for g in best]
            if target < len(best):
                moved[target].append(item)
            else:
                moved.append([item])
            moved = [g for g in moved if g]
            if low <= len(moved) <= high and grouping_score(affinity, moved) > current + 1e-12:
                best, improved = moved, True
                break
    return best


def group_tasks(
    affinity: AffinityMatrix | np.ndarray | Sequence[Sequence[float]],
    max_groups: int,
    *,
    tasks: Sequence[str] | None = None,
    min_groups: int = 1,
    budget: int = DEFAULT_BUDGET,
) -> TaskGrouping:
    """The partition of the tasks into ``min_groups..max_groups`` groups with the highest total affinity.

    Each group is then trained as one multi-task model (one backbone per group). The criterion is
    :func:`grouping_score` on the lookahead matrix ``Z(i -> j)`` (TAG, Fifty et al. 2021, with groups
    that do not overlap). When the admissible partitions number at most ``budget`` (always for <= 8
    tasks with the default 5,000), all of them are scored and the optimum is returned (``exact=True``).
    Above that, an approximation (``exact=False``): a beam search placing tasks one at a time that keeps
    about ``budget / (tasks * (max_groups + 1))`` partial groupings, then single-task moves while the
    score rises; it scores on the order of ``budget`` groupings.

    Args:
        affinity: An :class:`AffinityMatrix` (its ``lookahead``) or a square matrix, rows = source task.
        max_groups: At most this many groups (backbones), ``1 <= max_groups <= number of tasks``.
        tasks: Task names of a plain matrix (default ``"0"``, ``"1"``, ...).
        min_groups: At least this many groups (``min_groups = max_groups``: exactly that many).
        budget: Groupings to score before switching to the approximation.

    Example:
        >>> z = [[0.0, 0.5, -0.2, -0.2], [0.5, 0.0, -0.2, -0.2], [-0.2, -0.2, 0.0, 0.1], [-0.2, -0.2, 0.1, 0.0]]
        >>> group_tasks(z, max_groups=2, tasks=["a", "b", "c", "d"]).groups
        (('a', 'b'), ('c', 'd'))
        >>> group_tasks(z, max_groups=4, min_groups=3, tasks=["a", "b", "c", "d"]).groups
        (('a', 'b'), ('c',), ('d',))
    """
    if isinstance(affinity, AffinityMatrix):
        tasks = affinity.tasks if tasks is None else tasks
        affinity = affinity.lookahead
    matrix = np.asarray(affinity, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"group_tasks needs a square affinity matrix (source x target), got shape {matrix.shape}.")
    n = matrix.shape[0]
    names = [str(i) for i in range(n)] if tasks is None else [str(t) for t in tasks]
    if len(names) != n:
        raise ValueError(f"tasks names {len(names)} tasks for a {n} x {n} affinity matrix; give one name per row.")
    if n < 2:
        raise ValueError(f"Grouping needs at least two tasks, got {n} ({names}).")
    off_diagonal = ~np.eye(n, dtype=bool)
    if not np.isfinite(matrix[off_diagonal]).all():
        bad = sorted({names[i] for i, j in zip(*np.where(~np.isfinite(matrix) & off_diagonal)) for i in (i, j)})
        raise ValueError(
            f"The affinity matrix has missing (NaN) or infinite entries for tasks {bad}: they had no label in the "
            "measured batches. Measure again with batches that label them, or leave them out."
        )
    for label, value in (("max_groups", max_groups), ("min_groups", min_groups)):
        if not isinstance(value, (int, np.integer)) or not 1 <= value <= n:
            raise ValueError(
                f"{label} must be an int from 1 to the number of tasks ({n}: {names}), got {value!r}; "
                f"{n} groups already give every task its own backbone."
            )
    if min_groups > max_groups:
        raise ValueError(f"min_groups ({min_groups}) is larger than max_groups ({max_groups}).")
    if not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be an int >= 1 (groupings to score), got {budget!r}.")
    exact = _count_partitions(n, min_groups, max_groups) <= budget
    if exact:
        best = max(_partitions(n, min_groups, max_groups), key=lambda gs: grouping_score(matrix, gs))
    else:
        best = _beam_search(matrix, min_groups, max_groups, width=max(1, budget // (n * (max_groups + 1))))
    ordered = sorted((sorted(g) for g in best), key=lambda g: (-len(g), g))
    groups = tuple(tuple(names[i] for i in g) for g in ordered)
    return TaskGrouping(groups=groups, score=grouping_score(matrix, best), exact=exact)
