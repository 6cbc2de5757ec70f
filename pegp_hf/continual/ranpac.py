"""The RanPAC head: a fixed random projection of the backbone features and a ridge classifier on their Gram matrix.

McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual Learning", NeurIPS 2023 (also
LAMDA-PILOT's ``ranpac``). With ``P`` ``(dim, M)`` drawn once from N(0, 1) and ``h = relu(x P)``, the head keeps

- the Gram matrix ``G = sum h h^T`` ``(M, M)`` and ``Q = sum h y^T`` ``(M, num_labels)``, ``y`` the one-hot label,

and scores with ``logits = h W``, ``W = (G + lambda I)^{-1} Q``. ``G`` and ``Q`` are sums over samples, so after
task ``t`` the head is exactly the ridge classifier fit on every feature seen so far, whatever the split into tasks,
and no image is stored. ``lambda`` is chosen after each task as RanPAC's ``optimise_ridge_parameter`` does: the
candidate in ``10^-8 ... 10^8`` with the least mean squared error on a held-out fifth of that task's features, fit on
the other four fifths (or a fixed ``ridge``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pegp_hf.continual.heads import HeadStatistics

RIDGE_CANDIDATES = tuple(10.0**k for k in range(-8, 9))


@dataclass
class RandomProjectionStatistics(HeadStatistics):
    """The RanPAC head's state for ``num_labels`` classes of ``dim``-dim features projected to ``M`` dims.

    Attributes:
        projection: ``(dim, M)`` float32, the fixed random projection ``P``.
        gram: ``(M, M)`` float64, ``sum h h^T``.
        targets: ``(M, num_labels)`` float64, ``sum h y^T``.
        counts: ``(num_labels,)`` float64, samples seen per class (0 = unseen).
        ridge: ``(1,)`` float64, the ``lambda`` of the last update (0 before the first).
    """

    projection: torch.Tensor
    gram: torch.Tensor
    targets: torch.Tensor
    counts: torch.Tensor
    ridge: torch.Tensor

    @classmethod
    def empty(cls, num_labels: int, dim: int, projection_dim: int, seed: int) -> RandomProjectionStatistics:
        """Zero statistics and a projection drawn from ``torch.Generator().manual_seed(seed)``."""
        if projection_dim < 1:
            raise ValueError(f"the random projection needs at least 1 dimension, got {projection_dim}")
        projection = torch.randn(dim, projection_dim, generator=torch.Generator().manual_seed(seed))
        return cls(projection, torch.zeros(projection_dim, projection_dim, dtype=torch.float64),
                   torch.zeros(projection_dim, num_labels, dtype=torch.float64),
                   torch.zeros(num_labels, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))  # fmt: skip

    def __post_init__(self) -> None:
        self._weights: torch.Tensor | None = None  # W, solved when first needed after an update

    @property
    def num_labels(self) -> int:
        return self.targets.shape[1]

    @property
    def dim(self) -> int:
        return self.projection.shape[0]

    @property
    def seen(self) -> torch.Tensor:
        return self.counts > 0

    def expand(self, features: torch.Tensor) -> torch.Tensor:
        """``relu(features P)``: ``(N, dim)`` -> ``(N, M)`` float64 on the CPU."""
        return F.relu(features.detach().to("cpu", torch.float64) @ self.projection.double())

    def update(self, features: torch.Tensor, labels: torch.Tensor, ridge: float | None = None) -> None:
        """Add the features ``(N, dim)`` with labels ``(N,)`` to ``G`` and ``Q``, and set ``lambda``: ``ridge`` if
        given, else the candidate that best predicts a held-out fifth of these features (at least 5 samples needed;
        with fewer, the last ``lambda`` is kept, or 1 before any)."""
        hidden, labels = self.expand(features), labels.detach().cpu()
        onehot = F.one_hot(labels, self.num_labels).double()
        self.gram += hidden.T @ hidden
        self.targets += hidden.T @ onehot
        self.counts += onehot.sum(0)
        if ridge is None:
            ridge = select_ridge(hidden, onehot) if len(hidden) >= 5 else (float(self.ridge) or 1.0)
        self.ridge = torch.tensor([float(ridge)], dtype=torch.float64)
        self._weights = None

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self._weights = None

    def weights(self) -> torch.Tensor:
        """``W = (G + lambda I)^{-1} Q`` ``(M, num_labels)`` float64."""
        if self._weights is None:
            eye = torch.eye(len(self.gram), dtype=torch.float64)
            self._weights = torch.linalg.solve(self.gram + float(self.ridge) * eye, self.targets)
        return self._weights

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, num_labels)`` float32 ridge scores of ``features`` ``(N, dim)``, the dtype's minimum for unseen
        classes."""
        logits = (self.expand(features) @ self.weights()).float()
        return logits.masked_fill(~self.seen, torch.finfo(logits.dtype).min).to(features.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"projection": self.projection, "gram": self.gram, "targets": self.targets, "counts": self.counts,
                "ridge": self.ridge}  # fmt: skip


def select_ridge(hidden: torch.Tensor, onehot: torch.Tensor, candidates: tuple[float, ...] = RIDGE_CANDIDATES) -> float:
    """The ``lambda`` of ``candidates`` whose ridge fit on the first four fifths of ``hidden`` ``(N, M)`` /
    ``onehot`` ``(N, C)`` predicts the last fifth with the least mean squared error (the first on ties). One SVD of
    the fit part serves every candidate: ``W = V diag(s / (s^2 + lambda)) U^T Y``."""
    split = int(0.8 * len(hidden))
    u, s, vh = torch.linalg.svd(hidden[:split], full_matrices=False)
    projected = u.T @ onehot[:split]
    errors = []
    for ridge in candidates:
        weights = vh.T @ ((s / (s.square() + ridge))[:, None] * projected)
        errors.append(float((hidden[split:] @ weights - onehot[split:]).square().mean()))
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]
