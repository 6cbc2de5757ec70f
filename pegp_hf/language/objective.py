"""The instruction objective: a chat model trained on its answers, judged by what it answers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from torch import nn

from pegp_hf.continual.evaluators import ContinualEvaluator
from pegp_hf.continual.objectives import ContinualObjective
from pegp_hf.continual.tasks import TaskSequence
from pegp_hf.language.evaluators import InstructionEvaluator
from pegp_hf.language.frozen_bottom import TopLayers

if TYPE_CHECKING:
    from pegp_hf.config import PEGPTrainingArguments


class InstructionObjective(ContinualObjective):
    """Train with the model's own loss on the answer tokens (the prompt is labelled ``-100`` by
    :func:`~pegp_hf.language.tasks.instruction_tasks`), judge each task with
    :class:`~pegp_hf.language.evaluators.InstructionEvaluator`: ``accuracy`` (the headline), ``exact_match`` and
    ``answer_loss``.

    Args:
        max_examples: score at most this many test rows per task.
        train_from_layer: train and capture features on the decoder's layers from this one only, on training rows
            that hold the frozen bottom's hidden states (:func:`~pegp_hf.language.frozen_bottom.encode_bottom`);
            evaluation, generation and checkpoints see the whole model. ``None``: the whole model throughout.
    """

    name = "instruction"

    def __init__(self, max_examples: int | None = None, train_from_layer: int | None = None) -> None:
        self.max_examples, self.train_from_layer = max_examples, train_from_layer
        self.top: TopLayers | None = None

    def setup(self, model: nn.Module, args: PEGPTrainingArguments) -> None:
        if self.train_from_layer is not None:
            self.top = TopLayers(model, self.train_from_layer)

    def validate(self, tasks: TaskSequence) -> None:
        tasks.check_splits()
        inputs = "input_ids" if self.top is None else "inputs_embeds"
        for task in tasks:
            for split, columns in ((task.train, (inputs, "labels")), (task.test, ("prompt_ids", "candidate_ids"))):
                missing = sorted(set(columns) - set(split.column_names))
                if missing:
                    how = "instruction_tasks" + ("" if self.top is None else ", then encode_bottom on the train split")
                    raise ValueError(f"task {task.name!r} has no {missing} columns: build it with {how}")

    def evaluators(self) -> Sequence[ContinualEvaluator]:
        return [InstructionEvaluator(self.max_examples)]

    @contextlib.contextmanager
    def training_view(self) -> Iterator[None]:
        """The top layers only while a task trains and its features are captured; the whole model again after it,
        also when training fails."""
        with self.top.active() if self.top is not None else contextlib.nullcontext():
            yield
