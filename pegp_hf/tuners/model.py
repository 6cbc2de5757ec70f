"""Attach pegp_hf tuners to a model, and save / load them as a PEFT-like folder.

The functional API mirrors PEFT's low-level one (``inject_adapter_in_model``, ``get_peft_model_state_dict``,
``set_peft_model_state_dict``): the model stays the ``transformers`` model it was, with :class:`PETModule` children
and forward hooks added, so ``Trainer``, ``Accelerate`` and the model's own ``forward`` signature work unchanged.

A saved folder holds ``adapter_model.safetensors`` (every tuner weight and the ``modules_to_save`` weights, keyed by
``model.named_parameters()`` names) and ``adapter_config.json`` (``{"library_name": "pegp_hf", "tuners": [...]}``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import nn

from pegp_hf.tuners.base import Attachment, PETConfig, PETModule, device_of
from pegp_hf.tuners.registry import TUNERS
from pegp_hf.utils import CheckpointError, library_versions, read_safetensors, state_mismatch


def pet_configs(model: nn.Module) -> list[PETConfig]:
    """The configs injected into ``model`` so far (empty for a model without pegp_hf tuners)."""
    return list(getattr(model, "pegp_pet_configs", []))


def inject_pet(model: nn.Module, *configs: PETConfig) -> nn.Module:
    """Add the tuners of ``configs`` to ``model`` in place and freeze everything else except ``modules_to_save``.

    Several configs may target different stacks (``layers_pattern``), e.g. prompts in both towers of a CLIP model.
    Every check (blocks found, targets, one tuner of a kind per module, ``modules_to_save``) runs before the model
    changes. Returns ``model``.
    """
    attachments = _plan(model, configs)
    for attachment in attachments:
        setattr(attachment.owner, attachment.attribute, attachment.build().to(device_of(attachment.owner)))
        attachment.install(attachment.owner)
    model.pegp_pet_configs = pet_configs(model) + list(configs)
    trainable = {id(p) for p in _pet_parameters(model).values()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    return model


def _plan(model: nn.Module, configs: tuple[PETConfig, ...] | list[PETConfig]) -> list[Attachment]:
    """The attachments of ``configs``, with every check done and nothing changed."""
    if not configs:
        raise ValueError("inject_pet needs at least one config")
    for config in configs:
        if config.pet_type not in TUNERS or not isinstance(config, TUNERS[config.pet_type].config_class):
            raise TypeError(
                f"{type(config).__name__} is not a registered pegp_hf tuner config ({', '.join(TUNERS)}); register "
                "new tuners with pegp_hf.tuners.register_tuner"
            )
    attachments = [a for config in configs for a in TUNERS[config.pet_type].plan(model, config)]
    if len({(id(a.owner), a.attribute) for a in attachments}) < len(attachments):
        raise ValueError("two configs put a tuner of the same kind on the same module")
    _saved_modules(model, [*pet_configs(model), *configs])
    return attachments


def _saved_modules(model: nn.Module, configs: list[PETConfig]) -> list[str]:
    """Names of the modules that ``modules_to_save`` of ``configs`` select (name or name suffix)."""
    suffixes = [suffix for config in configs for suffix in config.modules_to_save]
    names = [n for n, _ in model.named_modules() if any(n == s or n.endswith(f".{s}") for s in suffixes)]
    missing = [s for s in suffixes if not any(n == s or n.endswith(f".{s}") for n in names)]
    if missing:
        raise ValueError(f"modules_to_save names no module of the model: {missing}")
    return names


def _pet_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Tuner weights and ``modules_to_save`` weights, by their ``named_parameters`` names."""
    owners = _saved_modules(model, pet_configs(model))
    owners += [name for name, module in model.named_modules() if isinstance(module, PETModule)]
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
    mismatch = state_mismatch({name: tuple(p.shape) for name, p in parameters.items()}, state_dict)
    if mismatch:
        raise ValueError(f"the tuner weights do not match the model: {mismatch}")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            parameters[name].copy_(tensor)


def save_pet_pretrained(
    model: nn.Module, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` of ``model``'s tuners to ``directory``: the
    weights of ``state_dict`` (keyed as :func:`get_pet_state_dict`, e.g. gathered from FSDP2 shards) or, when
    ``None``, the model's own."""
    configs = pet_configs(model)
    if not configs:
        raise ValueError("the model has no pegp_hf tuners (inject_pet first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = get_pet_state_dict(model) if state_dict is None else state_dict
    tensors = {name: t.cpu().contiguous() for name, t in state_dict.items()}
    save_file(tensors, str(directory / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    document = {
        "library_name": "pegp_hf",
        "pegp_hf_version": library_versions()["pegp_hf"],
        "base_model_name_or_path": base,
        "tuners": [config.to_dict() for config in configs],
    }
    (directory / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n")


def read_pet_configs(directory: str | os.PathLike) -> list[PETConfig]:
    """The tuner configs of a folder written by :func:`save_pet_pretrained`.

    Raises:
        CheckpointError: a missing or broken ``adapter_config.json``, or a tuner type that is not registered.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        document = json.loads(path.read_text())
        entries = document["tuners"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a pegp_hf adapter config: {error!r}") from error
    configs = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: a tuner entry is {type(entry).__name__}, not a JSON object")
        entry = dict(entry)
        kind = entry.pop("pet_type", None)
        if kind not in TUNERS:
            raise CheckpointError(f"{path}: unknown pet_type {kind!r} (registered: {', '.join(TUNERS)})")
        try:
            configs.append(TUNERS[kind].config_class(**entry))
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: the {kind} tuner config is invalid: {error}") from error
    return configs


def load_pet_pretrained(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Inject the tuners saved in ``directory`` into ``model`` (unless it already has the same ones) and load their
    weights. Every file is read and checked before the model changes. Returns ``model``.

    Raises:
        ValueError: for a missing / broken file, different tuner configs, or weights that do not fit the model.
    """
    configs = read_pet_configs(directory)
    weights = read_safetensors(Path(directory) / SAFETENSORS_WEIGHTS_NAME)
    present = pet_configs(model)
    if present and [c.to_dict() for c in present] != [c.to_dict() for c in configs]:
        raise ValueError(f"the model already has other pegp_hf tuners than those saved in {directory}")
    if not present:
        probe = _shapes_after_injection(model, configs)  # raises for configs that do not fit the model
        mismatch = state_mismatch(probe, weights)
        if mismatch:
            raise ValueError(f"{directory} does not fit this model: {mismatch}")
        inject_pet(model, *configs)
    set_pet_state_dict(model, weights)
    return model


def _shapes_after_injection(model: nn.Module, configs: list[PETConfig]) -> dict[str, tuple[int, ...]]:
    """The weight shapes :func:`get_pet_state_dict` would give after ``inject_pet(model, *configs)``; the tuner
    modules are built on the meta device, and the model is not changed."""
    names = {id(module): name for name, module in model.named_modules()}
    shapes = {}
    with torch.device("meta"):
        for attachment in _plan(model, configs):
            for name, parameter in attachment.build().named_parameters():
                shapes[f"{names[id(attachment.owner)]}.{attachment.attribute}.{name}"] = tuple(parameter.shape)
    for owner in _saved_modules(model, configs):
        for name, parameter in model.get_submodule(owner).named_parameters():
            shapes[f"{owner}.{name}"] = tuple(parameter.shape)
    return shapes
