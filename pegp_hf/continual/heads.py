"""Class-incremental heads over the backbone features (the input of the classifier module).

PEGP keeps the backbone's features of old tasks in place, so statistics taken when a task ends stay valid later.
Four heads use that differently:

- ``masked_linear``: the paper's protocol. The linear classifier is trained with logits outside the current task
  masked, and its logits are used as they are.
- ``prototype``: cosine similarity to each seen class's mean feature (nearest class mean). The means are taken in
  eval mode when the class's task ends.
- ``aligned``: classifier alignment (as SLCA). After each task the linear classifier's rows for every seen class are
  re-fit on features sampled from per-class Gaussians (mean and shrunk covariance). This calibrates new classes
  against old ones without storing any image.
- ``ranpac``: a fixed random projection of the features and a ridge classifier on their Gram matrix (RanPAC,
  :mod:`pegp_hf.continual.ranpac`).

Statistics live in a :class:`HeadStatistics` (:class:`ClassStatistics` here: one row per label id, count 0 for unseen
classes), written to ``pegp_head.safetensors`` with every checkpoint. :class:`FeatureMemory` keeps the feature
vectors themselves, for replay (:mod:`pegp_hf.multimodal.prototypes`). With ``drift_compensation``, the stored means of
old classes follow the drift of the current task's features (:func:`compensate_drift`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pegp_hf.utils import CheckpointError, read_safetensors

HEADS = ("masked_linear", "prototype", "aligned", "ranpac")


class HeadStatistics:
    """What a statistics head keeps across tasks: tensors merged from the feature pass of each task. The sums
    (counts, means, covariances, Gram matrices) are exact for any split of the data into batches or processes; what
    is chosen per task (RanPAC's ridge, a drift compensation) depends on that task's rows. Subclasses are dataclasses of
    tensors with the properties ``num_labels``, ``dim`` (the head's input width) and ``seen`` (``(num_labels,)``
    bool)."""

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Merge head inputs ``(N, dim)`` with labels ``(N,)``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take the tensors of ``state`` (whose keys and shapes :meth:`read_like` checked)."""
        for key, value in state.items():
            setattr(self, key, value)

    def save(self, path: str | os.PathLike, head: str) -> None:
        """Write the statistics with the head's name, class count and feature dim as metadata."""
        meta = {"head": head, "num_labels": self.num_labels, "feature_dim": self.dim}
        tensors = {key: value.contiguous() for key, value in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "pt", "pegp_hf": json.dumps(meta)})

    def read_like(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The tensors written by :meth:`save`, which must have this object's keys and shapes (class count, feature
        dim, covariances present or not, projection width); nothing is changed here.

        Raises:
            CheckpointError: an unreadable file, or statistics of other shapes.
        """
        stored = read_safetensors(path)
        expected = {key: tuple(value.shape) for key, value in self.state_dict().items()}
        found = {key: tuple(value.shape) for key, value in stored.items()}
        if found != expected:
            raise CheckpointError(
                f"{path} holds head statistics of shapes {found}; this model and head need {expected} "
                f"({self.num_labels} classes, feature dim {self.dim})"
            )
        return stored


@dataclass
class ClassStatistics(HeadStatistics):
    """Per-class feature statistics for ``num_labels`` classes of ``dim``-dim features.

    Attributes:
        counts: ``(num_labels,)`` float64, number of feature vectors seen per class (0 = unseen).
        means: ``(num_labels, dim)`` float64.
        covariances: ``(num_labels, dim, dim)`` float32 population covariances, or ``None`` when not tracked
            (the prototype head needs means only; the aligned head needs both: ``num_labels * dim^2 * 4`` bytes).
    """

    counts: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor | None

    @classmethod
    def empty(cls, num_labels: int, dim: int, with_covariances: bool) -> ClassStatistics:
        covariances = torch.zeros(num_labels, dim, dim, dtype=torch.float32) if with_covariances else None
        return cls(torch.zeros(num_labels, dtype=torch.float64), torch.zeros(num_labels, dim, dtype=torch.float64),
                   covariances)  # fmt: skip

    @property
    def num_labels(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def seen(self) -> torch.Tensor:
        """``(num_labels,)`` bool: classes with at least one feature vector."""
        return self.counts > 0

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Merge the features ``(N, dim)`` with labels ``(N,)`` into the statistics (pooled mean and covariance,
        exact for any split of the data into batches or tasks)."""
        features, labels = features.detach().to("cpu", torch.float64), labels.detach().cpu()
        for c in labels.unique().tolist():
            x = features[labels == c]
            n_new, mean_new = float(len(x)), x.mean(0)
            n_old, mean_old = float(self.counts[c]), self.means[c].clone()
            total = n_old + n_new
            delta = mean_new - mean_old
            self.means[c] = mean_old + delta * (n_new / total)
            if self.covariances is not None:
                centred = x - mean_new
                scatter = self.covariances[c].double() * n_old + centred.T @ centred
                scatter += torch.outer(delta, delta) * (n_old * n_new / total)
                self.covariances[c] = (scatter / total).float()
            self.counts[c] = total

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"counts": self.counts, "means": self.means}
        if self.covariances is not None:
            state["covariances"] = self.covariances
        return state


@dataclass
class FeatureMemory(HeadStatistics):
    """The feature vectors themselves, kept for replay: ``features`` ``(M, dim)`` float32 and their ``labels``
    ``(M,)`` among ``num_labels`` classes; each :meth:`update` appends a task's feature pass."""

    features: torch.Tensor
    labels: torch.Tensor
    num_labels: int

    @classmethod
    def empty(cls, num_labels: int, dim: int) -> FeatureMemory:
        return cls(torch.zeros(0, dim), torch.zeros(0, dtype=torch.long), num_labels)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def seen(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_labels) > 0

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features = torch.cat([self.features, features.detach().to("cpu", torch.float32)])
        self.labels = torch.cat([self.labels, labels.detach().cpu().long()])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"features": self.features, "labels": self.labels}

    def read_like(self, path: str | os.PathLike, rows: int | None = None) -> dict[str, torch.Tensor]:
        """The tensors written by :meth:`save`: ``rows`` (any number if ``None``) features of this width, with
        labels among this class count; nothing is changed here.

        Raises:
            CheckpointError: an unreadable file, or features of another width, count or labels.
        """
        stored = read_safetensors(path)
        features, labels = stored.get("features"), stored.get("labels")
        fits = (
            features is not None and labels is not None and features.ndim == 2 and features.shape[1] == self.dim
            and labels.shape == (len(features),) and (rows is None or len(features) == rows)
            and bool(((labels >= 0) & (labels < self.num_labels)).all())
        )  # fmt: skip
        if not fits:
            count = "" if rows is None else f"{rows} "
            raise CheckpointError(f"{path} does not hold the {count}stored features of width {self.dim} (labels below "
                                  f"{self.num_labels}) this run needs")  # fmt: skip
        return stored


def prototype_logits(features: torch.Tensor, statistics: ClassStatistics) -> torch.Tensor:
    """Cosine similarity of ``features`` ``(N, dim)`` to every class mean: ``(N, num_labels)`` float32, with the
    dtype's minimum for unseen classes."""
    means = F.normalize(statistics.means.to(features.device, torch.float32), dim=-1)
    logits = F.normalize(features.float(), dim=-1) @ means.T
    return logits.masked_fill(~statistics.seen.to(features.device), torch.finfo(logits.dtype).min)


def shrunk_covariances(statistics: ClassStatistics, shrinkage: float) -> torch.Tensor:
    """``Sigma_c + shrinkage * v * I`` for the seen classes, ``v`` the mean per-dimension variance over seen
    classes (a floor of 1e-6 keeps single-sample classes, whose own covariance is 0, positive definite)."""
    if statistics.covariances is None:
        raise ValueError("these statistics hold no covariances (they are kept for the aligned head only)")
    seen = statistics.covariances[statistics.seen].double()
    pooled_variance = max(float(torch.diagonal(seen, dim1=-2, dim2=-1).mean()), 0.0) if len(seen) else 0.0
    eye = torch.eye(statistics.dim, dtype=torch.float64)
    return seen + (shrinkage * pooled_variance + 1e-6) * eye


def align_linear_head(
    linear: nn.Linear,
    statistics: ClassStatistics,
    shrinkage: float = 0.1,
    samples_per_class: int = 256,
    epochs: int = 10,
    learning_rate: float = 0.01,
    seed: int = 0,
) -> None:
    """Re-fit the rows of ``linear`` for every seen class on features sampled from the class Gaussians.

    Cross-entropy over the seen classes only, SGD with momentum 0.9, batch 128. Rows of unseen classes and the
    linear layer's ``requires_grad`` flags are left as they were; no gradient is left behind.
    """
    classes = torch.nonzero(statistics.seen).flatten()
    if len(classes) < 2:
        return
    generator = torch.Generator().manual_seed(seed)
    scale_tril = torch.linalg.cholesky(shrunk_covariances(statistics, shrinkage))
    noise = torch.randn(len(classes), samples_per_class, statistics.dim, generator=generator, dtype=torch.float64)
    samples = statistics.means[classes][:, None, :] + noise @ scale_tril.transpose(-1, -2)
    inputs = samples.reshape(-1, statistics.dim).to(linear.weight.device, linear.weight.dtype)
    targets = torch.arange(len(classes), device=inputs.device).repeat_interleave(samples_per_class)
    rows = classes.to(linear.weight.device)
    weight = linear.weight.detach()[rows].clone().requires_grad_(True)
    bias = linear.bias.detach()[rows].clone().requires_grad_(True) if linear.bias is not None else None
    params = [weight] if bias is None else [weight, bias]
    optimizer = torch.optim.SGD(params, lr=learning_rate, momentum=0.9)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(inputs), generator=generator).split(128):
                batch = batch.to(inputs.device)
                logits = F.linear(inputs[batch], weight, bias)
                loss = F.cross_entropy(logits, targets[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        linear.weight[rows] = weight.detach()
        if bias is not None:
            linear.bias[rows] = bias.detach()


def compensate_drift(
    statistics: ClassStatistics, before: torch.Tensor, after: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """Semantic drift compensation (Yu et al., "Semantic Drift Compensation for Class-Incremental Learning", CVPR
    2020): move the stored mean of each class in ``classes`` by the drift of the current task's features, weighted
    by their closeness to that mean before the task.

    ``before`` and ``after`` ``(N, dim)`` are the head inputs of the same N training samples of the current task,
    taken before and after it trained. For an old class ``c``: ``w_i = exp(-|before_i - mu_c|^2 / (2 sigma^2))``,
    ``mu_c += sum_i w_i (after_i - before_i) / sum_i w_i``, with ``sigma`` the median over samples of the distance to
    the nearest old mean (the scale of "close" in these features, with no parameter to tune; Yu et al. fix 0.3 for
    unit-norm embeddings). Covariances are kept as they are.

    Returns:
        ``(len(classes), dim)`` float64: the shift applied to each class's mean.
    """
    before, after = before.detach().to("cpu", torch.float64), after.detach().to("cpu", torch.float64)
    if before.shape != after.shape or before.ndim != 2 or len(before) == 0:
        raise ValueError(f"before and after must be the same (N, dim) features of N > 0 samples, got "
                         f"{tuple(before.shape)} and {tuple(after.shape)}")  # fmt: skip
    classes = torch.as_tensor(classes, dtype=torch.long).flatten()
    if len(classes) == 0:
        return torch.zeros(0, statistics.dim, dtype=torch.float64)
    squared = torch.cdist(statistics.means[classes], before).square()  # (classes, N)
    sigma_squared = squared.min(0).values.median().clamp_min(1e-12)
    weights = torch.softmax(-squared / (2 * sigma_squared), dim=1)  # the normalised w_i, without underflow
    shift = weights @ (after - before)
    statistics.means[classes] += shift
    return shift
