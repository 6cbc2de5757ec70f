"""Feature capture: forward hooks that sum ``x x^T`` over the features each protected tensor multiplies."""

from __future__ import annotations

from collections import Counter, deque
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

    Tensors that multiply the very same input (LoRA A of ``q_proj`` and ``v_proj`` read one hidden-state tensor)
    share one sum: it is accumulated once, and :attr:`covariances` maps both names to it. With ``on_cpu``, each
    batch's ``x x^T`` is computed in float32 where the features are and added to a float64 sum kept on the CPU, so a
    large model's ``d x d`` sums need no accelerator memory.

    Example::

        with FeatureCovariances(tensors) as capture, torch.no_grad():
            for batch in batches:
                capture.select_tokens(batch["attention_mask"])
                model(**batch)
        covariances = capture.covariances
    """

    def __init__(
        self, tensors: Iterable[ProtectedTensor], max_tokens_per_sequence: int | None = None, on_cpu: bool = False
    ) -> None:
        if max_tokens_per_sequence is not None and max_tokens_per_sequence < 1:
            raise ValueError(f"max_tokens_per_sequence must be at least 1, got {max_tokens_per_sequence}")
        self.tensors = list(tensors)
        self.max_tokens_per_sequence, self.on_cpu = max_tokens_per_sequence, on_cpu
        # calls of each tensor's module while open (twice for a module run twice in one forward), kept across reopens
        self.passes: Counter[str] = Counter()
        self._sums: dict[str, torch.Tensor] = {}
        self._shares: dict[str, str] = {}  # tensor name -> the name whose sum it shares (itself when it owns one)
        self._recent: deque[tuple[torch.Tensor, str]] = deque(maxlen=4)  # kept alive, to compare inputs by identity
        self._selected: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def covariances(self) -> dict[str, torch.Tensor]:
        """The ``(d, d)`` float64 sum of every tensor that saw features (shared sums appear under each name)."""
        return {name: self._sums[owner] for name, owner in self._shares.items()}

    @property
    def stored_bytes(self) -> int:
        """Bytes of the distinct sums held."""
        return sum(t.numel() * t.element_size() for t in self._sums.values())

    def __enter__(self) -> FeatureCovariances:
        for tensor in self.tensors:
            self._handles.append(tensor.module.register_forward_hook(self._hook_for(tensor)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._selected = None
        self._recent.clear()

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

    def _add(self, name: str, features: torch.Tensor) -> None:
        if not self.on_cpu:
            self._sums[name] = accumulate_covariance(self._sums.get(name), features)
            return
        flat = features.detach().reshape(-1, features.shape[-1]).float()
        batch = (flat.T @ flat).to("cpu", torch.float64)
        self._sums[name] = batch if name not in self._sums else self._sums[name].add_(batch)

    def _hook_for(self, tensor: ProtectedTensor):
        def hook(module, args, output) -> None:
            self.passes[tensor.name] += 1
            features = tensor.features(args, output)
            if features.shape[-1] != tensor.feature_dim:
                raise RuntimeError(
                    f"features for {tensor.name} have dim {features.shape[-1]}, the weight expects {tensor.feature_dim}"
                )
            owner = next((name for seen, name in self._recent if seen is features), None)
            if self._shares.setdefault(tensor.name, owner or tensor.name) != (owner or tensor.name):
                raise RuntimeError(f"{tensor.name} shared its input with another tensor in one pass and not in another")
            if owner is None:
                self._add(tensor.name, self._chosen(features))
                self._recent.append((features, tensor.name))

        return hook
