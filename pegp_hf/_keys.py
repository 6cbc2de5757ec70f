"""Naming what differs between two sets of tensor names, for error messages."""

from __future__ import annotations

from collections.abc import Iterable


def key_mismatch(expected: Iterable[str], found: Iterable[str], shown: int = 3) -> str | None:
    """``None`` when both name the same tensors, else ``"missing [...], unexpected [...]"`` (first ``shown`` each)."""
    expected, found = set(expected), set(found)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if not missing and not unexpected:
        return None

    def listed(names: list[str]) -> str:
        return f"{names[:shown]}{' ...' if len(names) > shown else ''}"

    return f"missing {listed(missing)}, unexpected {listed(unexpected)}"
