"""PET modules and the tensors PEGP protects in them.

- PEFT LoRA (``peft.get_peft_model``): :mod:`pegp_hf.tuners.lora`;
- pegp_hf's own tuners, attached with :func:`inject_pet`: visual / CoOp prompts (:class:`PromptConfig`), key / value
  prefixes (:class:`PrefixConfig`) and bottleneck adapters (:class:`AdapterConfig`).

Each reports, for every trainable weight it wants protected, a :class:`ProtectedTensor`: the parameter and the
forward activation whose span is that weight's old feature space. Feature capture and projection are generic over
this one interface.
"""

from __future__ import annotations

from torch import nn

from pegp_hf.tuners.adapter import AdapterConfig, BottleneckAdapter
from pegp_hf.tuners.base import PETConfig, PETModule, ProtectedTensor
from pegp_hf.tuners.factory import PAPER_WIDTHS, PETS, get_pet_model, parse_layers
from pegp_hf.tuners.lora import lora_protected_tensors
from pegp_hf.tuners.model import (
    get_pet_state_dict,
    inject_pet,
    load_pet_pretrained,
    pet_configs,
    read_pet_configs,
    save_pet_pretrained,
    set_pet_state_dict,
)
from pegp_hf.tuners.prefix import Prefix, PrefixConfig
from pegp_hf.tuners.prompt import Prompt, PromptConfig

__all__ = [
    "PAPER_WIDTHS",
    "PETS",
    "AdapterConfig",
    "BottleneckAdapter",
    "PETConfig",
    "PETModule",
    "Prefix",
    "PrefixConfig",
    "Prompt",
    "PromptConfig",
    "ProtectedTensor",
    "find_protected_tensors",
    "frozen_after_first_task",
    "get_pet_model",
    "get_pet_state_dict",
    "inject_pet",
    "load_pet_pretrained",
    "lora_protected_tensors",
    "parse_layers",
    "pet_configs",
    "read_pet_configs",
    "save_pet_pretrained",
    "set_pet_state_dict",
]


def find_protected_tensors(model: nn.Module) -> list[ProtectedTensor]:
    """Every protectable PET tensor of ``model``: PEFT LoRA factors and the weights of pegp_hf tuners."""
    tensors = lora_protected_tensors(model)
    for name, module in model.named_modules():
        if isinstance(module, PETModule):
            tensors.extend(module.protected_tensors(name))
    return tensors


def frozen_after_first_task(model: nn.Module) -> list[nn.Parameter]:
    """Tuner weights that PEGP trains on the first task only (e.g. value prefixes with ``freeze_after_first_task``)."""
    return [p for module in model.modules() if isinstance(module, PETModule) for p in module.frozen_after_first_task()]
