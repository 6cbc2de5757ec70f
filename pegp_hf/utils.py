"""Small helpers every layer uses: naming what differs between two sets of tensors, reading safetensors files with
errors that name the file, and the versions a saved file records."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint or adapter folder is missing, unreadable, or does not fit the model / task sequence."""


def key_mismatch(expected: Iterable[str], found: Iterable[str], shown: int = 3) -> str | None:
    """``None`` when both name the same tensors, else ``"missing [...], unexpected [...]"`` (first ``shown`` each)."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if not missing and not unexpected:
        return None

    def listed(names: list[str]) -> str:
        return f"{names[:shown]}{' ...' if len(names) > shown else ''}"

    return f"missing {listed(missing)}, unexpected {listed(unexpected)}"


def state_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, torch.Tensor]) -> str | None:
    """``None`` when ``found`` has exactly the keys of ``expected`` with those shapes, else what differs: the key
    mismatch, or the first key whose shape differs."""
    mismatch = key_mismatch(expected, found)
    if mismatch:
        return mismatch
    for key, tensor in found.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            return f"{key} has shape {tuple(tensor.shape)} but the model's is {tuple(expected[key])}"
    return None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a :class:`CheckpointError` for a missing, truncated or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from error


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a saved file depends on (``"unknown"`` when not installed as a
    package)."""
    found = {}
    for name in ("pegp_hf", "torch", "transformers", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found
