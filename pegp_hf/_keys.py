"""Naming what differs between two sets of tensor names, for error messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


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
