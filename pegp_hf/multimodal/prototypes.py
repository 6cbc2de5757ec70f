"""Old-class image prototypes replayed against the class-name embeddings of a continual CLIP.

PEGP keeps an old task's image embeddings in place, but nothing it does stops a later class name's text embedding
from moving towards them: an old image then matches the new name better than its own (cross-modal hallucination,
:mod:`~pegp_hf.multimodal.crossmodal`). Gradient projection cannot see this, since no old image runs through the
model while a later task trains.

:class:`PrototypeReplayObjective` keeps, for every class, the mean of its L2-normalised image embeddings taken in the
feature pass after its task (``counts`` and ``means`` of a
:class:`~pegp_hf.continual.heads.ClassStatistics`, ``(num_labels, D)``; no image is stored) and, while a later task
trains, adds to the cross-entropy of the task's images a cross-entropy of embeddings drawn around the old classes'
means (Gaussian prototype augmentation, PASS: Zhu et al., CVPR 2021), scored against the class-name embeddings of
every seen class with the model's logit scale:

    x = normalize(mu_c + noise * sigma_c * z),   z ~ N(0, I_D),   sigma_c^2 = (1 - |mu_c|^2) / D,

``sigma_c^2`` the mean per-dimension variance of unit vectors whose mean is ``mu_c``. The replayed embeddings are
constants: their loss reaches the text tower only (PEGP still projects its gradient, so old class names stay
where they were) and pushes new class names away from old images. Under ``pegp`` the means stay valid because the
image tower's old features are protected; under ``sequential`` they go stale as the tower drifts. With
``spread="stored"`` the feature pass's embeddings themselves are kept and replayed instead of draws.

With ``refit`` (``spread="stored"`` only), the text projection is also re-fitted on the stored embeddings of
every seen class after each task (:mod:`~pegp_hf.multimodal.refit`): what the few replay steps of a task cannot do.

Measured on the CLIP recipe's default (docs/clip.md): the replay alone lowers hallucination by a few points, and
replaying the exact embeddings does no better. The old embeddings would allow far less: unit class vectors trained on
every class's images reach less than half the rate (``benchmarks/clip_separability.py``), and the class-name
embeddings the replay trains through the text tower stay far from those vectors; the re-fit moves them most of
the way (31.0% with its decision-margin reference term, 36.5% with the KL, against 45.8% without it, docs/clip.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn

from pegp_hf.continual.classification import ClassificationObjective
from pegp_hf.continual.heads import ClassStatistics, FeatureMemory
from pegp_hf.continual.objectives import BatchObserver
from pegp_hf.continual.tasks import TaskSequence
from pegp_hf.multimodal.clip import CLIPForClassNameClassification
from pegp_hf.multimodal.refit import TextProjectionRefit

if TYPE_CHECKING:
    from pegp_hf.config import PEGPTrainingArguments
    from pegp_hf.trainer import ContinualPEGPTrainer

logger = logging.getLogger(__name__)

PROTOTYPES_NAME = "pegp_prototypes.safetensors"
MEMORY_NAME = "pegp_prototype_memory.safetensors"
REFIT_NAME = "pegp_refit_reference.safetensors"
SPREADS = ("isotropic", "covariance", "stored")


@dataclass
class _Replay:
    """What a task with old classes replays: their ``labels`` ``(K,)``, ``means`` ``(K, D)`` and ``scales`` (``(K, 1)``
    per-class sigma, ``(K, D, D)`` Cholesky factors, or with ``spread="stored"`` the old classes' stored embeddings
    ``(M, D)``, ``labels`` then ``(M,)`` and ``means`` unused) on the training device, the ``seen`` classes' mask
    ``(num_labels,)`` the replayed embeddings compete in, and the CPU ``generator`` of the draws."""

    labels: torch.Tensor
    means: torch.Tensor
    scales: torch.Tensor
    seen: torch.Tensor
    generator: torch.Generator


class PrototypeReplayObjective(ClassificationObjective):
    """The classification objective of a :class:`~pegp_hf.multimodal.clip.CLIPForClassNameClassification` plus the
    replay of old-class image prototypes of the module docstring.

    Args:
        weight: the replayed embeddings' cross-entropy is added with this factor (> 0).
        noise: the spread of the replayed embeddings around each mean, in units of the class's own ``sigma_c``
            (0: the means themselves).
        spread: ``"isotropic"`` (``sigma_c``), ``"covariance"`` (each class's ``D x D`` covariance, kept too), or
            ``"stored"``: no draws, the feature pass's embeddings themselves are kept (``feature_samples`` per
            task, ``MEMORY_NAME``) and replayed, uniformly over them. Under ``pegp`` these are the old images'
            embeddings as they stay, so this replays what replaying the images could change (the text side).
        samples: embeddings replayed per training batch (default: as many as the batch has rows), shared evenly by
            the old classes.
        refit: with ``spread="stored"``: after each task's feature pass, re-fit the text projection on the
            stored embeddings of every seen class (:class:`~pegp_hf.multimodal.refit.TextProjectionRefit`);
            ``None``: no re-fit. One process or DDP (the weight is written whole on every process).
    """

    def __init__(
        self,
        weight: float = 1.0,
        noise: float = 1.0,
        samples: int | None = None,
        spread: str = "isotropic",
        refit: TextProjectionRefit | None = None,
    ) -> None:
        if not weight > 0:
            raise ValueError(
                f"the prototype replay weight must be > 0, got {weight} (leave the objective out for none)"
            )
        if not noise >= 0:
            raise ValueError(f"the prototype noise must be >= 0, got {noise}")
        if spread not in SPREADS:
            raise ValueError(f"spread is one of {SPREADS}, not {spread!r}")
        if samples is not None and samples < 1:
            raise ValueError(f"samples must be at least 1 (or None: the batch size), got {samples}")
        if refit is not None and spread != "stored":
            raise ValueError(f"the text projection's re-fit needs the stored embeddings: spread='stored', not "
                             f"{spread!r}")  # fmt: skip
        super().__init__()
        self.weight, self.noise, self.samples, self.spread = float(weight), float(noise), samples, spread
        self.refit = refit
        self.prototypes: ClassStatistics | None = None
        self.memory: FeatureMemory | None = None  # spread="stored": the embeddings themselves
        self._replayed: _Replay | None = None  # while a task with old classes trains
        self._classifier: CLIPForClassNameClassification | None = None
        self._embeds: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, model: nn.Module, args: PEGPTrainingArguments) -> None:
        """Check for a class-name classifier judged by its own logits and make the empty prototypes."""
        classifier = next((m for m in model.modules() if isinstance(m, CLIPForClassNameClassification)), None)
        if classifier is None:
            raise TypeError(f"{type(self).__name__} replays image prototypes against class-name embeddings: the model "
                            f"must hold a CLIPForClassNameClassification, not be a {type(model).__name__}")  # fmt: skip
        if args.head != "masked_linear":
            raise ValueError(f"{type(self).__name__} trains the class-name classifier, whose own logits score it: "
                             f"use head='masked_linear', not {args.head!r}")  # fmt: skip
        if args.n_gpu > 1:
            raise ValueError(f"{type(self).__name__} needs one device per process: launch with accelerate / torchrun "
                             f"(DDP) instead of one process over {args.n_gpu} GPUs (nn.DataParallel)")  # fmt: skip
        if self.refit is not None:
            self.refit.check(classifier, args)
        super().setup(model, args)
        self._classifier = classifier
        dim = getattr(classifier.clip.config, "projection_dim", None)
        if not isinstance(dim, int):
            raise TypeError(
                f"{type(classifier.clip).__name__}'s config has no projection_dim (the joint space's width)"
            )
        self.prototypes = ClassStatistics.empty(self.num_labels, dim, with_covariances=self.spread == "covariance")
        if self.spread == "stored":
            self.memory = FeatureMemory.empty(self.num_labels, dim)

    def validate(self, tasks: TaskSequence) -> None:
        super().validate(tasks)
        if not tasks.disjoint:
            raise ValueError("prototype replay keeps one mean per old class; this sequence's tasks share classes "
                             "(domain-incremental), so no class is old: train without it")  # fmt: skip

    def replay(self) -> dict[str, Any]:
        refit = {} if self.refit is None else {"refit": self.refit.config()}
        return {"prototypes": {"weight": self.weight, "noise": self.noise, "samples": self.samples,
                               "spread": self.spread, **refit}}  # fmt: skip

    # ---- training -----------------------------------------------------------------------------------------------

    def on_task_begin(self, args, state, control, tasks: TaskSequence, task_index: int, **kwargs) -> None:
        """Mask the classes as the classification objective does; put the old classes' means and spreads on the
        training device (they do not change while the task trains) with the seen classes' mask the replayed
        embeddings compete in, and seed the replay's own generator from ``(seed, task, process)``."""
        super().on_task_begin(args, state, control, tasks=tasks, task_index=task_index, **kwargs)
        current = set(tasks[task_index].classes)
        old = [c for c in tasks.seen_classes(task_index) if c not in current and self.prototypes.counts[c] > 0]
        if not old:
            self._replayed = None
            return
        labels = torch.tensor(old, dtype=torch.long)
        means = self.prototypes.means[labels]
        if self.spread == "stored":  # (M, D): the old classes' stored embeddings, with their labels
            kept = torch.isin(self.memory.labels, labels)
            scales, labels = self.memory.features[kept], self.memory.labels[kept]
        elif self.spread == "covariance":  # (K, D, D): Cholesky factors of the class covariances
            eye = torch.eye(self.prototypes.dim, dtype=torch.float64)
            scales = torch.linalg.cholesky(self.prototypes.covariances[labels].double() + 1e-6 * eye)
        else:  # (K, 1): sigma_c
            scales = ((1.0 - means.square().sum(1, keepdim=True)).clamp_min(0.0) / self.prototypes.dim).sqrt()
        labels, means, scales = (t.to(args.device) for t in (labels, means.float(), scales.float()))
        seed = np.random.SeedSequence([args.seed, task_index, args.process_index]).generate_state(1)[0]
        self._replayed = _Replay(labels, means, scales, self._class_mask(tasks.seen_classes(task_index)),
                                 torch.Generator().manual_seed(int(seed)))  # fmt: skip

    def replay_logits(
        self, class_embeds: torch.Tensor, logit_scale: torch.Tensor, count: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` replayed embeddings scored against ``class_embeds`` ``(C, D)``: ``(logits (count, C), labels
        (count,))``. Each old class gets ``count // K`` or one more (the extra ones from a random class on), so
        over the steps every class is replayed as often, also when ``count < K``. With ``spread="stored"``:
        ``count`` stored embeddings drawn uniformly."""
        replay = self._replayed
        if self.spread == "stored":
            rows = torch.randint(len(replay.labels), (count,), generator=replay.generator).to(replay.labels.device)
            return logit_scale * replay.scales[rows].to(class_embeds.dtype) @ class_embeds.T, replay.labels[rows]
        classes, dim = replay.means.shape
        rounds = -(-count // classes)
        # drawn on the CPU: the same draws on every device
        noise = torch.randn(rounds, classes, dim, generator=replay.generator).to(replay.means)
        if replay.scales.ndim == 3:
            offsets = torch.einsum("kij,rkj->rki", replay.scales, noise)
        else:
            offsets = replay.scales * noise
        embeds = F.normalize(replay.means + self.noise * offsets, dim=-1).flatten(0, 1)  # row r * K + k: class k
        start = int(torch.randint(classes, (), generator=replay.generator))
        rows = (start + torch.arange(count, device=embeds.device)) % len(embeds)
        logits = logit_scale * embeds[rows].to(class_embeds.dtype) @ class_embeds.T
        return logits, replay.labels[rows % classes]

    def compute_loss(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The classification loss plus ``weight`` times the mean cross-entropy of ``samples`` replayed embeddings
        (default: the batch's row count) over every seen class, scaled by this batch's share of the accumulated items
        (so accumulation over batches and processes keeps it a mean). Outside training: the classification loss."""
        loss = super().compute_loss(outputs, labels, num_items_in_batch)
        if self._replayed is None or not self.model.training:
            return loss
        logits, replayed = self.replay_logits(outputs["class_embeds"], outputs["logit_scale"],
                                              self.samples or len(labels))  # fmt: skip
        logits = logits.masked_fill(~self._replayed.seen, torch.finfo(logits.dtype).min)
        share = (labels != -100).sum() / num_items_in_batch if num_items_in_batch is not None else 1.0
        return loss + self.weight * share * F.cross_entropy(logits.float(), replayed)

    # ---- the feature pass after each task -------------------------------------------------------------------------

    def before_task(self, trainer: ContinualPEGPTrainer, index: int) -> None:
        """Before the first task, with a re-fit that keeps a reference set: take what the pre-trained model says
        about it (the re-fit's ``teacher``)."""
        super().before_task(trainer, index)
        if self.refit is not None and index == 0:
            self.refit.remember_teacher(trainer, self._classifier)

    @contextlib.contextmanager
    def observing(self) -> Iterator[BatchObserver]:
        """Collect the image embeddings and labels of the feature pass."""
        self._embeds = []

        def observe(inputs: dict[str, Any], outputs: Any) -> None:
            self._embeds.append((outputs["image_embeds"].float().cpu(), inputs["labels"].cpu()))

        yield observe

    def after_feature_pass(self, trainer: ContinualPEGPTrainer, index: int) -> None:
        """Merge every process's image embeddings into the class means (and the stored embeddings); with
        ``refit``, re-fit the text projection on every stored embedding (the same on every process)."""
        embeds, labels = torch.cat([e for e, _ in self._embeds]), torch.cat([y for _, y in self._embeds])
        parts = gather_object([(embeds, labels)])  # feature_sample_loader gives every process a batch
        embeds, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        self.prototypes.update(embeds, labels)
        if self.memory is not None:
            self.memory.update(embeds, labels)
        self._embeds = []
        if self.refit is not None:
            figures = self.refit(trainer, self._classifier, self.memory)
            logger.info("task %d: re-fitted the text projection on %d stored embeddings: %s", index + 1,
                        len(self.memory.labels), figures)  # fmt: skip

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        self.prototypes.save(Path(directory) / PROTOTYPES_NAME, "prototype_replay")
        if self.memory is not None:
            self.memory.save(Path(directory) / MEMORY_NAME, "prototype_replay")
        if self.refit is not None:
            self.refit.save(Path(directory) / REFIT_NAME)

    def read_checkpoint(self, directory: str | os.PathLike) -> tuple[Any, Any, Any]:
        """The stored class statistics, (``spread="stored"``) embeddings, as many as the statistics count, and (a
        re-fit with a reference set) its teacher, checked against this model's class count and
        width (``None`` for what this objective does not keep); nothing is changed. ``CheckpointError`` if they do
        not fit."""
        statistics = self.prototypes.read_like(Path(directory) / PROTOTYPES_NAME)
        memory = teacher = None
        if self.memory is not None:
            memory = self.memory.read_like(Path(directory) / MEMORY_NAME, int(statistics["counts"].sum()))
        if self.refit is not None:
            teacher = self.refit.read_like(Path(directory) / REFIT_NAME, self._classifier)
        return statistics, memory, teacher

    def load_checkpoint(self, stored: tuple[Any, Any, Any]) -> None:
        statistics, memory, teacher = stored
        self.prototypes.load_state_dict(statistics)
        if self.memory is not None:
            self.memory.load_state_dict(memory)
        if self.refit is not None:
            self.refit.teacher = teacher
