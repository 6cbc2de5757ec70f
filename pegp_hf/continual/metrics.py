"""Continual-learning metrics on an accuracy matrix (pure functions, numpy only).

``A[i, t]`` is the accuracy on task ``i``'s test set after training task ``t`` (``T x T``; entries with ``i > t``,
tasks not yet seen, are NaN and never read). With ``T`` tasks:

- ACC = mean_i A[i, T-1]
- Forgetting = mean_{i < T-1} (max_{i <= t < T-1} A[i, t] - A[i, T-1])
- BWT = mean_{i < T-1} (A[i, T-1] - A[i, i])

Forgetting and BWT are 0.0 for a single task (nothing old to forget). For a matrix where lower is better (a loss),
``higher_is_better=False`` turns the signs so that Forgetting stays "how much worse than the best earlier value"
(``A[i, T-1] - min_t A[i, t]``) and a negative BWT still means forgetting.
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_accuracy", "forgetting", "backward_transfer", "summarize"]


def _square(matrix: np.ndarray | list) -> np.ndarray:
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"an accuracy matrix must be square T x T with T >= 1, got shape {a.shape}")
    if np.isnan(a[np.triu_indices(a.shape[0])]).any():
        raise ValueError("accuracy matrix has NaN on or above the diagonal (A[i, t] for t >= i must be measured)")
    return a


def average_accuracy(matrix: np.ndarray | list) -> float:
    """ACC: mean accuracy over all tasks after the last one."""
    a = _square(matrix)
    return float(a[:, -1].mean())


def forgetting(matrix: np.ndarray | list, higher_is_better: bool = True) -> float:
    """Average forgetting: best earlier value minus final value (final minus best for a loss), over all tasks but
    the last."""
    a = _square(matrix) * (1.0 if higher_is_better else -1.0)
    last = a.shape[0] - 1
    if last == 0:
        return 0.0
    drops = [a[i, i:last].max() - a[i, last] for i in range(last)]
    return float(np.mean(drops))


def backward_transfer(matrix: np.ndarray | list, higher_is_better: bool = True) -> float:
    """BWT: final value minus the value just after learning (the opposite for a loss), over all tasks but the last
    (negative = forgetting)."""
    a = _square(matrix) * (1.0 if higher_is_better else -1.0)
    last = a.shape[0] - 1
    if last == 0:
        return 0.0
    return float(np.mean([a[i, last] - a[i, i] for i in range(last)]))


def summarize(matrix: np.ndarray | list) -> dict[str, float]:
    """``{"acc", "forgetting", "bwt"}`` of the matrix (all in the matrix's unit, e.g. percent)."""
    return {"acc": average_accuracy(matrix), "forgetting": forgetting(matrix), "bwt": backward_transfer(matrix)}
