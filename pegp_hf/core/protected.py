"""The one interface between PET modules and PEGP: a weight, and where its input features come from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

FeatureFn = Callable[[tuple[Any, ...], Any], torch.Tensor]


@dataclass(frozen=True, eq=False)
class ProtectedTensor:
    """A PET weight ``W`` (``(out, d)``, acting as ``W x``) and the activation that spans its old subspace.

    Attributes:
        name: the parameter's name in ``model.named_parameters()`` (PEFT naming, adapter name included).
        kind: the role of the weight in its PET module (``"lora_A"``, ``"lora_B"``, ...), for reports.
        owner: the module that holds the weight as attribute ``attribute``. The weight is looked up there each time
            (:attr:`parameter`), because wrappers such as FSDP2's ``fully_shard`` replace parameter objects.
        module: where to hook: a forward hook on it sees the features.
        features: ``(args, output) -> (..., d)``: the feature vectors ``W`` multiplies in that forward call.
        transposed: the feature axis is the first one, not the last: a column ``(d, 1)`` such as IA3's output
            scaling. Gradients are projected on ``W.mT``.
        axis_aligned: ``W`` scales each feature coordinate on its own (``h_j = w_j x_j``, IA3), so the condition is
            per coordinate and the basis is made of coordinate axes (:func:`~pegp_hf.core.subspace.grow_axis_basis`),
            not of eigenvectors that mix coordinates.
        image_of: the name of the protected tensor whose weight ``V`` (``(d, d_in)``, no bias) maps its features to
            this tensor's (LoRA ``B``: ``A x``, the image of ``A``'s features ``x``). Sums taken while ``V`` moves
            (:mod:`pegp_hf.training_capture`) are then derived as ``V C V^T`` from that tensor's sums ``C``, with
            ``V`` as the task ends: exact in ``V``. ``None``: the features are captured as they come.
        reference: how a reference set ("task 0", the pre-trained model's own inputs) protects the tensor before the
            first task (:meth:`~pegp_hf.core.projector.GradientProjector.null_reference_weights`): ``"null"``, the input
            side of a branch that is zero when this tensor's output is (LoRA ``A``: ``B A x``; an adapter's
            ``W_down`` with ``act(0) = 0``): its basis grows from the reference features and ``W`` is moved into
            their null space, so the branch outputs nothing on them; ``"grow"``, a tensor that already leaves
            reference outputs unchanged (IA3's ``l = 1``): its basis grows, ``W`` is kept; ``None``: not grown from
            the reference, either because its input is a ``"null"`` tensor's output, which vanishes there (LoRA
            ``B``, adapter ``up``), or because a reference cannot protect it (prompts, prefixes, an adapter whose
            activation is not zero at zero).
    """

    name: str
    kind: str
    owner: nn.Module
    attribute: str
    module: nn.Module
    features: FeatureFn
    transposed: bool = False
    axis_aligned: bool = False
    image_of: str | None = None
    reference: Literal["null", "grow"] | None = None

    @property
    def parameter(self) -> nn.Parameter:
        """The weight as the model holds it now: its gradient is projected on its feature axis (size ``d``)."""
        parameter = self.owner._parameters.get(self.attribute)  # read each step: nn.Module.__getattr__ is slower
        return getattr(self.owner, self.attribute) if parameter is None else parameter

    @property
    def feature_dim(self) -> int:
        return self.parameter.shape[0 if self.transposed else -1]

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the weight, its gradient or an update) as ``(..., d)`` rows: a view, so writes reach it."""
        return tensor.mT if self.transposed else tensor


def module_input(args: tuple[Any, ...], output: Any) -> torch.Tensor:
    """Features = the first positional input of the hooked module."""
    return args[0]


def module_output(args: tuple[Any, ...], output: Any) -> torch.Tensor:
    """Features = the output of the hooked module."""
    return output
