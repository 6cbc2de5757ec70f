"""One call for any registered PET method with its default size (the paper's), as the recipes and benchmarks choose
them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from pegp_hf.tuners.discovery import find_block_stacks, query_value_names, select_layers
from pegp_hf.tuners.model import inject_pet
from pegp_hf.tuners.registry import PEFT_METHODS, TUNERS, available_pets

PAPER_PARADIGMS = ("lora", "adapter", "prefix", "prompt")  # the four PET paradigms of the PEGP paper


def default_width(pet: str) -> int | None:
    """The size ``get_pet_model`` uses when ``width`` is ``None``: LoRA rank 5, adapter width 5, prefix and prompt
    length 10 (the paper's); ``None`` for a method without a size."""
    if pet in PEFT_METHODS:
        return PEFT_METHODS[pet].default_size
    if pet in TUNERS:
        return TUNERS[pet].default_size
    raise ValueError(f"unknown pet {pet!r}: one of {', '.join(available_pets())}")


def get_pet_model(
    model: nn.Module,
    pet: str,
    width: int | None = None,
    layers: list[int] | str | None = None,
    modules_to_save: Sequence[str] = (),
    layers_pattern: str | None = None,
    target_modules: Sequence[str] | None = ("q_proj", "v_proj"),
    **options: Any,
) -> nn.Module:
    """``model`` with one registered PET method on the chosen blocks.

    Args:
        pet: a PEFT method (``"lora"``, ``"ia3"``: returns a ``PeftModel``) or a pegp_hf tuner (``"adapter"``,
            ``"prefix"``, ``"prompt"``, or any registered one: injected in place); see
            :func:`~pegp_hf.tuners.registry.available_pets`.
        width: LoRA rank / adapter width / prefix or prompt length; ``None``: :func:`default_width`.
        layers: block indices, ``"all"``, or ``None`` for the paper's layers 0-4 of 12 scaled to the depth.
        modules_to_save: trained in full and saved with the adapter (e.g. ``["classifier"]``).
        layers_pattern: regex on block-stack names (e.g. ``"vision_model"``); ``None``: every stack.
        target_modules: leaf names of the linear layers a PEFT method adapts in the chosen blocks; ``None``: each
            block's query and value projections found by structure (``q_proj`` / ``v_proj``, ``query`` / ``value``,
            or GPT-2's fused ``c_attn``).
        **options: any other field of the method's config (``placement``, ``value_prefix``, ``lora_alpha``, ...).
    """
    width = default_width(pet) if width is None else width
    if pet in PEFT_METHODS:
        targets = [
            f"{stack_name}.{index}.{name}"
            for stack_name, stack in find_block_stacks(model, layers_pattern)
            for index in select_layers(len(stack), layers)
            for name in (
                query_value_names(stack[index])
                if target_modules is None
                else [n for n, _ in stack[index].named_modules() if n.rsplit(".", 1)[-1] in target_modules]
            )
        ]
        if not targets:
            raise ValueError(f"no linear layer named {list(target_modules)} in the chosen blocks")
        return PEFT_METHODS[pet].build(model, targets, width, modules_to_save, **options)
    spec = TUNERS[pet]
    if spec.size_field is None and width is not None:
        raise ValueError(f"the {pet} tuner has no size: leave width out")
    sizes = {} if spec.size_field is None else {spec.size_field: width}
    common = dict(layers=layers, layers_pattern=layers_pattern, modules_to_save=list(modules_to_save))
    return inject_pet(model, spec.config_class(**common, **sizes, **options))


def parse_layers(text: str) -> list[int] | str | None:
    """``--pet_layers``: ``paper`` -> ``None`` (the tuners' default), ``all``, ``last:8`` -> ``[-8, ..., -1]`` (the
    top 8 blocks), or ``0,1,2`` -> ``[0, 1, 2]``."""
    if text in ("paper", "all"):
        return None if text == "paper" else "all"
    try:
        if text.startswith("last:"):
            count = int(text.removeprefix("last:"))
            if count < 1:
                raise ValueError(text)
            return list(range(-count, 0))
        return [int(item) for item in text.split(",")]
    except ValueError as error:
        raise ValueError(
            f"--pet_layers must be 'paper', 'all', 'last:N' or comma-separated block indices, got {text!r}"
        ) from error
