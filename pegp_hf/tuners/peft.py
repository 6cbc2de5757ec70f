"""PEFT methods pegp_hf protects, each registered with the tensors it trains and the features they multiply.

**LoRA** (``h = W0 x + s B A x``): protect ``A`` (``(r, d)``, features ``x``) and ``B`` (``(d_out, r)``, features
``A x``). Both come from one hook point: PEFT calls ``lora_A[adapter](dropout(x))``, so the input of the ``lora_A``
module is ``x`` (dropout is the identity in eval mode, when features are captured) and its output is ``A x``.
Protecting only one factor guarantees nothing: ``B' A' x = B A x`` needs ``delta A x = 0`` and ``delta B (A x) = 0``.

**IA3** (``h = l * (W0 x)``, or ``h = W0 (l * x)`` on feed-forward layers): the scaling vector ``l`` multiplies each
coordinate of its features (``W0 x`` or ``x``) on its own, so old outputs stay when ``delta l_j = 0`` on every
coordinate old features use. The basis is made of coordinate axes, grown by the same energy rule
(:func:`~pegp_hf.core.subspace.grow_axis_basis`); the coordinates left free carry at most ``1 - eps`` of the energy.

Other PEFT methods train with ``method="sequential"`` / ``"head_only"`` like any PEFT model; ``method="pegp"`` on
them is refused with the list of registered methods.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pegp_hf.core.protected import ProtectedTensor, module_input, module_output
from pegp_hf.tuners.registry import PEFT_METHODS, PeftMethodSpec, peft_method, register_peft_method


def _parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def lora_protected_tensors(model: nn.Module, adapter_name: str = "default") -> list[ProtectedTensor]:
    """The ``lora_A`` / ``lora_B`` weights of adapter ``adapter_name`` on every PEFT LoRA linear layer of ``model``
    that require grad.

    Raises:
        ValueError: for LoRA variants (DoRA, ...), trainable LoRA biases, or non-linear LoRA layers with trainable
            weights, which the PEGP conditions do not cover.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    names = _parameter_names(model)
    tensors: list[ProtectedTensor] = []
    for module_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        if not (lora_a.weight.requires_grad or lora_b.weight.requires_grad):
            continue
        if not isinstance(layer, LoraLinear):
            raise ValueError(
                f"{module_name} is a {type(layer).__name__} LoRA layer; pegp_hf protects LoRA on nn.Linear only. "
                "Target linear layers (e.g. q_proj, v_proj) or freeze this adapter."
            )
        if layer.lora_bias.get(adapter_name, False) and lora_b.bias is not None and lora_b.bias.requires_grad:
            raise ValueError(
                f"{module_name} has a trainable LoRA bias (lora_bias=True); a bias adds the same vector to every "
                "input and cannot be protected by gradient projection. Use lora_bias=False."
            )
        if adapter_name in layer.lora_variant:
            raise ValueError(
                f"{module_name} uses the LoRA variant {type(layer.lora_variant[adapter_name]).__name__} (e.g. DoRA), "
                "whose extra parameters gradient projection cannot protect; use plain LoRA."
            )
        a_name, b_name = names[id(lora_a.weight)], names[id(lora_b.weight)]
        tensors.append(ProtectedTensor(a_name, "lora_A", lora_a, "weight", lora_a, module_input,
                                       reference="null"))  # fmt: skip
        tensors.append(ProtectedTensor(b_name, "lora_B", lora_b, "weight", lora_a, module_output, image_of=a_name))
    return tensors


def ia3_protected_tensors(model: nn.Module, adapter_name: str = "default") -> list[ProtectedTensor]:
    """The ``ia3_l`` scaling vectors of adapter ``adapter_name`` that require grad: ``(1, d_in)`` against the layer
    input on feed-forward layers, ``(d_out, 1)`` against the base layer's output elsewhere (feature axis first).

    Raises:
        ValueError: for IA3 on a layer that is not ``nn.Linear``.
    """
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.ia3.layer import Linear as IA3Linear

    names = _parameter_names(model)
    tensors = []
    for module_name, layer in model.named_modules():
        if not isinstance(layer, IA3Layer) or adapter_name not in layer.ia3_l:
            continue
        scaling = layer.ia3_l[adapter_name]
        if not scaling.requires_grad:
            continue
        if not isinstance(layer, IA3Linear):
            raise ValueError(f"{module_name} is a {type(layer).__name__} IA3 layer; pegp_hf protects IA3 on nn.Linear")
        owner = layer.ia3_l
        if layer.is_feedforward:  # W0 (l * x): l scales the layer input
            tensor = ProtectedTensor(names[id(scaling)], "ia3_input", owner, adapter_name, layer, module_input,
                                     axis_aligned=True, reference="grow")  # fmt: skip
        else:  # l * (W0 x): l scales the base layer's output
            tensor = ProtectedTensor(names[id(scaling)], "ia3_output", owner, adapter_name, layer.base_layer,
                                     module_output, transposed=True, axis_aligned=True, reference="grow")  # fmt: skip
        tensors.append(tensor)
    return tensors


def peft_protected_tensors(model: nn.Module) -> list[ProtectedTensor]:
    """The protected tensors of a ``PeftModel``'s active adapter, by its registered PEFT method.

    Raises:
        ValueError: the adapter's PEFT method is not registered (naming the ones that are).
    """
    adapter = model.active_adapter
    peft_type = model.peft_config[adapter].peft_type
    spec = peft_method(peft_type)
    if spec is None:
        raise ValueError(
            f"pegp_hf does not know which features PEFT's {getattr(peft_type, 'value', peft_type)} adapter "
            f"multiplies, so it cannot protect it; registered PEFT methods: {', '.join(PEFT_METHODS)}. Train it "
            "with method='sequential', or register it with pegp_hf.tuners.register_peft_method"
        )
    return spec.protected_tensors(model, adapter)


def _build_lora(
    model: nn.Module, target_modules: Sequence[str], width: int | None, modules_to_save: Sequence[str], **options
) -> nn.Module:
    """LoRA through PEFT. ``init_lora_weights="corda"`` (PEFT's CorDA, with ``corda_config``) also needs
    ``corda_run_model``: a callable that runs the data whose knowledge the adapter must spare through ``model``
    (PEFT's ``preprocess_corda`` hooks the target layers while it runs)."""
    from peft import LoraConfig, get_peft_model

    run_model = options.pop("corda_run_model", None)
    config = LoraConfig(
        r=width,
        lora_alpha=options.pop("lora_alpha", None) or width,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        **options,
    )
    if config.init_lora_weights == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        if run_model is None:
            raise ValueError("init_lora_weights='corda' needs corda_run_model: a callable that runs the data to spare "
                             "through the model")  # fmt: skip
        preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config)


def _build_ia3(
    model: nn.Module, target_modules: Sequence[str], width: int | None, modules_to_save: Sequence[str], **options
) -> nn.Module:
    from peft import IA3Config, get_peft_model

    if width is not None:
        raise ValueError("IA3 learns one scaling vector per layer: it has no width")
    config = IA3Config(
        target_modules=list(target_modules),
        feedforward_modules=options.pop("feedforward_modules", None) or [],
        modules_to_save=list(modules_to_save) or None,
        **options,
    )
    return get_peft_model(model, config)


register_peft_method(PeftMethodSpec("lora", "LORA", lora_protected_tensors, _build_lora, default_size=5))
register_peft_method(PeftMethodSpec("ia3", "IA3", ia3_protected_tensors, _build_ia3))
