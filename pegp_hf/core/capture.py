"""Feature capture: forward hooks that sum ``x x^T`` over the features each protected tensor multiplies."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pegp_hf.core.protected import ProtectedTensor
from pegp_hf.core.subspace import accumulate_covariance


def token_selection(attention_mask: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """``(B, T)`` bool: the real tokens of each sequence (``attention_mask`` non-zero), at most ``max_tokens`` of them,
    spread evenly over the sequence (its first and last real token included)."""
    real = attention_mask.bool()
    if max_tokens is None:
        return real
    chosen = torch.zeros_like(real)
    for row, mask in enumerate(real):
        positions = mask.nonzero().squeeze(1)
        if len(positions) > max_tokens:
            positions = positions[torch.linspace(0, len(positions) - 1, max_tokens).round().long()]
        chosen[row, positions] = True
    return chosen


class FeatureCovariances:
    """Context manager: while open, every forward pass adds ``x x^T`` (float64, uncentred) to a ``(d, d)`` sum per
    protected tensor, keyed by the tensor's name.

    Every token counts, unless :meth:`select_tokens` was given the batch's attention mask: then features laid out
    ``(B, T, ..., d)`` or ``(B, heads, T, d)`` like the mask's ``(B, T)`` keep only the chosen tokens, so padding never
    reaches a basis (features of another layout, such as a prompt's ``T + L`` rows, keep every row).

    Example::

        with FeatureCovariances(tensors) as capture, torch.no_grad():
            for batch in batches:
                capture.select_tokens(batch["attention_mask"])
                model(**batch)
        covariances = capture.covariances
    """

    def __init__(self, tensors: Iterable[ProtectedTensor], max_tokens_per_sequence: int | None = None) -> None:
        if max_tokens_per_sequence is not None and max_tokens_per_sequence < 1:
            raise ValueError(f"max_tokens_per_sequence must be at least 1, got {max_tokens_per_sequence}")
        self.tensors = list(tensors)
        self.max_tokens_per_sequence = max_tokens_per_sequence
        self.covariances: dict[str, torch.Tensor] = {}
        self._selected: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureCovariances:
        for tensor in self.tensors:
            self._handles.append(tensor.module.register_forward_hook(self._hook_for(tensor)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._selected = None

    def select_tokens(self, attention_mask: torch.Tensor | None) -> None:
        """The next forward passes count only the real tokens of ``attention_mask`` ``(B, T)`` (at most
        ``max_tokens_per_sequence`` per sequence); ``None``: every token."""
        limit = self.max_tokens_per_sequence
        self._selected = None if attention_mask is None else token_selection(attention_mask, limit)

    def _chosen(self, features: torch.Tensor) -> torch.Tensor:
        selected = self._selected
        if selected is None or features.ndim < 3:
            return features
        if features.shape[:2] == selected.shape:  # (B, T, ..., d)
            return features[selected.to(features.device)]
        if features.ndim == 4 and (features.shape[0], features.shape[2]) == selected.shape:  # (B, heads, T, d)
            return features.transpose(1, 2)[selected.to(features.device)]
        return features

    def _hook_for(self, tensor: ProtectedTensor):
        def hook(module, args, output) -> None:
            features = tensor.features(args, output)
            if features.shape[-1] != tensor.feature_dim:
                raise RuntimeError(
                    f"features for {tensor.name} have dim {features.shape[-1]}, the weight expects {tensor.feature_dim}"
                )
            features = self._chosen(features)
            self.covariances[tensor.name] = accumulate_covariance(self.covariances.get(tensor.name), features)

        return hook
