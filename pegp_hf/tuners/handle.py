"""The PET a model carries, as the continual trainer and its checkpoints see it: PEFT's or pegp_hf's tuners.

:func:`pet_handle` returns a :class:`PETHandle` that lists the protected tensors, and saves, checks and loads the
adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``) with the library that made it: PEFT for a
``PeftModel`` (any PEFT method; LoRA and IA3 can be protected, see :mod:`pegp_hf.tuners.peft`), pegp_hf for
:func:`~pegp_hf.tuners.model.inject_pet` tuners. Nothing outside this module asks which of the two it is.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn

from pegp_hf.core.protected import ProtectedTensor
from pegp_hf.tuners.base import PETModule
from pegp_hf.tuners.model import (
    get_pet_state_dict,
    pet_configs,
    read_pet_configs,
    save_pet_pretrained,
    set_pet_state_dict,
)
from pegp_hf.tuners.peft import peft_protected_tensors
from pegp_hf.tuners.registry import peft_method
from pegp_hf.utils import CheckpointError, read_safetensors, state_mismatch


class PETHandle(ABC):
    """One model's PET: what PEGP protects in it and how its adapter folder is written and read back.

    Attributes:
        model: the model carrying the PET.
        library_name: ``"peft"`` or ``"pegp_hf"``: the library that loads the adapter folder.
    """

    library_name: str

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    @abstractmethod
    def methods(self) -> list[str]:
        """The PET methods, e.g. ``["lora"]`` or ``["prefix", "prompt"]``."""

    def protected_tensors(self, strict: bool = True) -> list[ProtectedTensor]:
        """Every trainable PET weight PEGP protects (frozen ones are left out, whatever the method lists).
        ``strict=False`` returns ``[]`` for a method pegp_hf cannot protect instead of raising (for methods that do
        not project)."""
        return [tensor for tensor in self._protected_tensors(strict) if tensor.parameter.requires_grad]

    @abstractmethod
    def _protected_tensors(self, strict: bool) -> list[ProtectedTensor]:
        """The weights the PET method protects, trainable or not."""

    def frozen_after_first_task(self) -> list[nn.Parameter]:
        """Weights PEGP trains on the first task only (e.g. value prefixes with ``freeze_after_first_task``)."""
        return []

    @abstractmethod
    def state_dict(self, model_state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The adapter weights keyed as in ``adapter_model.safetensors``, taken from ``model_state_dict`` (the
        whole model's, keyed as ``model.state_dict()``: under FSDP2 the gathered one of
        ``Accelerator.get_state_dict``) or, when ``None``, from the model itself (each rank's shards under FSDP2)."""

    @abstractmethod
    def save_pretrained(
        self, directory: str | os.PathLike, model_state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory``, the weights taken as
        :meth:`state_dict` takes them."""

    def read_pretrained(self, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
        """Read ``directory``'s adapter weights and check every key and shape against the model's adapter (PEFT
        would skip unknown keys silently); nothing changes. Load the result with :meth:`load_weights`.

        Raises:
            CheckpointError: a missing / broken file, or weights that do not fit.
        """
        path = Path(directory) / SAFETENSORS_WEIGHTS_NAME
        stored = read_safetensors(path)
        mismatch = state_mismatch({key: tuple(t.shape) for key, t in self.state_dict().items()}, stored)
        if mismatch:
            raise CheckpointError(f"{path} does not match the model's adapter: {mismatch}")
        return stored

    @abstractmethod
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy weights checked by :meth:`read_pretrained` into the model."""

    def weight_key(self, parameter_name: str) -> str:
        """The key of parameter ``parameter_name`` in ``adapter_model.safetensors``."""
        return parameter_name


class PeftHandle(PETHandle):
    """A ``peft.PeftModel``'s active adapter, saved and loaded with PEFT.

    Only the active adapter is trained, saved and restored, whatever its name and whatever other adapters the model
    holds: the adapter folder is what ``PeftModel.from_pretrained(base, folder)`` loads (as ``default``).
    """

    library_name = "peft"

    def __init__(self, model: nn.Module) -> None:
        active = list(getattr(model, "active_adapters", [model.active_adapter]))
        if len(active) != 1:
            raise ValueError(
                f"the PEFT model has {len(active)} active adapters {active}; pegp_hf trains, protects and saves one: "
                "activate it with model.set_adapter(name)"
            )
        super().__init__(model)

    @property
    def adapter_name(self) -> str:
        return self.model.active_adapter

    @property
    def methods(self) -> list[str]:
        peft_type = self.model.peft_config[self.adapter_name].peft_type
        spec = peft_method(peft_type)
        return [spec.name if spec else str(getattr(peft_type, "value", peft_type)).lower()]

    def _protected_tensors(self, strict: bool) -> list[ProtectedTensor]:
        if not strict and peft_method(self.model.peft_config[self.adapter_name].peft_type) is None:
            return []
        return peft_protected_tensors(self.model)

    def state_dict(self, model_state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        state = None if model_state_dict is None else dict(model_state_dict)
        return get_peft_model_state_dict(self.model, state_dict=state, adapter_name=self.adapter_name)

    def save_pretrained(
        self, directory: str | os.PathLike, model_state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """PEFT's ``save_pretrained`` of the active adapter alone, its files at the top of ``directory`` (PEFT puts
        an adapter not named ``default`` in a subfolder of that name)."""
        state = {} if model_state_dict is None else {"state_dict": dict(model_state_dict)}
        self.model.save_pretrained(directory, selected_adapters=[self.adapter_name], **state)
        nested = Path(directory) / self.adapter_name
        if self.adapter_name != "default" and nested.is_dir():
            for path in nested.iterdir():
                os.replace(path, Path(directory) / path.name)
            nested.rmdir()

    def read_pretrained(self, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
        """Also checks that ``directory``'s ``adapter_config.json`` is the active adapter's config (rank, alpha,
        targets, dropout, bias, ``use_rslora``, ...): the same weights under another config give other outputs."""
        path = Path(directory) / CONFIG_NAME
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} is missing or not valid JSON: {error}") from error
        current = self.model.peft_config[self.adapter_name].to_dict()
        inits = (_init_name(stored.get("init_lora_weights")), _init_name(current.get("init_lora_weights")))
        if inits[0] != inits[1] and (inits[0] in BASE_REWRITING_INITS or inits[1] in BASE_REWRITING_INITS):
            raise CheckpointError(
                f"{path}: the adapter was initialised with init_lora_weights={inits[0]!r} and the model's with "
                f"{inits[1]!r}; {'/'.join(BASE_REWRITING_INITS)} also rewrite the base weights, so the stored "
                "adapter only fits a model built with the same initialisation (and the same data)"
            )
        differ = {key: (stored[key], current[key]) for key in sorted(set(stored) & set(current) - _CONFIG_UNCHECKED)
                  if _comparable(stored[key]) != _comparable(current[key])}  # fmt: skip
        if differ:
            listed = ", ".join(f"{key}={old!r} (the model's: {new!r})" for key, (old, new) in differ.items())
            raise CheckpointError(
                f"{path}: the adapter was trained with {listed}; build the model's adapter from this config "
                f"(peft.PeftConfig.from_pretrained('{directory}')) to continue the run"
            )
        return super().read_pretrained(directory)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, weights, adapter_name=self.adapter_name)

    def weight_key(self, parameter_name: str) -> str:
        """PEFT's naming without the adapter name: ``...lora_A.<adapter>.weight`` -> ``...lora_A.weight``, and
        ``...ia3_l.<adapter>`` -> ``...ia3_l``."""
        name = re.escape(self.adapter_name)
        return re.sub(rf"\.{name}(\.[^.]+)?$", lambda m: m.group(1) or "", parameter_name)


class TunerHandle(PETHandle):
    """pegp_hf tuners (:func:`~pegp_hf.tuners.model.inject_pet`), saved and loaded with pegp_hf."""

    library_name = "pegp_hf"

    @property
    def methods(self) -> list[str]:
        return sorted({config.pet_type for config in pet_configs(self.model)})

    def _modules(self) -> list[tuple[str, PETModule]]:
        return [(name, module) for name, module in self.model.named_modules() if isinstance(module, PETModule)]

    def _protected_tensors(self, strict: bool) -> list[ProtectedTensor]:
        return [tensor for name, module in self._modules() for tensor in module.protected_tensors(name)]

    def frozen_after_first_task(self) -> list[nn.Parameter]:
        return [p for _, module in self._modules() for p in module.frozen_after_first_task()]

    def state_dict(self, model_state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        own = get_pet_state_dict(self.model)
        return own if model_state_dict is None else {name: model_state_dict[name] for name in own}

    def save_pretrained(
        self, directory: str | os.PathLike, model_state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        save_pet_pretrained(self.model, directory, self.state_dict(model_state_dict))

    def read_pretrained(self, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
        """Also checks that ``directory`` holds the model's tuner configs."""
        stored = [config.to_dict() for config in read_pet_configs(directory)]
        current = [config.to_dict() for config in pet_configs(self.model)]
        if stored != current:
            raise CheckpointError(f"{directory} holds tuners {stored}, the model has {current}")
        return super().read_pretrained(directory)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        set_pet_state_dict(self.model, weights)


# settings of the saved config that do not change what the weights compute
# PEFT initialisations that also rewrite the base layer's weight (W -> W - scale B0 A0): their adapters only fit a
# base model prepared the same way
BASE_REWRITING_INITS = ("corda", "pissa", "olora")


def _init_name(value: object) -> str:
    """``init_lora_weights`` by family: ``pissa_niter_16`` -> ``pissa``; booleans and ``gaussian`` as they are."""
    text = str(value)
    return next((name for name in BASE_REWRITING_INITS if text.startswith(name)), text)


_CONFIG_UNCHECKED = {"auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
                     "init_lora_weights"}  # fmt: skip


def _comparable(value: object) -> object:
    """A config value as JSON holds it, order-free where PEFT keeps a set (``target_modules``)."""
    if isinstance(value, (set, list, tuple)):
        return sorted((_comparable(item) for item in value), key=repr)
    if isinstance(value, dict):
        return {key: _comparable(item) for key, item in value.items()}
    return getattr(value, "value", value)  # enums (peft_type, task_type) as their JSON strings


def pet_handle(model: nn.Module) -> PETHandle:
    """The :class:`PETHandle` of ``model``.

    Raises:
        TypeError: the model carries no PET, or both a PEFT adapter and pegp_hf tuners (one checkpoint format
            could not hold both).
    """
    from peft import PeftModel

    is_peft, has_tuners = isinstance(model, PeftModel), bool(pet_configs(model))
    if is_peft and has_tuners:
        raise TypeError("the model carries a PEFT adapter and pegp_hf tuners; pegp_hf trains and saves one kind")
    if is_peft:
        return PeftHandle(model)
    if has_tuners:
        return TunerHandle(model)
    raise TypeError(
        "model must carry a PET adapter: a PEFT model (peft.get_peft_model(model, LoraConfig(...))) or a model with "
        "pegp_hf tuners (pegp_hf.tuners.inject_pet(model, PromptConfig(...)))"
    )


def find_protected_tensors(model: nn.Module) -> list[ProtectedTensor]:
    """Every protectable PET tensor of ``model`` (PEFT LoRA / IA3 weights, or the weights of pegp_hf tuners)."""
    return pet_handle(model).protected_tensors()
