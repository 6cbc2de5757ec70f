"""Objectives: how a task sequence is trained and judged.

An objective supplies the training loss (or lets the model compute its own), the evaluators whose matrices judge
the run and which of them is the headline, and anything it keeps across tasks (class statistics of a head) with
the checkpoint file it lives in. It is a :class:`~pegp_hf.continual.callbacks.ContinualCallback`, so it hears the
task events (e.g. to mask the logits of classes outside the current task).

- :class:`~pegp_hf.continual.classification.ClassificationObjective`: class-split tasks on a classifier; the paper's
  protocol with the masked-linear, prototype and aligned heads, class- and task-incremental accuracy matrices.
- :class:`ModelLossObjective`: the model's own loss (labels in the batch: ``AutoModelForCausalLM`` with ``-100``
  labels, ``AutoModelForSeq2SeqLM``, ...), judged by the per-task loss (:class:`TaskLossEvaluator`).

``ContinualPEGPTrainer(objective=None)`` picks the classification objective for tasks that own classes
(``class_incremental_tasks`` and its siblings) and the model-loss objective for tasks that own none
(``dataset_tasks``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from pegp_hf.continual.callbacks import ContinualCallback
from pegp_hf.continual.evaluators import ContinualEvaluator, TaskLossEvaluator
from pegp_hf.continual.results import MatrixSpec
from pegp_hf.continual.tasks import TaskSequence

if TYPE_CHECKING:
    from pegp_hf.config import PEGPTrainingArguments
    from pegp_hf.trainer import ContinualPEGPTrainer

BatchObserver = Callable[[dict[str, Any], Any], None]


class ContinualObjective(ContinualCallback):
    """Base class: the model's own loss, no evaluator, nothing kept across tasks. Override what differs.

    Attributes:
        name: stored as ``objective`` in every checkpoint (default: the class name).
        must_match: the :meth:`config` keys a resume must find unchanged.
        compute_loss: ``(outputs, labels, num_items_in_batch) -> loss`` given to the Trainer as
            ``compute_loss_func``, or ``None`` to train with the loss the model returns.
        model_takes_labels: whether the batch's ``labels`` go into the model outside training too (the feature
            pass): a seq2seq model builds its decoder inputs from them; a classifier judged by its logits does not
            need them.
    """

    compute_loss: Callable[..., Any] | None = None
    model_takes_labels: bool = True
    name: str = ""
    must_match: tuple[str, ...] = ("objective",)

    def setup(self, model: nn.Module, args: PEGPTrainingArguments) -> None:
        """Called once from the trainer's ``__init__``, before it changes anything: check that the model fits (raise
        ``ValueError`` / ``TypeError`` naming what does not) and keep what is needed later. Change nothing."""

    def validate(self, tasks: TaskSequence) -> None:
        """Called at the start of ``train()``, before anything is written: raise ``ValueError`` naming what in
        ``tasks`` does not fit."""
        tasks.check_splits()

    def evaluators(self) -> list[ContinualEvaluator]:
        """The built-in evaluators, run before any the user adds."""
        return []

    def headline(self, tasks: TaskSequence) -> str:
        """The matrix the run is judged by (the first built-in one)."""
        specs = [spec for evaluator in self.evaluators() for spec in evaluator.matrix_specs()]
        if not specs:
            raise ValueError(f"{type(self).__name__} has no evaluator, so no headline matrix")
        return specs[0].name

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable weights that are the objective's own (a classifier head): trained but not projected, and the
        only ones ``method="head_only"`` trains."""
        return []

    def config(self) -> dict[str, Any]:
        """Settings stored with every checkpoint (and in ``continual_results()``); a resume is refused when those
        named in :attr:`must_match` differ, and warns for the others."""
        return {"objective": self.name or type(self).__name__}

    @contextlib.contextmanager
    def training_view(self) -> Iterator[None]:
        """Open while a task trains and its features are captured, closed (also on error) before evaluation and the
        checkpoint: the model as the training data need it (e.g. only its top layers)."""
        yield

    def before_task(self, trainer: ContinualPEGPTrainer, index: int) -> None:
        """At the start of task ``index``, before it trains and before the task's seed is set, on every process."""

    @contextlib.contextmanager
    def observing(self) -> Iterator[BatchObserver | None]:
        """While open, the feature pass after each task runs; the yielded function (if any) sees every batch's
        ``(inputs, outputs)``. ``None``: the objective needs nothing from that pass."""
        yield None

    def after_feature_pass(self, trainer: ContinualPEGPTrainer, index: int) -> None:
        """After the feature pass of task ``index``, on every process (gather what is split)."""

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        """Write what the objective keeps across tasks into a task checkpoint folder."""

    def read_checkpoint(self, directory: str | os.PathLike) -> Any:
        """Read and check what :meth:`save_checkpoint` wrote, changing nothing (``CheckpointError`` if it does not
        fit)."""
        return None

    def load_checkpoint(self, stored: Any) -> None:
        """Take over what :meth:`read_checkpoint` returned."""


class ModelLossObjective(ContinualObjective):
    """Train with the loss the model computes from the batch's ``labels`` and judge each task by that loss on its
    test set (matrix ``loss``, the headline), plus the ``compute_metrics`` results named in ``metrics``."""

    name = "model_loss"

    def __init__(self, metrics: Sequence[MatrixSpec | str] = ()) -> None:
        self.metrics = tuple(metrics)

    def evaluators(self) -> list[ContinualEvaluator]:
        return [TaskLossEvaluator(self.metrics)]
