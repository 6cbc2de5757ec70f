"""PEGP as a callback, for a Trainer that is not :class:`~pegp_hf.ContinualPEGPTrainer` (TRL's ``SFTTrainer``, your
own): each ``train()`` call is one task of the sequence.

    pegp = PEGPCallback(threshold=0.97)
    for dataset in tasks:  # one trainer per task, the same model and the same callback
        SFTTrainer(model=peft_model, args=SFTConfig(...), train_dataset=dataset, callbacks=[pegp]).train()

The callback finds the protected tensors of the model's PET when the first task begins; before each optimizer step
it projects the gradients against the bases (after the Trainer's clipping, which then saw them unprojected: the
update's guarantee is unchanged) and brackets the step like the continual trainer (update re-projection for Adam,
``pegp_update_overlap``); when a task ends it runs ``feature_batches`` batches of that task's training data through
the model (no gradient) and grows the bases. What it leaves to the continual trainer: evaluation of old tasks,
checkpoints of the bases, resume.

Under bf16 autocast (``SFTConfig``'s default) Accelerate keeps the model's forward in bf16 after training, so old
outputs are kept to bf16 precision (about 1e-2), not to float32 noise; ``bf16=False`` keeps them exactly.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import TrainerCallback

from pegp_hf.backends import grow_bases_on_every_rank
from pegp_hf.bracket import UpdateBracket
from pegp_hf.core.capture import FeatureCovariances
from pegp_hf.core.projector import GradientProjector
from pegp_hf.tuners.handle import pet_handle

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "pixel_values", "token_type_ids")


class PEGPCallback(TrainerCallback):
    """Gradient projection for continual training with any ``transformers.Trainer`` (see the module docstring).

    Args:
        threshold: the energy threshold eps of the bases.
        feature_batches: training batches of each finished task whose features grow the bases.
        protect: a regex on parameter names selecting the protected tensors.
        update_reprojection: ``auto`` / ``on`` / ``off`` (see :class:`~pegp_hf.bracket.UpdateBracket`).
        max_tokens_per_sequence: at most this many real tokens of each sequence enter a basis.
        covariances_on_cpu: keep the feature sums in float64 on the CPU (see ``FeatureCovariances``).

    Attributes:
        projector: the :class:`~pegp_hf.core.GradientProjector` (``None`` before the first task begins).
        finished_tasks: how many tasks ended.
    """

    def __init__(
        self,
        threshold: float = 0.97,
        feature_batches: int = 16,
        protect: str = ".*",
        update_reprojection: str = "auto",
        max_tokens_per_sequence: int | None = None,
        covariances_on_cpu: bool = False,
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if feature_batches < 1:
            raise ValueError(f"feature_batches must be at least 1, got {feature_batches}")
        self.threshold, self.feature_batches, self.protect = threshold, feature_batches, re.compile(protect)
        self.max_tokens_per_sequence, self.covariances_on_cpu = max_tokens_per_sequence, covariances_on_cpu
        self.projector: GradientProjector | None = None
        self.bracket = UpdateBracket(lambda: self.projector, update_reprojection, project_gradients=True)
        self.finished_tasks = 0

    def on_train_begin(self, args, state, control, model: torch.nn.Module | None = None, **kwargs) -> None:
        if self.projector is None:
            tensors = [t for t in pet_handle(model).protected_tensors() if self.protect.search(t.name)]
            if not tensors:
                raise ValueError(f"no trainable PET tensor matches protect={self.protect.pattern!r}")
            self.projector = GradientProjector(tensors)
        self.bracket.new_task()

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.bracket.on_pre_optimizer_step(args, state, control, **kwargs)

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.bracket.on_optimizer_step(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs) -> None:
        """Add ``pegp_update_overlap`` / ``pegp_update_max`` to the training log line just written to
        ``state.log_history`` (the Trainer's reporting callbacks, which run first, do not see them)."""
        record = self.bracket.take_log_record() if logs is not None and "loss" in logs else None
        if record is not None and state.log_history:
            state.log_history[-1].update(pegp_update_overlap=record[0], pegp_update_max=record[1])

    @torch.no_grad()
    def on_train_end(self, args, state, control, model=None, train_dataloader=None, **kwargs) -> None:
        """Grow the bases from ``feature_batches`` batches of the task just trained."""
        was_training = model.training
        model.eval()
        tensors = self.projector.tensors.values()
        with FeatureCovariances(tensors, self.max_tokens_per_sequence, self.covariances_on_cpu) as capture:
            for index, batch in enumerate(train_dataloader):
                if index == self.feature_batches:
                    break
                inputs = {key: value for key, value in batch.items() if key in MODEL_INPUTS}
                capture.select_tokens(inputs.get("attention_mask"))
                model(**inputs)
        grow_bases_on_every_rank(self.projector, capture.covariances, self.threshold)
        model.train(was_training)
        self.finished_tasks += 1
