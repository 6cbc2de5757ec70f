"""Where PET methods register themselves, so that nothing else keeps a list of them.

- pegp_hf's own tuners (prompt, prefix, bottleneck adapter, and any a user adds) call :func:`register_tuner` in their
  own file: the config class (its ``pet_type`` names it in ``adapter_config.json``), the function that plans its
  modules on a model, and the config field ``get_pet_model``'s ``width`` sets. The modules list the tensors PEGP
  protects and the features each multiplies (:meth:`~pegp_hf.tuners.base.PETModule.protected_tensors`).
- PEFT methods call :func:`register_peft_method` (in :mod:`pegp_hf.tuners.peft`): the ``PeftType`` they handle, the
  function that lists their protected tensors on a ``PeftModel``, and, for ``get_pet_model``, how to build them.

:func:`~pegp_hf.tuners.model.inject_pet`, :func:`~pegp_hf.tuners.model.read_pet_configs`,
:func:`~pegp_hf.tuners.factory.get_pet_model`, the trainer, the recipes and the benchmarks read these two tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from pegp_hf.core.protected import ProtectedTensor

if TYPE_CHECKING:
    from pegp_hf.tuners.base import Attachment, PETConfig


@dataclass(frozen=True)
class TunerSpec:
    """A registered pegp_hf tuner.

    Attributes:
        config_class: its :class:`~pegp_hf.tuners.base.PETConfig` subclass; ``config_class.pet_type`` is its name.
        plan: ``(model, config) -> [Attachment]``: the modules it would add, with every check done and the model
            unchanged.
        size_field: the config field that ``get_pet_model(..., width=n)`` sets (``"width"``, ``"length"``), or
            ``None`` when the tuner has no size.
    """

    config_class: type[PETConfig]
    plan: Callable[[nn.Module, PETConfig], list[Attachment]]
    size_field: str | None = None

    @property
    def pet_type(self) -> str:
        return self.config_class.pet_type

    @property
    def default_size(self) -> int | None:
        """The config's default size (pegp_hf's defaults are the paper's)."""
        fields = {f.name: f for f in dataclasses.fields(self.config_class)}
        return None if self.size_field is None else fields[self.size_field].default


@dataclass(frozen=True)
class PeftMethodSpec:
    """A PEFT method pegp_hf can protect.

    Attributes:
        name: its short name for ``get_pet_model`` and the recipes (``"lora"``, ``"ia3"``).
        peft_type: the ``peft.PeftType`` value of its configs (``"LORA"``, ``"IA3"``).
        protected_tensors: ``(peft_model, adapter_name) -> [ProtectedTensor]`` for that adapter's trainable weights;
            raises ``ValueError`` for variants the PEGP conditions do not cover.
        build: ``(model, target_modules, width, modules_to_save, **options) -> PeftModel`` for ``get_pet_model``:
            ``target_modules`` are full module names, ``width`` the method's size (``None``: its default).
        default_size: the ``width`` used when none is given (``None`` for methods without one).
    """

    name: str
    peft_type: str
    protected_tensors: Callable[[nn.Module, str], list[ProtectedTensor]]
    build: Callable[..., nn.Module]
    default_size: int | None = None


TUNERS: dict[str, TunerSpec] = {}
PEFT_METHODS: dict[str, PeftMethodSpec] = {}


def register_tuner(
    config_class: type[PETConfig], plan: Callable[..., list[Attachment]], size_field: str | None
) -> None:
    """Register a pegp_hf tuner under ``config_class.pet_type`` (call it once, in the tuner's own module).

    Raises:
        ValueError: an empty or taken ``pet_type`` (taken by a PEFT method's name too), or a ``size_field`` that is
            not a field of the config.
    """
    pet_type = config_class.pet_type
    if not pet_type:
        raise ValueError(f"{config_class.__name__} has no pet_type: set the class attribute pet_type = '<name>'")
    if pet_type in TUNERS or pet_type in PEFT_METHODS:
        raise ValueError(f"a PET method named {pet_type!r} is already registered")
    if size_field is not None and size_field not in {f.name for f in dataclasses.fields(config_class)}:
        raise ValueError(f"{config_class.__name__} has no field {size_field!r} (size_field)")
    TUNERS[pet_type] = TunerSpec(config_class, plan, size_field)


def register_peft_method(spec: PeftMethodSpec) -> None:
    """Register how pegp_hf protects (and ``get_pet_model`` builds) one PEFT method."""
    if spec.name in TUNERS or spec.name in PEFT_METHODS:
        raise ValueError(f"a PET method named {spec.name!r} is already registered")
    PEFT_METHODS[spec.name] = spec


def peft_method(peft_type: Any) -> PeftMethodSpec | None:
    """The registered PEFT method for a ``PeftType`` (or its string value), or ``None``."""
    value = getattr(peft_type, "value", peft_type)
    return next((spec for spec in PEFT_METHODS.values() if spec.peft_type == value), None)


def available_pets() -> tuple[str, ...]:
    """Every registered PET method: PEFT methods first, then pegp_hf tuners, in registration order."""
    return (*PEFT_METHODS, *TUNERS)
