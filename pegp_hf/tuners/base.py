"""What every pegp_hf tuner is made of: a config (an ``adapter_config.json`` entry), PET modules that list the
:class:`~pegp_hf.core.ProtectedTensor` objects they hold, and planned attachments (so every check runs before a model
changes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from pegp_hf.core.protected import ProtectedTensor


@dataclass
class PETConfig:
    """What every pegp_hf tuner config holds (a PEFT-like ``adapter_config.json`` entry).

    Attributes:
        layers: block indices to adapt in each stack (negative counts from the end), or ``"all"``; ``None``: PEGP's
            layers 0-4 of 12, scaled to the depth (the first ``round(5 / 12 * depth)``, at least one).
        layers_pattern: a regex searched in the block stacks' names, e.g. ``"vision_model"``; ``None``: every stack.
        modules_to_save: names (or name suffixes) of modules trained and saved in full with the tuner, e.g.
            ``["classifier"]``. Unlike PEFT's, they are trained in place, not copied.
    """

    pet_type: ClassVar[str] = ""
    layers: list[int] | str | None = None
    layers_pattern: str | None = None
    modules_to_save: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"pet_type": self.pet_type, **asdict(self)}


class PETModule(nn.Module):
    """A pegp_hf PET module attached to a model. It lists its PEGP-protected weights and the weights that the
    PEGP conditions cannot cover (trained freely, or frozen after the first task when its config says so)."""

    def protected_tensors(self, name: str) -> list[ProtectedTensor]:
        """The weights to protect, named under ``name`` (this module's name in ``model.named_modules()``); those
        frozen when the trainer starts are left out by :class:`~pegp_hf.tuners.handle.PETHandle`."""
        raise NotImplementedError

    def frozen_after_first_task(self) -> list[nn.Parameter]:
        """Weights to freeze once the first task is finished (none by default)."""
        return []


@dataclass(frozen=True, eq=False)
class Attachment:
    """One tuner module a config adds: ``owner.<attribute> = build()`` (moved to the owner's device), then
    ``install(owner)`` wires it in (hooks, attention implementation). Planning them first lets every check run
    before the model changes, and lets the expected weight shapes be known without building the real weights."""

    owner: nn.Module
    attribute: str
    build: Callable[[], PETModule]
    install: Callable[[nn.Module], None]


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def check_not_adapted(module: nn.Module, attribute: str) -> None:
    """Raise if ``module`` already carries a pegp_hf tuner as ``attribute`` (a second would add a second hook)."""
    if hasattr(module, attribute):
        raise ValueError(f"{type(module).__name__} already has a {attribute}: a block takes one tuner of each kind")
