"""PET methods and the tensors PEGP protects in them.

- PEFT methods (``peft.get_peft_model``): LoRA and IA3 are protected (:mod:`pegp_hf.tuners.peft`); any other PEFT
  method trains without projection;
- pegp_hf's own tuners, attached with :func:`inject_pet`: visual / CoOp prompts (:class:`PromptConfig`), key / value
  prefixes (:class:`PrefixConfig`) and bottleneck adapters (:class:`AdapterConfig`), each in its own module, which
  registers it (:func:`register_tuner`); a new tuner is one more module doing the same.

Each method reports, for every trainable weight it wants protected, a :class:`~pegp_hf.core.ProtectedTensor`: the
parameter and the forward activation whose span is that weight's old feature space. :func:`pet_handle` is how the
trainer sees a model's PET, whichever library made it.
"""

from pegp_hf.core.protected import ProtectedTensor
from pegp_hf.tuners.adapter import AdapterConfig, BottleneckAdapter
from pegp_hf.tuners.base import Attachment, PETConfig, PETModule
from pegp_hf.tuners.factory import PAPER_PARADIGMS, default_width, get_pet_model, parse_layers
from pegp_hf.tuners.handle import PETHandle, find_protected_tensors, pet_handle
from pegp_hf.tuners.model import (
    get_pet_state_dict,
    inject_pet,
    load_pet_pretrained,
    pet_configs,
    read_pet_configs,
    save_pet_pretrained,
    set_pet_state_dict,
)
from pegp_hf.tuners.peft import ia3_protected_tensors, lora_protected_tensors
from pegp_hf.tuners.prefix import MLPPrefix, Prefix, PrefixConfig, init_prefixes_from_activations
from pegp_hf.tuners.prompt import Prompt, PromptConfig
from pegp_hf.tuners.registry import (
    PEFT_METHODS,
    TUNERS,
    PeftMethodSpec,
    TunerSpec,
    available_pets,
    register_peft_method,
    register_tuner,
)

__all__ = [
    "PAPER_PARADIGMS",
    "PEFT_METHODS",
    "TUNERS",
    "AdapterConfig",
    "Attachment",
    "BottleneckAdapter",
    "PETConfig",
    "PETHandle",
    "PETModule",
    "PeftMethodSpec",
    "MLPPrefix",
    "Prefix",
    "PrefixConfig",
    "Prompt",
    "PromptConfig",
    "ProtectedTensor",
    "TunerSpec",
    "available_pets",
    "default_width",
    "find_protected_tensors",
    "get_pet_model",
    "get_pet_state_dict",
    "ia3_protected_tensors",
    "init_prefixes_from_activations",
    "inject_pet",
    "load_pet_pretrained",
    "lora_protected_tensors",
    "parse_layers",
    "pet_configs",
    "pet_handle",
    "read_pet_configs",
    "register_peft_method",
    "register_tuner",
    "save_pet_pretrained",
    "set_pet_state_dict",
]
