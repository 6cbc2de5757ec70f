"""Cross-modal measurements of a continual CLIP after each task: matching, zero-shot retention, hallucination.

For the seen tasks' test pairs (image, caption; a caption names its image's class), with every embedding
L2-normalised and similarity the dot product:

- ``image_to_text`` ``A[i, t]``: share of task ``i``'s images whose most similar caption, among the distinct captions
  of every seen task's test set, names the image's class.
- ``text_to_image`` ``A[i, t]``: for each distinct caption of task ``i``, the R-precision of retrieving images from
  the test images of every seen task (R = the number of images of the caption's class there), averaged.
- ``zero_shot_acc``: accuracy on a held-out set never trained on (its own class names, the model's templates;
  classes compete among themselves), before the sequence and after each task; ``zero_shot_drop`` = before - now.
- ``hallucination_rate``: share of old-task images (tasks before ``t``) whose best-matching caption names a class
  absent from the image (``None`` after task 1: nothing old yet).
- ``false_match_rate``: share of mismatched old pairs (an old image, a caption of another seen class) whose
  similarity reaches ``match_threshold``, the threshold that accepts ``acceptance`` (95%) of task 1's matched test
  pairs right after task 1 (kept for the whole sequence; ``None`` after task 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import Dataset

from pegp_hf.continual.evaluators import ContinualEvaluator, Evaluation
from pegp_hf.multimodal.clip import ensemble_prompts

if TYPE_CHECKING:
    from pegp_hf.trainer import ContinualPEGPTrainer


def image_to_text_accuracy(
    image_embeds: torch.Tensor, labels: torch.Tensor, caption_embeds: torch.Tensor, caption_labels: torch.Tensor
) -> float:
    """Percent of images ``(N, D)`` whose most similar caption ``(M, D)`` has the image's label."""
    best = (image_embeds @ caption_embeds.T).argmax(dim=1)
    return float(100.0 * (caption_labels[best] == labels).float().mean())


def text_to_image_precision(
    caption_embeds: torch.Tensor, caption_labels: torch.Tensor, image_embeds: torch.Tensor, labels: torch.Tensor
) -> float:
    """Mean R-precision (percent) of captions ``(M, D)`` retrieving images ``(N, D)``: the share of each caption's
    ``R`` most similar images that have its label, ``R`` = the images with that label (at least 1)."""
    order = (caption_embeds @ image_embeds.T).argsort(dim=1, descending=True)
    scores = []
    for row, label in zip(order, caption_labels, strict=True):
        relevant = int((labels == label).sum())
        if relevant:
            scores.append(float((labels[row[:relevant]] == label).float().mean()))
    return 100.0 * float(np.mean(scores)) if scores else float("nan")


def false_match_rate(
    image_embeds: torch.Tensor,
    labels: torch.Tensor,
    caption_embeds: torch.Tensor,
    caption_labels: torch.Tensor,
    threshold: float,
) -> float:
    """Percent of mismatched pairs of images ``(N, D)`` and captions ``(M, D)`` (labels ``(N,)`` and ``(M,)``
    differing) whose similarity is at least ``threshold``."""
    mismatched = labels[:, None] != caption_labels[None, :]
    accepted = (image_embeds @ caption_embeds.T) >= threshold
    return float(100.0 * (accepted & mismatched).sum() / mismatched.sum().clamp_min(1))


@torch.no_grad()
def image_embeddings(trainer: ContinualPEGPTrainer, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D)`` image embeddings and ``(N,)`` labels of ``dataset`` (rows with ``pixel_values`` and ``label``) by
    ``trainer.model`` in eval mode, float32 on the CPU, gathered over processes in the rows' order: every process
    gets all of them."""
    trainer.model.eval()
    embeds, labels = [], []
    for inputs in trainer.get_eval_dataloader(dataset):
        pixels = inputs["pixel_values"].to(trainer.args.device)
        with trainer.autocast_smart_context_manager():
            batch = trainer.model(pixel_values=pixels, class_logits=False)["image_embeds"]
        batch, batch_labels = trainer.accelerator.gather_for_metrics((batch, inputs["labels"].to(pixels.device)))
        embeds.append(batch.float().cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(embeds), torch.cat(labels)


@dataclass
class ZeroShotSet:
    """A held-out image set never trained on: ``dataset`` rows give ``pixel_values`` and ``label`` (an index into
    ``class_names``)."""

    dataset: Dataset
    class_names: Sequence[str]
    name: str = "zero-shot"


class CrossModalEvaluator(ContinualEvaluator):
    """The measurements of the module docstring, for a
    :class:`~pegp_hf.multimodal.clip.CLIPForClassNameClassification`
    (possibly inside a ``PeftModel``) whose tasks' test sets have a ``caption_column``.

    Args:
        caption_column: the column of the test sets holding each image's caption.
        zero_shot: the held-out set, or ``None`` for no zero-shot figures.
        acceptance: share of task 1's matched pairs the match threshold accepts.
    """

    matrices = ("image_to_text", "text_to_image")

    def __init__(
        self, caption_column: str = "caption", zero_shot: ZeroShotSet | None = None, acceptance: float = 0.95
    ) -> None:
        if not 0.0 < acceptance < 1.0:
            raise ValueError(f"acceptance must be in (0, 1), got {acceptance}")
        self.caption_column = caption_column
        self.zero_shot = zero_shot
        self.acceptance = acceptance

    # ---- embeddings ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _texts(self, trainer: ContinualPEGPTrainer, texts: Sequence[str]) -> torch.Tensor:
        """``(M, D)`` text embeddings on CPU; every process encodes all of them (they are few)."""
        trainer.model.eval()
        embeds = []
        size = trainer.args.per_device_eval_batch_size
        for start in range(0, len(texts), size):
            tokens = trainer.model.tokenize(texts[start : start + size])
            tokens = {key: value.to(trainer.args.device) for key, value in tokens.items()}
            with trainer.autocast_smart_context_manager():
                embeds.append(trainer.model(**tokens)["text_embeds"].float().cpu())
        return torch.cat(embeds)

    def _captions(self, dataset: Dataset) -> list[str]:
        if self.caption_column not in dataset.column_names:
            raise ValueError(f"a test set has no {self.caption_column!r} column: {dataset.column_names}")
        return list(dataset.with_format(None)[self.caption_column])

    # ---- the hooks -----------------------------------------------------------------------------------------------

    def _zero_shot_accuracy(self, trainer: ContinualPEGPTrainer) -> dict[str, float]:
        if self.zero_shot is None:
            return {}
        templates = trainer.model.templates
        prompts = [template.format(name) for name in self.zero_shot.class_names for template in templates]
        classes = ensemble_prompts(
            self._texts(trainer, prompts).view(len(self.zero_shot.class_names), len(templates), -1)
        )
        images, labels = image_embeddings(trainer, self.zero_shot.dataset)
        return {"zero_shot_acc": image_to_text_accuracy(images, labels, classes, torch.arange(len(classes)))}

    def before_sequence(self, trainer: ContinualPEGPTrainer) -> dict[str, float]:
        return self._zero_shot_accuracy(trainer)

    def after_task(self, trainer: ContinualPEGPTrainer, index: int) -> Evaluation:
        seen = trainer.tasks[: index + 1]
        embeds = [image_embeddings(trainer, task.test) for task in seen]
        captions = [self._captions(task.test) for task in seen]
        caption_label: dict[str, int] = {}
        for task_captions, (_, labels) in zip(captions, embeds, strict=True):
            for caption, label in zip(task_captions, labels.tolist(), strict=True):
                if caption_label.setdefault(caption, label) != label:
                    raise ValueError(f"caption {caption!r} is paired with classes {caption_label[caption]} and {label}")
        pool = sorted(caption_label)
        row_of = {caption: row for row, caption in enumerate(pool)}
        pool_embeds = self._texts(trainer, pool)
        pool_labels = torch.tensor([caption_label[c] for c in pool])
        all_images = torch.cat([images for images, _ in embeds])
        all_labels = torch.cat([labels for _, labels in embeds])
        image_to_text, text_to_image = [], []
        for (images, labels), task_captions in zip(embeds, captions, strict=True):
            image_to_text.append(image_to_text_accuracy(images, labels, pool_embeds, pool_labels))
            rows = torch.tensor([row_of[c] for c in sorted(set(task_captions))])
            text_to_image.append(text_to_image_precision(pool_embeds[rows], pool_labels[rows], all_images, all_labels))

        scalars: dict[str, Any] = self._zero_shot_accuracy(trainer)
        initial = trainer.results.initial_metrics
        if "zero_shot_acc" in scalars and "zero_shot_acc" in initial:
            scalars["zero_shot_drop"] = initial["zero_shot_acc"] - scalars["zero_shot_acc"]
        if index == 0:
            images, labels = embeds[0]
            own = pool_embeds[torch.tensor([row_of[c] for c in captions[0]])]
            threshold = float(torch.quantile((images * own).sum(dim=1), 1.0 - self.acceptance))
            scalars.update(match_threshold=threshold, hallucination_rate=None, false_match_rate=None)
        else:
            threshold = trainer.results.task_metrics[0]["match_threshold"]
            old_images = torch.cat([images for images, _ in embeds[:index]])
            old_labels = torch.cat([labels for _, labels in embeds[:index]])
            scalars["match_threshold"] = threshold
            scalars["hallucination_rate"] = 100.0 - image_to_text_accuracy(
                old_images, old_labels, pool_embeds, pool_labels
            )
            scalars["false_match_rate"] = false_match_rate(old_images, old_labels, pool_embeds, pool_labels, threshold)
        return Evaluation({"image_to_text": image_to_text, "text_to_image": text_to_image}, scalars)
