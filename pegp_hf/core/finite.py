"""Non-finite values stop a run where they appear, with an error that names the task, the step and the tensors.

A NaN or inf input poisons the loss, then the gradients, the weights, the feature covariances and the figures;
``Trainer`` hides it (``logging_nan_inf_filter`` logs a finite loss) and a checkpoint would store it. The trainer
checks each of them at the point it is made (:class:`~pegp_hf.trainer.ContinualPEGPTrainer`) and
:func:`~pegp_hf.io.checkpoint.write_task_checkpoint` refuses to write a non-finite tensor, so no checkpoint holds
one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

HINT = "check the task's inputs for NaN / inf values, or lower learning_rate (or train in bf16 instead of fp16)"


class NonFiniteError(FloatingPointError):
    """A loss, gradient, weight, feature covariance or figure is NaN or infinite; nothing of the task was saved."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor, True when every element of every tensor (this rank's rows of a ``DTensor``) is finite;
    no host sync until it is read."""
    flags = [torch.isfinite(_local(tensor)).all() for tensor in tensors]
    if not flags:
        return torch.tensor(True)
    return torch.stack([flag.to(flags[0].device) for flag in flags]).all()  # a model spread over devices


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or inf (this rank's rows of a ``DTensor``)."""
    return [name for name, tensor in tensors.items() if not bool(torch.isfinite(_local(tensor)).all())]


def check_tensors(tensors: Mapping[str, torch.Tensor], what: str, where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where``, ``what`` and the first offending tensors, if any is not
    finite."""
    bad = non_finite(tensors)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"{where}: {what} are not finite in {shown}; {HINT}")


def check_figures(figures: Mapping[str, Any], where: str) -> None:
    """Raise :class:`NonFiniteError` if a number in ``figures`` (nested lists and dicts; ``None`` allowed) is NaN or
    inf: a checkpoint's JSON could not hold it."""

    def bad(value: Any) -> bool:
        if isinstance(value, Mapping):
            return any(bad(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return any(bad(v) for v in value)
        return isinstance(value, float) and not math.isfinite(value)

    offending = sorted(name for name, value in figures.items() if bad(value))
    if offending:
        raise NonFiniteError(f"{where}: the evaluation figures {offending} are not finite; {HINT}")
