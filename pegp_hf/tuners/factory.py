"""One call for any of the four paradigms with PEGP's defaults, as the recipes and benchmarks choose them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pegp_hf.tuners.adapter import AdapterConfig
from pegp_hf.tuners.discovery import find_block_stacks, select_layers
from pegp_hf.tuners.model import inject_pet
from pegp_hf.tuners.prefix import PrefixConfig
from pegp_hf.tuners.prompt import PromptConfig

PETS = ("lora", "adapter", "prefix", "prompt")
PAPER_WIDTHS = {"lora": 5, "adapter": 5, "prefix": 10, "prompt": 10}  # LoRA rank, adapter width, prefix / prompt length


def get_pet_model(
    model: nn.Module,
    pet: str,
    width: int | None = None,
    layers: list[int] | str | None = None,
    modules_to_save: Sequence[str] = (),
    layers_pattern: str | None = None,
    lora_targets: Sequence[str] = ("q_proj", "v_proj"),
    **options,
) -> nn.Module:
    """``model`` with one PET paradigm on the chosen blocks.

    Args:
        pet: ``"lora"`` (PEFT, returns a ``PeftModel``), ``"adapter"``, ``"prefix"`` or ``"prompt"`` (pegp_hf tuners,
            injected in place).
        width: LoRA rank / adapter width / prefix or prompt length; ``None``: the paper's (5 / 5 / 10 / 10).
        layers: block indices, ``"all"``, or ``None`` for the paper's layers 0-4 of 12 scaled to the depth.
        modules_to_save: trained in full and saved with the adapter (e.g. ``["classifier"]``).
        layers_pattern: regex on block-stack names (e.g. ``"vision_model"``); ``None``: every stack.
        lora_targets: leaf names of the linear layers LoRA adapts in the chosen blocks.
        **options: any other field of the tuner's config (``placement``, ``value_prefix``, ``insert``, ...).
    """
    if pet not in PETS:
        raise ValueError(f"unknown pet {pet!r}: one of {', '.join(PETS)}")
    width = PAPER_WIDTHS[pet] if width is None else width
    common = dict(layers=layers, layers_pattern=layers_pattern, modules_to_save=list(modules_to_save))
    if pet == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [
            f"{stack_name}.{index}.{name}"
            for stack_name, stack in find_block_stacks(model, layers_pattern)
            for index in select_layers(len(stack), layers)
            for name, _ in stack[index].named_modules()
            if name.rsplit(".", 1)[-1] in lora_targets
        ]
        if not targets:
            raise ValueError(f"no linear layer named {list(lora_targets)} in the chosen blocks")
        config = LoraConfig(
            r=width,
            lora_alpha=options.pop("lora_alpha", None) or width,
            target_modules=targets,
            modules_to_save=list(modules_to_save) or None,
            **options,
        )
        return get_peft_model(model, config)
    config_class = {"adapter": AdapterConfig, "prefix": PrefixConfig, "prompt": PromptConfig}[pet]
    size = {"adapter": "width"}.get(pet, "length")
    return inject_pet(model, config_class(**common, **{size: width}, **options))


def parse_layers(text: str) -> list[int] | str | None:
    """``--pet_layers``: ``paper`` -> ``None`` (the tuners' default), ``all``, or ``0,1,2`` -> ``[0, 1, 2]``."""
    if text in ("paper", "all"):
        return None if text == "paper" else "all"
    try:
        return [int(item) for item in text.split(",")]
    except ValueError as error:
        raise ValueError(
            f"--pet_layers must be 'paper', 'all' or comma-separated block indices, got {text!r}"
        ) from error
