"""Attach pegp_hf tuners to a model, and save / load them as a PEFT-like folder.

The functional API mirrors PEFT's low-level one (``inject_adapter_in_model``, ``get_peft_model_state_dict``,
``set_peft_model_state_dict``): the model stays the ``transformers`` model it was, with :class:`PETModule` children
and forward hooks added, so ``Trainer``, ``Accelerate`` and the model's own ``forward`` signature work unchanged.

A saved folder holds ``adapter_model.safetensors`` (every tuner weight and the ``modules_to_save`` weights, keyed by
``model.named_parameters()`` names) and ``adapter_config.json`` (``{"library_name": "pegp_hf", "tuners": [...]}``).
"""

from __future__ import annotations

import copy
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pegp_hf._keys import key_mismatch
from pegp_hf.tuners.adapter import AdapterConfig, inject_adapters
from pegp_hf.tuners.base import PETConfig, PETModule
from pegp_hf.tuners.prefix import PrefixConfig, inject_prefixes
from pegp_hf.tuners.prompt import PromptConfig, inject_prompts

TUNERS = {
    PromptConfig.pet_type: (PromptConfig, inject_prompts),
    PrefixConfig.pet_type: (PrefixConfig, inject_prefixes),
    AdapterConfig.pet_type: (AdapterConfig, inject_adapters),
}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def pet_configs(model: nn.Module) -> list[PETConfig]:
    """The configs injected into ``model`` so far (empty for a model without pegp_hf tuners)."""
    return list(getattr(model, "pegp_pet_configs", []))


def inject_pet(model: nn.Module, *configs: PETConfig) -> nn.Module:
    """Add the tuners of ``configs`` to ``model`` in place and freeze everything else except ``modules_to_save``.

    Several configs may target different stacks (``layers_pattern``), e.g. prompts in both towers of a CLIP model.
    Returns ``model``.
    """
    if not configs:
        raise ValueError("inject_pet needs at least one config")
    for config in configs:
        if config.pet_type not in TUNERS:
            raise TypeError(f"{type(config).__name__} is not a pegp_hf tuner config ({', '.join(TUNERS)})")
        TUNERS[config.pet_type][1](model, config)
    model.pegp_pet_configs = pet_configs(model) + list(configs)
    trainable = {id(p) for p in _pet_parameters(model).values()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    return model


def _pet_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Tuner weights and ``modules_to_save`` weights, by their ``named_parameters`` names."""
    suffixes = [suffix for config in pet_configs(model) for suffix in config.modules_to_save]
    owners = [
        prefix
        for prefix, module in model.named_modules()
        if isinstance(module, PETModule) or any(prefix == s or prefix.endswith(f".{s}") for s in suffixes)
    ]
    missing = [s for s in suffixes if not any(o == s or o.endswith(f".{s}") for o in owners)]
    if missing:
        raise ValueError(f"modules_to_save names no module of the model: {missing}")
    return {name: p for name, p in model.named_parameters() if any(name.startswith(f"{o}.") for o in owners)}


def get_pet_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tuner and ``modules_to_save`` weight (frozen ones included), detached."""
    return {name: p.detach() for name, p in _pet_parameters(model).items()}


def set_pet_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy ``state_dict`` into the model's tuner weights. Keys and shapes must match exactly.

    Raises:
        ValueError: naming the missing / unexpected keys or the first shape that differs; nothing is copied then.
    """
    parameters = _pet_parameters(model)
    mismatch = key_mismatch(parameters, state_dict)
    if mismatch:
        raise ValueError(f"the tuner weights do not match the model: {mismatch}")
    for name, tensor in state_dict.items():
        if tensor.shape != parameters[name].shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but the model's is {tuple(parameters[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in state_dict.items():
            parameters[name].copy_(tensor)


def save_pet_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` of ``model``'s tuners to ``directory``."""
    configs = pet_configs(model)
    if not configs:
        raise ValueError("the model has no pegp_hf tuners (inject_pet first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.cpu().contiguous() for name, t in get_pet_state_dict(model).items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    document = {
        "library_name": "pegp_hf",
        "pegp_hf_version": _installed_version(),
        "base_model_name_or_path": base,
        "tuners": [config.to_dict() for config in configs],
    }
    (directory / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n")


def _installed_version() -> str:
    try:
        return version("pegp_hf")
    except PackageNotFoundError:
        return "unknown"


def read_pet_configs(directory: str | os.PathLike) -> list[PETConfig]:
    """The tuner configs of a folder written by :func:`save_pet_pretrained`."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        document = json.loads(path.read_text())
        entries = document["tuners"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a pegp_hf adapter config: {error!r}") from error
    configs = []
    for entry in entries:
        entry = dict(entry)
        kind = entry.pop("pet_type", None)
        if kind not in TUNERS:
            raise ValueError(f"{path}: unknown pet_type {kind!r} (known: {', '.join(TUNERS)})")
        configs.append(TUNERS[kind][0](**entry))
    return configs


def read_pet_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``adapter_model.safetensors`` of ``directory``, with a clear error for a missing or broken file."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error


def load_pet_pretrained(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject the tuners saved in ``directory`` into ``model`` (unless it already has the same ones) and load their
    weights. Every file is read and checked before the model changes. Returns ``model``.

    Raises:
        ValueError: for a missing / broken file, different tuner configs, or weights that do not fit the model.
    """
    configs = read_pet_configs(directory)
    weights = read_pet_weights(directory)
    present = pet_configs(model)
    if present and [c.to_dict() for c in present] != [c.to_dict() for c in configs]:
        raise ValueError(f"the model already has other pegp_hf tuners than those saved in {directory}")
    if not present:
        probe = _shapes_after_injection(model, configs)
        mismatch = key_mismatch(probe, weights)
        wrong = [k for k in weights if k in probe and tuple(weights[k].shape) != probe[k]]
        if mismatch or wrong:
            detail = mismatch or f"{wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, the model's {probe[wrong[0]]}"
            raise ValueError(f"{directory} does not fit this model: {detail}")
        inject_pet(model, *configs)
    set_pet_state_dict(model, weights)
    return model


def _shapes_after_injection(model: nn.Module, configs: list[PETConfig]) -> dict[str, tuple[int, ...]]:
    """The tuner weight shapes ``model`` would have after ``inject_pet(model, *configs)``, on a meta-device copy."""
    with torch.device("meta"):
        probe = copy.deepcopy(model).to("meta")
        inject_pet(probe, *configs)
    return {name: tuple(t.shape) for name, t in get_pet_state_dict(probe).items()}
