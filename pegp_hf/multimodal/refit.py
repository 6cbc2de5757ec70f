"""Re-fitting a continual CLIP's text projection on the stored image embeddings of every seen class.

Cross-modal hallucination (an old image matching a later class's caption, :mod:`~pegp_hf.multimodal.crossmodal`) is
decided on the class-name side once PEGP keeps the old images' embeddings in place: unit class vectors trained on
those embeddings put far fewer old images on another class than the class names do
(``benchmarks/clip_separability.py``), and the few replay steps of a task move the text tower too little to close
the gap (docs/clip.md).

:func:`refit_text_projection` closes it after a task. It re-fits the text projection ``W`` ``(D, H)`` (the text
side's last linear map into the joint space) on stored image embeddings ``x_n`` ``(N, D)`` with labels ``y_n``, by
L-BFGS on

    L(W) = CE_prompts(W) + CE_classes(W),
    CE_prompts = mean_n [ logsumexp_{c, k} s cos(x_n, W f_ck) - logsumexp_k s cos(x_n, W f_{y_n k}) ],
    CE_classes = mean_n cross-entropy of s cos(x_n, e_c) over the classes, e_c = ensemble_k(normalize(W f_ck)),

``f_ck`` ``(H,)`` the text tower's feature of class ``c``'s ``k``-th prompt as it enters the projection, ``s`` the
scale, ``c`` over the classes of the stored embeddings. The first term is what caption matching counts (an image
against every prompt on its own: any of its class's prompts may win), the second what the classifier's logits count
(prompt-ensembled class embeddings).

With a reference set and ``reference_loss="kl"`` (the default of :class:`TextProjectionRefit`), ``L`` also holds
``reference_weight * KL(p_0 || p_W)`` over the reference images: ``p`` the softmax, at the model's logit scale, of
an image's embedding against every class's prompts (future classes too), ``p_0`` taken once before the first task
(the model as pre-trained), ``p_W`` with the image embeddings as they are now. It keeps what the pre-trained
model said about the reference images (ZSCL's distillation on reference data, Zheng et al., ICCV 2023, here on the
projection only), so the class names keep their zero-shot meaning.

``reference_loss="margin"`` keeps the pre-trained model's zero-shot *decisions* instead of its probabilities. With
``t_r`` the class it gave reference image ``r`` before the first task (prompt-ensembled, among every class), the
term is

    M(W) = mean_r relu(lambda * (max_{c != t_r} cos(x_r, e_c) - cos(x_r, e_{t_r}) + delta))^2,

``lambda`` the model's logit scale and ``delta`` the margin in cosine. It is zero while every decision holds by
``delta``: the projection may move in every way that changes no decision, where the KL holds every probability in
place. On the CLIP recipe it leaves 6 to 8 points less hallucination than the KL at about the same zero-shot
accuracy (docs/clip.md).

The text tower itself does not change, so its PEGP bases stay valid; the embedding of every text moves, the old
classes' too: this is replay of stored embeddings (no image is kept), not a projected update. It is only as good as
the stored embeddings are current: under ``pegp`` they drift as far as the threshold lets the image tower move (the
CLIP benchmark's re-fit settings use ``threshold=0.999``, docs/clip.md).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, parse_flag_from_env
from datasets import Dataset
from safetensors.torch import save_file
from torch import nn

from pegp_hf.continual.heads import FeatureMemory
from pegp_hf.multimodal.clip import ensemble_prompts
from pegp_hf.multimodal.crossmodal import image_embeddings
from pegp_hf.utils import CheckpointError, read_safetensors

if TYPE_CHECKING:
    from pegp_hf.config import PEGPTrainingArguments
    from pegp_hf.multimodal.clip import CLIPForClassNameClassification
    from pegp_hf.trainer import ContinualPEGPTrainer


REFERENCE_LOSSES = ("kl", "margin")  # the reference terms: Distillation, DecisionMargin


def text_projection(classifier: CLIPForClassNameClassification) -> nn.Module:
    """The dual encoder's ``text_projection`` (under PEFT its ``modules_to_save`` wrapper, whose ``weight`` is the
    active copy's), a linear map with a ``weight`` ``(D, H)``; ``TypeError`` if it has none."""
    projection = getattr(classifier.clip, "text_projection", None)
    weight = getattr(projection, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise TypeError(f"{type(classifier.clip).__name__} has no text_projection with a 2-D weight to re-fit")
    return projection


@torch.no_grad()
def prompt_features(classifier: CLIPForClassNameClassification, classes: torch.Tensor) -> torch.Tensor:
    """``(len(classes), K, H)``: the text tower's features of every prompt of ``classes`` (label ids) as they enter
    the text projection, in eval mode, float64 on the CPU."""
    captured: list[torch.Tensor] = []
    handle = text_projection(classifier).register_forward_hook(lambda module, args, output: captured.append(args[0]))
    training = classifier.training
    try:
        classifier.eval()  # no dropout: every process gets the same features
        classifier.encode_text(**classifier.prompt_inputs(classes))
    finally:
        handle.remove()
        classifier.train(training)
    return captured[0].double().cpu().view(len(classes), len(classifier.templates), -1)


def projection_weights(classifier: CLIPForClassNameClassification) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The text projection's ``weight`` ``(D, H)`` and ``bias`` ``(D,)`` (``None`` without), float64 copies on the
    CPU."""
    projection = text_projection(classifier)
    bias = getattr(projection, "bias", None)
    weight = projection.weight.detach().double().cpu()
    return weight, None if bias is None else bias.detach().double().cpu()


def projected(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Prompt ``features`` ``(..., H)`` through the projection ``weight`` ``(D, H)`` (and ``bias``), normalised:
    ``(..., D)``."""
    return F.normalize(features @ weight.T + (0 if bias is None else bias), dim=-1)


def refit_loss(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    features: torch.Tensor,
    embeds: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``L(W)`` of the module docstring for the projection ``weight`` ``(D, H)`` (and ``bias`` ``(D,)``), prompt
    ``features`` ``(C, K, H)``, normalised ``embeds`` ``(N, D)`` and ``targets`` ``(N,)`` indexing the ``C``
    classes."""
    prompts = projected(features, weight, bias)  # (C, K, D)
    logits = scale * torch.einsum("nd,ckd->nck", embeds, prompts)
    own = torch.logsumexp(logits[torch.arange(len(targets)), targets], dim=1)
    per_prompt = (torch.logsumexp(logits.flatten(1), dim=1) - own).mean()
    per_class = F.cross_entropy(scale * embeds @ ensemble_prompts(prompts).T, targets)
    return per_prompt + per_class


@dataclass
class Distillation:
    """The KL reference term of the re-fit: the reference images' embeddings now ``embeds`` ``(R, D)``, the
    pre-trained model's probabilities ``teacher`` ``(R, C_all * K)`` over every class's prompts, the model's
    ``logit_scale`` now (the teacher's too while it stays frozen, as under
    :func:`~pegp_hf.multimodal.clip.get_clip_pet_model`), and the term's ``weight``."""

    embeds: torch.Tensor
    teacher: torch.Tensor
    logit_scale: float
    weight: float

    def loss(self, projection: torch.Tensor, bias: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
        """``KL(p_0 || p_W)`` (module docstring), averaged over the reference images, for the ``projection`` weight
        ``W`` ``(D, H)`` (and ``bias``) and the prompt ``features`` ``(C_all, K, H)`` of every class."""
        prompts = projected(features.flatten(0, 1), projection, bias)
        student = F.log_softmax(self.logit_scale * self.embeds @ prompts.T, dim=1)
        return F.kl_div(student, self.teacher, reduction="batchmean")


@dataclass
class DecisionMargin:
    """The margin reference term of the re-fit: the reference images' embeddings now ``embeds`` ``(R, D)``, the
    class the pre-trained model gave each of them ``decisions`` ``(R,)`` (prompt-ensembled, among every class), the
    model's ``logit_scale``, the ``margin`` ``delta`` in cosine and the term's ``weight``."""

    embeds: torch.Tensor
    decisions: torch.Tensor
    logit_scale: float
    margin: float
    weight: float

    def loss(self, projection: torch.Tensor, bias: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
        """``M(W)`` (module docstring) for the ``projection`` weight ``W`` ``(D, H)`` (and ``bias``) and the prompt
        ``features`` ``(C_all, K, H)`` of every class: zero while each decision holds by the margin."""
        cosines = self.embeds @ ensemble_prompts(projected(features, projection, bias)).T  # (R, C_all)
        own = cosines.gather(1, self.decisions[:, None]).squeeze(1)
        other = cosines.scatter(1, self.decisions[:, None], -2.0).max(dim=1).values  # a cosine is >= -1
        return F.relu(self.logit_scale * (other - own + self.margin)).square().mean()


def refit_text_projection(
    classifier: CLIPForClassNameClassification,
    embeds: torch.Tensor,
    labels: torch.Tensor,
    scale: float,
    reference: Distillation | DecisionMargin | None = None,
    max_iter: int = 200,
) -> dict[str, float]:
    """Re-fit ``classifier``'s text projection weight on the stored image ``embeds`` ``(N, D)`` with ``labels``
    ``(N,)`` (module docstring), plus the ``reference`` term if given, from its current value, in float64 on the
    CPU: the same inputs give the same bits on every process. Only the projection's weight changes (its bias, if
    any, is kept).

    Returns:
        ``refit_loss_before`` / ``refit_loss_after`` (``L(W)``, with the reference term) and ``refit_weight_change``
        (``|W_new - W_old| / |W_old|``, Frobenius).

    Raises:
        ValueError: no embeddings, shapes that do not match, non-finite embeddings, a scale that is not positive,
            labels of a class the classifier does not know yet, or a fit that ends non-finite; raised before the
            weight changes.
    """
    if embeds.ndim != 2 or labels.shape != (len(embeds),) or not len(embeds):
        raise ValueError(f"the re-fit needs embeddings (N, D) with N > 0 and labels (N,), got {tuple(embeds.shape)} "
                         f"and {tuple(labels.shape)}")  # fmt: skip
    parameter = text_projection(classifier).weight
    if embeds.shape[1] != parameter.shape[0]:
        raise ValueError(f"the stored embeddings have width {embeds.shape[1]}, the joint space {parameter.shape[0]}")
    if not torch.isfinite(embeds).all():
        raise ValueError("the stored embeddings hold NaN / inf: the re-fit would write them into the text projection")
    if not scale > 0:
        raise ValueError(f"the re-fit's scale must be > 0, got {scale}")
    labels = labels.cpu()
    classes = labels.unique()
    if classes.min() < 0 or classes.max() >= len(classifier.known) or not classifier.known[classes].all():
        raise ValueError(f"the stored embeddings' classes {classes.tolist()} are not all known to the classifier: "
                         "reveal them first (RevealSeenClasses)")  # fmt: skip
    start, bias = projection_weights(classifier)
    every_class = prompt_features(classifier, torch.arange(len(classifier.known)))
    features = every_class[classes]
    x, targets = F.normalize(embeds.detach().double().cpu(), dim=-1), torch.searchsorted(classes, labels)
    weight = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight], max_iter=max_iter, line_search_fn="strong_wolfe")

    def total(w: torch.Tensor) -> torch.Tensor:
        loss = refit_loss(w, bias, features, x, targets, scale)
        if reference is not None:
            loss = loss + reference.weight * reference.loss(w, bias, every_class)
        return loss

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = total(weight)
        loss.backward()
        return loss

    with torch.no_grad():
        before = float(total(start))
    optimizer.step(closure)
    with torch.no_grad():
        after = float(total(weight))
        if not torch.isfinite(weight).all() or not math.isfinite(after):
            raise ValueError(f"the re-fit at scale {scale} ended non-finite; the text projection was left as it was")
        parameter.copy_(weight.to(parameter.device, parameter.dtype))
    change = float((weight.detach() - start).norm() / start.norm())
    return {"refit_loss_before": before, "refit_loss_after": after, "refit_weight_change": change}


class TextProjectionRefit:
    """The re-fit after each task, as :class:`~pegp_hf.multimodal.prototypes.PrototypeReplayObjective` runs it on
    its stored embeddings (``refit=``).

    Args:
        scale: the scale ``s`` of the cosine in ``L(W)`` (> 0).
        reference: image rows (``pixel_values``, ``label``) on which the re-fit keeps what the pre-trained model said
            about every class (module docstring); ``None``: no reference term.
        reference_weight: the reference term's factor (> 0).
        max_iter: L-BFGS iterations per re-fit.
        reference_loss: ``"kl"`` keeps the pre-trained probabilities over every class's prompts (:class:`Distillation`),
            ``"margin"`` its prompt-ensembled decisions by ``margin`` (:class:`DecisionMargin`).
        margin: ``delta`` of the margin term, in cosine (>= 0).

    ``teacher`` is what the pre-trained model said, taken before the first task: probabilities ``(R, C_all * K)``
    under ``"kl"``, class ids ``(R,)`` under ``"margin"``.
    """

    def __init__(
        self,
        scale: float,
        reference: Dataset | None = None,
        reference_weight: float = 10.0,
        max_iter: int = 200,
        reference_loss: str = "kl",
        margin: float = 0.05,
    ) -> None:
        if not scale > 0 or not reference_weight > 0 or max_iter < 1:
            raise ValueError(f"the re-fit needs scale > 0, reference_weight > 0 and max_iter >= 1, got {scale}, "
                             f"{reference_weight} and {max_iter}")  # fmt: skip
        if reference_loss not in REFERENCE_LOSSES or not margin >= 0:
            raise ValueError(f"the re-fit's reference_loss is one of {REFERENCE_LOSSES} and its margin >= 0, got "
                             f"{reference_loss!r} and {margin}")  # fmt: skip
        if reference is not None and not len(reference):
            raise ValueError("the re-fit's reference set is empty: pass image rows, or reference=None")
        if reference is None and reference_loss == "margin":
            raise ValueError("reference_loss='margin' keeps decisions on reference images: pass a reference set")
        self.scale, self.reference, self.reference_weight, self.max_iter = scale, reference, reference_weight, max_iter
        self.reference_loss, self.margin = reference_loss, margin
        self.teacher: torch.Tensor | None = None  # taken before the first task
        self._fingerprint: str | None = None

    def config(self) -> dict[str, Any]:
        """The settings a resume must match, the reference set's rows and content (sha256 of its pixels) included."""
        rows = None if self.reference is None else len(self.reference)
        if self.reference is not None and self._fingerprint is None:
            digest = hashlib.sha256()
            for row in self.reference:
                digest.update(np.ascontiguousarray(np.asarray(row["pixel_values"], dtype=np.float32)).tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        config = {"scale": self.scale, "reference_rows": rows, "reference_sha256": self._fingerprint,
                  "reference_weight": self.reference_weight, "max_iter": self.max_iter}  # fmt: skip
        if self.reference_loss == "margin":  # the KL's config is as before the margin term existed
            config.update(reference_loss="margin", margin=self.margin)
        return config

    def check(self, classifier: CLIPForClassNameClassification, args: PEGPTrainingArguments) -> None:
        """``TypeError`` without a text projection saved with the adapter (PEFT's ``modules_to_save`` copy, as
        :func:`~pegp_hf.multimodal.clip.get_clip_pet_model` makes it); ``ValueError`` under FSDP / DeepSpeed, which
        shard or mirror it."""
        if not hasattr(text_projection(classifier), "modules_to_save"):
            raise TypeError("the re-fit writes the text projection, so it must be saved with the adapter: make it a "
                            "PEFT modules_to_save copy (get_clip_pet_model does)")  # fmt: skip
        flags = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
        if args.fsdp or args.deepspeed or any(parse_flag_from_env(flag) for flag in flags):
            raise ValueError("the text projection's re-fit writes the whole weight on every process: run it on one "
                             "process or under DDP, not FSDP / DeepSpeed (or train without refit)")  # fmt: skip

    def _reference_now(
        self, trainer: ContinualPEGPTrainer, classifier: CLIPForClassNameClassification
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference images' embeddings ``(R, D)`` and every class's prompt embeddings ``(C_all, K, D)``, as the
        model gives them now (float64, CPU)."""
        embeds = image_embeddings(trainer, self.reference)[0].double()
        features = prompt_features(classifier, torch.arange(len(classifier.known)))
        return embeds, projected(features, *projection_weights(classifier))

    def reference_probabilities(
        self, trainer: ContinualPEGPTrainer, classifier: CLIPForClassNameClassification
    ) -> torch.Tensor:
        """``(R, C_all * K)``: the reference images' probabilities over every class's prompts as the model gives
        them now, at its logit scale (float64, CPU)."""
        embeds, prompts = self._reference_now(trainer, classifier)
        return torch.softmax(float(classifier.clip.logit_scale.exp()) * embeds @ prompts.flatten(0, 1).T, dim=1)

    def reference_decisions(
        self, trainer: ContinualPEGPTrainer, classifier: CLIPForClassNameClassification
    ) -> torch.Tensor:
        """``(R,)``: the class the model now gives each reference image, prompt-ensembled, among every class (as
        zero-shot classification decides)."""
        embeds, prompts = self._reference_now(trainer, classifier)
        return (embeds @ ensemble_prompts(prompts).T).argmax(dim=1)

    def remember_teacher(self, trainer: ContinualPEGPTrainer, classifier: CLIPForClassNameClassification) -> None:
        """Before the first task: take ``teacher`` on the reference images (nothing without a reference set), the
        main process's on every process."""
        if self.reference is not None:
            take = self.reference_probabilities if self.reference_loss == "kl" else self.reference_decisions
            self.teacher = broadcast_object_list([take(trainer, classifier)])[0]

    def __call__(
        self, trainer: ContinualPEGPTrainer, classifier: CLIPForClassNameClassification, memory: FeatureMemory
    ) -> dict[str, float]:
        """Re-fit on every stored embedding of ``memory`` (and the reference term); the figures of
        :func:`refit_text_projection`."""
        reference = None
        if self.reference is not None:
            if self.teacher is None:
                raise RuntimeError("the re-fit's reference outputs were not taken before the first task")
            embeds, logit_scale = image_embeddings(trainer, self.reference)[0].double(), classifier.clip.logit_scale
            if self.reference_loss == "kl":
                reference = Distillation(embeds, self.teacher, float(logit_scale.exp()), self.reference_weight)
            else:
                reference = DecisionMargin(embeds, self.teacher, float(logit_scale.exp()), self.margin,
                                           self.reference_weight)  # fmt: skip
        figures = refit_text_projection(classifier, memory.features, memory.labels, self.scale, reference,
                                        self.max_iter)  # fmt: skip
        weight = text_projection(classifier).weight
        with torch.no_grad():  # the main process's bits on every process (BLAS may differ across machines)
            weight.copy_(broadcast_object_list([weight.detach().cpu()])[0].to(weight.device))
        return figures

    def save(self, path: str | os.PathLike) -> None:
        if self.teacher is not None:
            save_file({"teacher": self.teacher.contiguous()}, str(path))

    def read_like(self, path: str | os.PathLike, classifier: CLIPForClassNameClassification) -> torch.Tensor | None:
        """The stored ``teacher`` for this reference set, reference loss and classifier (``None`` without a
        reference set); ``CheckpointError`` if it is missing or broken, of another shape, or holds no probabilities
        (``"kl"``) or no class ids of this classifier (``"margin"``)."""
        if self.reference is None:
            return None
        rows, classes = len(self.reference), len(classifier.known)
        teacher = read_safetensors(path).get("teacher")
        if self.reference_loss == "kl":
            shape = (rows, classes * len(classifier.templates))
            fits = teacher is not None and tuple(teacher.shape) == shape and teacher.is_floating_point()
            fits = fits and torch.allclose(teacher.sum(1), teacher.new_ones(1))
            what = f"the reference probabilities {shape}"
        else:
            fits = teacher is not None and tuple(teacher.shape) == (rows,) and teacher.dtype == torch.int64
            fits = fits and bool(((teacher >= 0) & (teacher < classes)).all())
            what = f"the reference decisions ({rows},) among {classes} classes"
        if not fits:
            raise CheckpointError(f"{path} does not hold {what} this re-fit needs")
        return teacher
