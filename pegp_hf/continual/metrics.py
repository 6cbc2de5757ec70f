"""Continual-learning metrics on an accuracy matrix (pure functions, numpy only).

``A[i, t]`` is the accuracy on task ``i``'s test set after training task ``t`` (``T x T``; entries with ``i > t``,
tasks not yet seen, are NaN and never read). With ``T`` tasks:

- ACC = mean_i A[i, T-1]
- Forgetting = mean_{i < T-1} (max_{i <= t < T-1} A[i, t] - A[i, T-1])
- BWT = mean_{i < T-1} (A[i, T-1] - A[i, i])

Two more need a reference accuracy per task, ``r_i``, measured apart from the sequence:

- Forward transfer, FWT = mean_{i > 0} (A[i, i] - r_i) with ``r_i`` the accuracy of tuning task ``i`` alone from the
  pre-trained model (the PET-era form used in continual NLP, Ke & Liu 2022; negative = the earlier tasks, or their
  protection, cost plasticity on the new one);
- Intransigence, I = mean_i (r_i - A[i, i]) with ``r_i`` the accuracy of a model trained jointly on every task
  (Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018: how much less a task is learnt than it
  could be).

Forgetting and BWT are 0.0 for a single task (nothing old to forget). For a matrix where lower is better (a loss),
``higher_is_better=False`` turns the signs so that Forgetting stays "how much worse than the best earlier value"
(``A[i, T-1] - min_t A[i, t]``) and a negative BWT still means forgetting.
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_accuracy", "backward_transfer", "forgetting", "forward_transfer", "intransigence", "summarize"]


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


def _reference(matrix: np.ndarray, reference: np.ndarray | list) -> np.ndarray:
    r = np.asarray(reference, dtype=np.float64)
    if r.shape != (matrix.shape[0],) or not np.isfinite(r).all():
        raise ValueError(f"the reference needs one finite accuracy per task ({matrix.shape[0]}), got {r.tolist()}")
    return r


def forward_transfer(matrix: np.ndarray | list, single_task: np.ndarray | list) -> float:
    """FWT: accuracy on each task just after learning it minus that of tuning it alone (``single_task``, one value
    per task), over all tasks but the first (0.0 for a single task)."""
    a = _square(matrix)
    r = _reference(a, single_task)
    return 0.0 if len(a) == 1 else float(np.mean([a[i, i] - r[i] for i in range(1, len(a))]))


def intransigence(matrix: np.ndarray | list, joint: np.ndarray | list) -> float:
    """Intransigence: the jointly trained model's accuracy on each task (``joint``, one value per task) minus the
    accuracy just after learning it, over all tasks."""
    a = _square(matrix)
    r = _reference(a, joint)
    return float(np.mean(r - np.diag(a)))


def summarize(matrix: np.ndarray | list) -> dict[str, float]:
    """``{"acc", "forgetting", "bwt"}`` of the matrix (all in the matrix's unit, e.g. percent)."""
    return {"acc": average_accuracy(matrix), "forgetting": forgetting(matrix), "bwt": backward_transfer(matrix)}
