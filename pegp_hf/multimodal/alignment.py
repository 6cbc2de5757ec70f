"""A short contrastive stage that aligns a dual encoder's two projections on a base split, before any continual task.

A dual encoder assembled from separately pretrained towers (:func:`pegp_hf.offline.models.load_offline_dual_encoder`)
has no joint space yet: its zero-shot matching is at chance, so zero-shot retention would measure nothing. The
towers stay frozen; only ``visual_projection`` and ``text_projection`` learn, on the towers' pooled outputs (computed
once), with CLIP's symmetric contrastive loss where every pair of the same class counts as a positive (a batch of
digits holds many images of one class, which plain InfoNCE would push apart).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader

from pegp_hf.multimodal.clip import CLIPForClassNameClassification


@torch.no_grad()
def _pooled_outputs(
    classifier: CLIPForClassNameClassification, base: Dataset, caption_column: str, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The towers' pooled outputs before projection: images ``(N, d_v)``, their captions ``(N, d_t)``, labels
    ``(N,)``."""
    clip = classifier.clip
    images, labels = [], []
    for batch in DataLoader(base, batch_size=batch_size):
        images.append(clip.vision_model(pixel_values=batch["pixel_values"]).pooler_output)
        labels.append(torch.as_tensor(batch["label"]))
    captions = _column(base, caption_column)
    distinct = sorted(set(captions))
    texts = clip.text_model(**classifier.tokenize(distinct)).pooler_output
    row = {caption: i for i, caption in enumerate(distinct)}
    return torch.cat(images), texts[[row[c] for c in captions]], torch.cat(labels)


def _column(dataset: Dataset, column: str) -> list[Any]:
    """A plain column of ``dataset``, without running its format transform."""
    return dataset.with_format(None)[column]


def label_aware_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric cross-entropy between ``logit_scale * I T^T`` ``(B, B)`` (normalised ``(B, D)`` embeddings) and
    targets spread evenly over the same-class pairs (CLIP's loss when every label is distinct)."""
    logits = logit_scale * image_embeds @ text_embeds.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def align_projections(
    classifier: CLIPForClassNameClassification,
    base: Dataset,
    caption_column: str = "caption",
    epochs: int = 30,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Train ``classifier.clip``'s ``visual_projection`` and ``text_projection`` on ``base`` (rows with
    ``pixel_values``, ``label`` and ``caption_column``), towers and ``logit_scale`` frozen.

    Returns the record kept in the results: sample and class counts, epochs, learning rate, the loss of the first and
    last epoch, and the seconds taken.
    """
    if len(base) == 0:
        raise ValueError("the alignment base split is empty")
    if caption_column not in base.column_names:
        raise ValueError(f"the alignment base split has no {caption_column!r} column: {base.column_names}")
    start = time.perf_counter()
    clip = classifier.clip
    images, texts, labels = _pooled_outputs(classifier, base, caption_column, batch_size)
    projections = [clip.visual_projection, clip.text_projection]
    trainable = [p for projection in projections for p in projection.parameters()]
    was_trainable = [p.requires_grad for p in trainable]
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    scale = clip.logit_scale.detach().exp()
    losses = []
    for _ in range(epochs):
        total = 0.0
        for rows in torch.randperm(len(labels), generator=generator).split(batch_size):
            image_embeds = F.normalize(clip.visual_projection(images[rows]), dim=-1)
            text_embeds = F.normalize(clip.text_projection(texts[rows]), dim=-1)
            loss = label_aware_contrastive_loss(image_embeds, text_embeds, labels[rows], scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        losses.append(total / len(labels))
    for parameter, flag in zip(trainable, was_trainable, strict=True):
        parameter.requires_grad_(flag)
    return {
        "samples": len(labels),
        "classes": sorted(labels.unique().tolist()),
        "epochs": epochs,
        "learning_rate": learning_rate,
        "trained": ["visual_projection", "text_projection"],
        "first_epoch_loss": losses[0] if losses else None,
        "last_epoch_loss": losses[-1] if losses else None,
        "seconds": time.perf_counter() - start,
    }
