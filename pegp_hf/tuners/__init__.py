"""PET modules and the tensors PEGP protects in them.

Each tuner reports, for every trainable weight it wants protected, a :class:`ProtectedTensor`: the parameter and the
forward activation whose span is that weight's old feature space. Feature capture and projection are generic over
this one interface.
"""

from pegp_hf.tuners.base import ProtectedTensor
from pegp_hf.tuners.lora import lora_protected_tensors

__all__ = ["ProtectedTensor", "lora_protected_tensors", "find_protected_tensors"]


def find_protected_tensors(model) -> list[ProtectedTensor]:
    """Every protectable PET tensor of ``model`` (today: PEFT LoRA on linear layers)."""
    return lora_protected_tensors(model)
