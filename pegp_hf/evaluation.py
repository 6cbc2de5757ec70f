"""Measurements beyond the accuracy matrices, taken by :class:`~pegp_hf.ContinualPEGPTrainer` around each task.

A :class:`ContinualEvaluator` fills its own ``T x T`` matrices (summarised like the built-in ones: ACC, Forgetting,
BWT) and per-task scalars. The trainer stores both in ``continual_results()``, in every task checkpoint and in the
model card, and restores them on resume, so a resumed run reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pegp_hf.trainer import ContinualPEGPTrainer


@dataclass
class Evaluation:
    """What an evaluator measured after task ``t``.

    Attributes:
        columns: per matrix name, the accuracies (percent) of tasks ``0 .. t``: column ``t`` of that matrix.
        scalars: per-task figures, e.g. ``{"zero_shot_acc": 61.2}``; ``None`` where undefined (nothing old yet).
    """

    columns: dict[str, list[float]] = field(default_factory=dict)
    scalars: dict[str, float | None] = field(default_factory=dict)


class ContinualEvaluator:
    """Base class of extra measurements. Subclasses name their matrices and override the two hooks; both run on
    every process (gather there what is split over processes) and must return the same on every process."""

    matrices: tuple[str, ...] = ()

    def before_sequence(self, trainer: ContinualPEGPTrainer) -> dict[str, float]:
        """Figures of the model before the first task (e.g. zero-shot accuracy); not called on resume."""
        return {}

    def after_task(self, trainer: ContinualPEGPTrainer, index: int) -> Evaluation:
        """Measure after task ``index`` (0-based) has been trained and its bases grown. Scalars of earlier tasks are
        in ``trainer.task_metrics`` (also after a resume)."""
        raise NotImplementedError
