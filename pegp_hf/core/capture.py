"""Feature capture: forward hooks that sum ``x x^T`` over the features each protected tensor multiplies."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pegp_hf.core.protected import ProtectedTensor
from pegp_hf.core.subspace import accumulate_covariance


class FeatureCovariances:
    """Context manager: while open, every forward pass adds ``x x^T`` (float64, uncentred, every token) to a
    ``(d, d)`` sum per protected tensor, keyed by the tensor's name.

    Example::

        with FeatureCovariances(tensors) as capture, torch.no_grad():
            for batch in batches:
                model(**batch)
        covariances = capture.covariances
    """

    def __init__(self, tensors: Iterable[ProtectedTensor]) -> None:
        self.tensors = list(tensors)
        self.covariances: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureCovariances:
        for tensor in self.tensors:
            self._handles.append(tensor.module.register_forward_hook(self._hook_for(tensor)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook_for(self, tensor: ProtectedTensor):
        def hook(module, args, output) -> None:
            features = tensor.features(args, output)
            if features.shape[-1] != tensor.feature_dim:
                raise RuntimeError(
                    f"features for {tensor.name} have dim {features.shape[-1]}, the weight expects {tensor.feature_dim}"
                )
            self.covariances[tensor.name] = accumulate_covariance(self.covariances.get(tensor.name), features)

        return hook
