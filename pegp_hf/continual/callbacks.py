"""Task-level events, in the style of ``transformers.TrainerCallback``.

Each task of a sequence is one ``Trainer.train`` call, so the usual events (``on_train_begin``, ``on_log``,
``on_step_end``, ...) fire once per task. A :class:`ContinualCallback` also gets the events of the sequence:

- ``on_task_begin(tasks, task_index)``: before a task's ``Trainer.train``, after its optimizer was reset;
- ``on_task_end(tasks, task_index, results)``: after its feature pass and every evaluator;
- ``on_task_save(tasks, task_index, checkpoint_dir)``: after ``task-<k>`` was written, on every process.

Like every ``TrainerCallback`` event they also receive ``args``, ``state``, ``control`` and ``model``. Add them
with ``ContinualPEGPTrainer(callbacks=[...])`` or ``trainer.add_callback``. The trainer's objective is one, and so
are the Hub push (:class:`~pegp_hf.io.hub.PushTaskToHubCallback`) and the class reveal of CLIP
(:class:`~pegp_hf.multimodal.clip.RevealSeenClasses`).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

TASK_EVENTS = ("on_task_begin", "on_task_end", "on_task_save")


class ContinualCallback(TrainerCallback):
    """A ``TrainerCallback`` that also hears the task-level events of the module docstring (all no-ops here)."""

    def on_task_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        """Before task ``task_index`` (0-based) of ``tasks`` trains."""

    def on_task_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        """After task ``task_index`` was trained, its features captured and every evaluator run; ``results`` is the
        trainer's :class:`~pegp_hf.continual.results.ContinualResults`."""

    def on_task_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        """After ``checkpoint_dir`` (``output_dir/task-<k>``) was written and every process waited for it."""


def call_task_event(handler: CallbackHandler, event: str, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> TrainerControl:  # fmt: skip
    """Fire ``event`` on the :class:`ContinualCallback` instances of ``handler`` (others have no task events), in
    order, with ``args``, ``state``, ``control``, ``model`` and ``kwargs``."""
    if event not in TASK_EVENTS:
        raise ValueError(f"unknown task event {event!r}: one of {TASK_EVENTS}")
    for callback in handler.callbacks:
        if isinstance(callback, ContinualCallback):
            result = getattr(callback, event)(args, state, control, model=handler.model, **kwargs)
            if result is not None:
                control = result
    return control
