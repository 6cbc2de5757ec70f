"""Measurements after each task: every matrix ``A[i, t]`` of a run, built-in or added, comes from an evaluator.

A :class:`ContinualEvaluator` names its ``T x T`` matrices (:class:`~pegp_hf.continual.results.MatrixSpec`: higher
or lower is better) and fills column ``t`` of each after task ``t``, with any per-task figures beside them. The
trainer summarises every matrix (average, Forgetting, BWT), logs the figures, stores both in every task checkpoint
and model card, and restores them on resume, so a resumed run reports exactly what an uninterrupted one would.

Built in: the classification objective's accuracies
(:class:`~pegp_hf.continual.classification.ClassificationAccuracy`) and :class:`TaskLossEvaluator`, the model's own
loss on each task's test set (the model-loss objective's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pegp_hf.continual.results import MatrixSpec

if TYPE_CHECKING:
    from pegp_hf.trainer import ContinualPEGPTrainer


@dataclass
class Evaluation:
    """What an evaluator measured after task ``t``.

    Attributes:
        columns: per matrix name, the values of tasks ``0 .. t``: column ``t`` of that matrix.
        scalars: per-task figures, e.g. ``{"zero_shot_acc": 61.2}``; ``None`` where undefined (nothing old yet).
    """

    columns: dict[str, list[float]] = field(default_factory=dict)
    scalars: dict[str, float | None] = field(default_factory=dict)


class ContinualEvaluator:
    """Base class of measurements after each task. Subclasses name their matrices (``MatrixSpec``, or a plain name
    for an accuracy in percent) and override the two hooks; both run on every process (gather there what is split
    over processes) and must return the same on every process."""

    matrices: tuple[MatrixSpec | str, ...] = ()

    def matrix_specs(self) -> list[MatrixSpec]:
        """:attr:`matrices` with plain names read as higher-is-better."""
        return [spec if isinstance(spec, MatrixSpec) else MatrixSpec(spec) for spec in self.matrices]

    def before_sequence(self, trainer: ContinualPEGPTrainer) -> dict[str, float]:
        """Figures of the model before the first task (e.g. zero-shot accuracy); not called on resume."""
        return {}

    def after_task(self, trainer: ContinualPEGPTrainer, index: int) -> Evaluation:
        """Measure after task ``index`` (0-based) has been trained and its bases grown. Figures of earlier tasks are
        in ``trainer.results.task_metrics`` (also after a resume)."""
        raise NotImplementedError


def merge_evaluations(
    evaluators: Sequence[ContinualEvaluator], evaluations: Sequence[Evaluation]
) -> tuple[dict[str, list[float]], dict[str, float | None]]:
    """The columns and figures of every evaluator, each checked: an evaluator fills exactly the matrices it names,
    and no two give a figure of the same name.

    Raises:
        ValueError: naming the evaluator and what it got wrong.
    """
    columns: dict[str, list[float]] = {}
    scalars: dict[str, float | None] = {}
    for evaluator, evaluation in zip(evaluators, evaluations, strict=True):
        named = {spec.name for spec in evaluator.matrix_specs()}
        if set(evaluation.columns) != named:
            raise ValueError(
                f"{type(evaluator).__name__} filled the matrices {sorted(evaluation.columns)} but names {sorted(named)}"
            )
        clash = sorted(set(evaluation.scalars) & set(scalars))
        if clash:
            raise ValueError(f"{type(evaluator).__name__} gives figures {clash} that another evaluator gives too")
        columns.update(evaluation.columns)
        scalars.update(evaluation.scalars)
    return columns, scalars


class TaskLossEvaluator(ContinualEvaluator):
    """``Trainer.evaluate`` on the test set of every seen task: matrix ``loss`` is its ``eval_loss`` (the model's
    own loss, averaged over batches as the Trainer does), lower is better; every name in ``metrics`` is read from
    the ``compute_metrics`` results of the same call (e.g. ``"accuracy"``).

    The evaluation is logged as usual, prefixed ``task_<i>_``.
    """

    def __init__(self, metrics: Sequence[MatrixSpec | str] = ()) -> None:
        extra = [spec if isinstance(spec, MatrixSpec) else MatrixSpec(spec) for spec in metrics]
        self.matrices = (MatrixSpec("loss", higher_is_better=False), *extra)

    def after_task(self, trainer: ContinualPEGPTrainer, index: int) -> Evaluation:
        columns: dict[str, list[float]] = {spec.name: [] for spec in self.matrix_specs()}
        for i, task in enumerate(trainer.tasks[: index + 1]):
            prefix = f"task_{i + 1}"
            metrics = trainer.evaluate(eval_dataset=task.test, metric_key_prefix=prefix)
            for name, column in columns.items():
                key = f"{prefix}_{name}"
                if key not in metrics:
                    raise ValueError(
                        f"Trainer.evaluate returned no {key!r} (got {sorted(metrics)}): for {name!r}, pass a "
                        "compute_metrics that returns it"
                    )
                column.append(float(metrics[key]))
        return Evaluation(columns)
