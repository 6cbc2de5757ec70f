"""The method itself, on tensors and modules, free of the Trainer, of the tuners and of any file format.

- :mod:`~pegp_hf.core.subspace`: covariances, GPM basis growth, projection (pure tensor math);
- :mod:`~pegp_hf.core.protected`: :class:`ProtectedTensor`, a PET weight and the features it multiplies;
- :mod:`~pegp_hf.core.capture`: :class:`FeatureCovariances`, forward hooks summing ``x x^T`` per protected tensor;
- :mod:`~pegp_hf.core.projector`: :class:`GradientProjector`, the bases of a model and the per-step projections;
- :mod:`~pegp_hf.core.finite`: :class:`NonFiniteError` and the NaN / inf checks of losses, tensors and figures.
"""

from pegp_hf.core.capture import FeatureCovariances
from pegp_hf.core.finite import NonFiniteError
from pegp_hf.core.projector import GradientProjector
from pegp_hf.core.protected import FeatureFn, ProtectedTensor, module_input, module_output
from pegp_hf.core.subspace import (
    accumulate_covariance,
    empty_basis,
    grow_axis_basis,
    grow_basis,
    max_overlap,
    project_out,
)

__all__ = [
    "FeatureCovariances",
    "FeatureFn",
    "GradientProjector",
    "NonFiniteError",
    "ProtectedTensor",
    "accumulate_covariance",
    "empty_basis",
    "grow_axis_basis",
    "grow_basis",
    "max_overlap",
    "module_input",
    "module_output",
    "project_out",
]
