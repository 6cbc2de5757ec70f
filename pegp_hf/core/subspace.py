"""The subspace math of PEGP, free of ``torch.nn`` and of the Trainer.

A protected PET weight ``W`` of shape ``(out, d)`` acts on features ``x`` of dimension ``d`` as ``W x``. After each
task we keep an orthonormal basis ``U`` of shape ``(d, k)`` of the features ``W`` has seen so far, and every later
gradient ``G`` (same shape as ``W``) is replaced by ``G - (G U) U^T``: its rows become orthogonal to the old feature
space, so ``(W + delta W) x_old = W x_old``.

The basis grows by the GPM rule (Saha et al. 2021) from the uncentred feature covariance ``C = sum_x x x^T``:
the eigenvalues of ``C`` are the squared singular values of the sample matrix, so no sample matrix is stored and
directions are ranked by ``sigma^2`` (the paper's and GPM's energy, not the official code's ``sigma^4``).
"""

from __future__ import annotations

import torch

__all__ = ["accumulate_covariance", "empty_basis", "grow_axis_basis", "grow_basis", "max_overlap", "project_out"]


def empty_basis(dim: int) -> torch.Tensor:
    """A basis of the zero subspace: shape ``(dim, 0)``, float32."""
    return torch.zeros(dim, 0, dtype=torch.float32)


def accumulate_covariance(covariance: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
    """Add ``sum_x x x^T`` over the feature vectors in ``features`` to ``covariance``.

    Args:
        covariance: ``(d, d)`` float64 running sum, or ``None`` to start one on ``features``' device.
        features: ``(..., d)``; every leading index is one feature vector (a token of one sample). Not centred.

    Returns:
        The ``(d, d)`` float64 sum, updated in place when one was given.
    """
    flat = features.detach().reshape(-1, features.shape[-1]).to(torch.float64)
    if covariance is None:
        return flat.T @ flat
    return covariance.addmm_(flat.T, flat)


def _leading_count(eigenvalues: torch.Tensor, already: float, total: float, threshold: float) -> int:
    """Smallest ``m`` with ``already + sum(eigenvalues[:m]) / total >= threshold`` (eigenvalues descending)."""
    captured = already + torch.cumsum(eigenvalues, 0) / total
    reached = torch.nonzero(captured >= threshold - 1e-12)
    return int(reached[0]) + 1 if len(reached) else len(eigenvalues)


def grow_basis(covariance: torch.Tensor, threshold: float, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Grow an orthonormal basis by the GPM energy rule.

    Task 1 (``basis`` empty): keep the ``k`` leading eigenvectors of ``C`` with the smallest ``k`` such that
    ``sum_{i<=k} lambda_i / trace(C) >= threshold``. Later tasks: the energy already captured by ``U`` is
    ``(trace(C) - trace(C_r)) / trace(C)`` with ``C_r = (I - U U^T) C (I - U U^T)``; leading eigenvectors of
    ``C_r`` are appended until the captured share reaches ``threshold``. The dimension is capped at ``d``.

    Args:
        covariance: ``(d, d)`` symmetric positive semi-definite, uncentred (any float dtype; computed in float64).
        threshold: energy share ``eps`` in ``(0, 1]``.
        basis: ``(d, k)`` orthonormal columns from earlier tasks, or ``None``.

    Returns:
        ``(d, k')`` float32 with orthonormal columns, ``k <= k' <= d``; its first ``k`` columns span the old basis.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    dim = covariance.shape[0]
    if covariance.shape != (dim, dim):
        raise ValueError(f"covariance must be square, got shape {tuple(covariance.shape)}")
    old = empty_basis(dim) if basis is None else basis
    if old.shape[0] != dim:
        raise ValueError(f"basis has feature dim {old.shape[0]} but the covariance has {dim}")
    cov = covariance.detach().to("cpu", torch.float64)
    total = float(torch.trace(cov))
    if total <= 0.0 or old.shape[1] >= dim:
        return old.to(torch.float32)
    u = old.to("cpu", torch.float64)
    residual = cov - u @ (u.T @ cov)
    residual = residual - (residual @ u) @ u.T
    already = (total - float(torch.trace(residual))) / total
    if already >= threshold:
        return old.to(torch.float32)
    eigenvalues, eigenvectors = torch.linalg.eigh((residual + residual.T) / 2)
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0.0), eigenvectors.flip(1)
    added = min(_leading_count(eigenvalues, already, total, threshold), dim - u.shape[1])
    new = eigenvectors[:, :added]
    new = new - u @ (u.T @ new)  # re-orthogonalise against the old basis (eigh of C_r is only numerically orthogonal)
    new, _ = torch.linalg.qr(new)
    return torch.cat([u, new], dim=1).to(torch.float32)


def grow_axis_basis(covariance: torch.Tensor, threshold: float, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Grow a basis of coordinate axes by the same energy rule, for weights that scale each coordinate on its own.

    An elementwise scaling ``h_j = w_j x_j`` keeps old outputs when ``delta w_j = 0`` on every coordinate old features
    use: the condition is per coordinate, so directions mixing coordinates mean nothing. Coordinates are ranked by
    their energy ``C_jj`` (the diagonal of the uncentred covariance); those not yet in ``basis`` are added, most
    energetic first, until the protected coordinates hold ``threshold`` of ``trace(C)``.

    Args:
        covariance: ``(d, d)`` uncentred feature covariance (only its diagonal is read).
        threshold: energy share ``eps`` in ``(0, 1]``.
        basis: ``(d, k)`` one-hot columns from earlier tasks, or ``None``.

    Returns:
        ``(d, k')`` float32 one-hot columns (``e_j``), the old ones first, ``k <= k' <= d``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    dim = covariance.shape[0]
    old = empty_basis(dim) if basis is None else basis.to("cpu", torch.float32)
    energy = torch.diagonal(covariance.detach().to("cpu", torch.float64)).clamp_min(0.0)
    total = float(energy.sum())
    taken = old.abs().sum(dim=1) > 0.5
    if total <= 0.0:
        return old
    already = float(energy[taken].sum()) / total
    candidates = torch.argsort(energy.masked_fill(taken, -1.0), descending=True)[: dim - int(taken.sum())]
    added = _leading_count(energy[candidates], already, total, threshold) if already < threshold else 0
    return torch.cat([old, torch.eye(dim)[:, candidates[:added]]], dim=1)


def project_out(tensor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove from the last axis of ``tensor`` its component in ``span(basis)``: ``T - (T U) U^T``.

    Args:
        tensor: ``(..., d)``, any float dtype; computed in float32 or better and returned in ``tensor``'s dtype.
        basis: ``(d, k)`` orthonormal columns. Cost ``2 * numel(tensor) * k`` multiply-adds.
    """
    if basis.shape[1] == 0:
        return tensor
    compute = torch.promote_types(tensor.dtype, torch.float32)
    x = tensor.to(compute)
    u = basis.to(device=tensor.device, dtype=compute)
    return (x - (x @ u) @ u.T).to(tensor.dtype)


def max_overlap(tensor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``max |T U|`` as a 0-dim float32+ tensor on ``tensor``'s device (no host sync): how far the rows of
    ``tensor`` (``(..., d)``) reach into ``span(basis)``; 0 for an empty basis."""
    compute = torch.promote_types(tensor.dtype, torch.float32)
    if basis.shape[1] == 0 or tensor.numel() == 0:
        return torch.zeros((), dtype=compute, device=tensor.device)
    return (tensor.to(compute) @ basis.to(device=tensor.device, dtype=compute)).abs().amax()
