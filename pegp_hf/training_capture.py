"""Feature capture during training (``feature_capture="training"``): the ``x x^T`` sums of the protected tensors
taken from the forward passes of a task's last optimizer steps, instead of a separate pass after the task.

The last ``ceil(feature_samples / samples per optimizer step)`` steps of each task are captured, so about
``feature_samples`` training samples count (each process its share; the sums are all-reduced when the bases grow).
No extra forward pass runs; the features are those of the weights of those steps, in training mode (dropout on).
A tensor whose features are the image of another protected tensor's under that tensor's weight (LoRA ``B`` reads
``A x``, :attr:`~pegp_hf.core.protected.ProtectedTensor.image_of`) gets ``A C_x A^T`` with ``A`` as the task ends
instead of the sum of the moving ``A_t x``: its basis then holds the outputs of the ``A`` that later tasks keep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from pegp_hf.core.capture import FeatureCovariances
from pegp_hf.core.protected import ProtectedTensor


class TrainingFeatureCapture(TrainerCallback):
    """Opens a :class:`~pegp_hf.core.capture.FeatureCovariances` at the start of the first captured optimizer step
    of each ``Trainer.train`` (one task) and closes it when training ends; :attr:`covariances` then holds the task's
    sums (``None`` before).

    Args:
        make_capture: a fresh, unopened ``FeatureCovariances`` over the protected tensors.
        samples: how many training samples to capture per task (``feature_samples``), over all processes.
        samples_per_step: training samples per optimizer step over all processes (batch x accumulation x processes).
        tensors: the protected tensors by name, for the sums derived through ``image_of``.
    """

    def __init__(
        self,
        make_capture: Callable[[], FeatureCovariances],
        samples: int,
        samples_per_step: int,
        tensors: Mapping[str, ProtectedTensor] | None = None,
    ) -> None:
        self.make_capture, self.steps = make_capture, max(1, math.ceil(samples / samples_per_step))
        self.tensors = dict(tensors or {})
        self.capture: FeatureCovariances | None = None
        self.covariances: dict[str, torch.Tensor] | None = None
        self._first_step = 0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.capture, self.covariances = None, None
        self._first_step = max(0, state.max_steps - self.steps)

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if self.capture is None and state.global_step >= self._first_step:
            self.capture = self.make_capture().__enter__()

    def select_tokens(self, inputs: dict[str, Any]) -> None:
        """Before a training forward pass: count only the real tokens of its ``attention_mask`` (if any)."""
        if self.capture is not None:
            self.capture.select_tokens(inputs.get("attention_mask"))

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.capture is not None:
            self.covariances = derive_images(self.capture.covariances, self.tensors)
        self.close()

    def close(self) -> None:
        """Remove the hooks (also when training stopped with an error)."""
        if self.capture is not None:
            self.capture.__exit__(None, None, None)
            self.capture = None


def derive_images(
    covariances: dict[str, torch.Tensor], tensors: Mapping[str, ProtectedTensor]
) -> dict[str, torch.Tensor]:
    """``covariances`` with the sum of every tensor that is the image of another (``image_of``) replaced by
    ``V C V^T``: ``V`` that tensor's weight now ``(d, d_in)``, ``C`` its ``(d_in, d_in)`` sum; float64, on ``C``'s
    device. Tensors whose source saw no features keep their own sums."""
    derived = dict(covariances)
    for name, tensor in tensors.items():
        source = tensor.image_of
        if name in covariances and source in covariances:
            weight = tensors[source].parameter.detach()
            weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight  # an FSDP2 shard
            weight = weight.to(covariances[source].device, torch.float64)
            derived[name] = weight @ covariances[source] @ weight.T
    return derived
