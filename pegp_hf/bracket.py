"""The bracket around each optimizer step: what makes the update, not only the gradient, stay off the old
subspaces, and how far it strays (``docs/method.md``, "Optimizers")."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from pegp_hf.core.projector import GradientProjector

logger = logging.getLogger(__name__)


class UpdateBracket(TrainerCallback):
    """Brackets ``optimizer.step()`` (``on_pre_optimizer_step`` / ``on_optimizer_step``): snapshot before; after,
    re-project the update when the optimizer needs it, and keep the largest ``[max |delta W U|, max |delta W|]``
    since the last log line and over the task (on device, no host sync).

    Args:
        projector: the bases and protected tensors; ``projector()`` is read at each step (it may be made later).
        update_reprojection: ``auto`` (off only for plain torch SGD with weight decay 0 on every protected tensor,
            whose update is a combination of projected gradients), ``on`` or ``off``.
        project_gradients: also project the gradients before the step (for a Trainer that does not project them in
            ``training_step``; the clipping before it then saw them unprojected, which leaves the update's
            guarantee intact).
        skipped: ``skipped()`` true means no bracket (DeepSpeed steps inside backward: there is no update to see).
        check_every: measure ``max |delta W U|`` on every ``check_every``-th optimizer step of a task (its first
            included); between them an update that needs no re-projection is not bracketed at all (no snapshot).
    """

    def __init__(
        self,
        projector: Callable[[], GradientProjector | None],
        update_reprojection: str,
        project_gradients: bool = False,
        skipped: Callable[[], bool] = lambda: False,
        check_every: int = 1,
    ) -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {check_every}")
        self.projector, self.update_reprojection = projector, update_reprojection
        self.project_gradients, self.skipped, self.check_every = project_gradients, skipped, check_every
        self.new_task()

    def new_task(self) -> None:
        """Forget the last optimizer's re-projection decision and the records (each task has a fresh optimizer)."""
        self.reproject: bool | None = None
        self.since_log: torch.Tensor | None = None
        self.over_task: torch.Tensor | None = None
        self.steps = 0  # optimizer steps seen in this task
        self._measure = self._bracketed = False

    def _active(self) -> GradientProjector | None:
        projector = self.projector()
        return projector if projector is not None and projector.active and not self.skipped() else None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        projector = self._active()
        self._measure = self.steps % self.check_every == 0
        self.steps += 1
        self._bracketed = projector is not None and (self._measure or self.reprojects(optimizer, projector))
        if projector is not None:
            if self.project_gradients:
                projector.project_gradients()
            if self._bracketed:
                projector.snapshot()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs) -> None:
        projector = self._active()
        if projector is not None and self._bracketed:
            measured = projector.finish_update(self.reprojects(optimizer, projector), measure=self._measure)
            if measured is not None:
                self.since_log = measured if self.since_log is None else torch.maximum(self.since_log, measured)
                self.over_task = measured if self.over_task is None else torch.maximum(self.over_task, measured)

    def take_log_record(self) -> list[float] | None:
        """``[max |delta W U|, max |delta W|]`` since the last call (``None`` if no step was bracketed)."""
        record, self.since_log = self.since_log, None
        return None if record is None else record.tolist()

    def reprojects(self, optimizer: torch.optim.Optimizer, projector: GradientProjector) -> bool:
        """Whether ``W_after - W_before`` must be projected (decided once per task's optimizer)."""
        if self.reproject is None:
            if self.update_reprojection != "auto":
                self.reproject = self.update_reprojection == "on"
            else:
                optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap AcceleratedOptimizer
                protected = {id(t.parameter) for t in projector.tensors.values()}
                decays = any(
                    group.get("weight_decay", 0.0) != 0.0 and any(id(p) in protected for p in group["params"])
                    for group in optimizer.param_groups
                )
                self.reproject = type(optimizer) is not torch.optim.SGD or decays
            logger.info("update re-projection %s", "on" if self.reproject else "off")
        return self.reproject
