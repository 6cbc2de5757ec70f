"""PEFT LoRA: ``h = W0 x + s B A x``. Protect ``A`` (``(r, d)``, features ``x``) and ``B`` (``(d_out, r)``,
features ``A x``).

Both come from one hook point: PEFT calls ``lora_A[adapter](dropout(x))``, so the input of the ``lora_A`` module is
``x`` (dropout is the identity in eval mode, when features are captured) and its output is ``A x``. Protecting only
one factor guarantees nothing: ``B' A' x = B A x`` needs ``delta A x = 0`` and ``delta B (A x) = 0``.
"""

from __future__ import annotations

from torch import nn

from pegp_hf.tuners.base import ProtectedTensor, module_input, module_output


def lora_protected_tensors(model: nn.Module) -> list[ProtectedTensor]:
    """The ``lora_A`` / ``lora_B`` weights of every PEFT LoRA linear layer of ``model`` that require grad.

    Raises:
        ValueError: for LoRA variants (DoRA, ...), trainable LoRA biases, or non-linear LoRA layers with trainable
            weights, which the PEGP conditions do not cover.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    names = {id(p): n for n, p in model.named_parameters()}
    tensors: list[ProtectedTensor] = []
    for module_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter, lora_a in layer.lora_A.items():
            lora_b = layer.lora_B[adapter]
            if not (lora_a.weight.requires_grad or lora_b.weight.requires_grad):
                continue
            if not isinstance(layer, LoraLinear):
                raise ValueError(
                    f"{module_name} is a {type(layer).__name__} LoRA layer; pegp_hf protects LoRA on nn.Linear only. "
                    "Target linear layers (e.g. q_proj, v_proj) or freeze this adapter."
                )
            if layer.lora_bias.get(adapter, False) and lora_b.bias is not None and lora_b.bias.requires_grad:
                raise ValueError(
                    f"{module_name} has a trainable LoRA bias (lora_bias=True); a bias adds the same vector to every "
                    "input and cannot be protected by gradient projection. Use lora_bias=False."
                )
            if adapter in layer.lora_variant:
                raise ValueError(
                    f"{module_name} uses the LoRA variant {type(layer.lora_variant[adapter]).__name__} (e.g. DoRA), "
                    "whose extra parameters gradient projection cannot protect; use plain LoRA."
                )
            a_name, b_name = names[id(lora_a.weight)], names[id(lora_b.weight)]
            tensors.append(ProtectedTensor(a_name, "lora_A", lora_a, "weight", lora_a, module_input))
            tensors.append(ProtectedTensor(b_name, "lora_B", lora_b, "weight", lora_a, module_output))
    return tensors
