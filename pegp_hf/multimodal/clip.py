"""CLIP as a continual classifier: image embeddings against the text embeddings of class-name prompts.

:class:`CLIPForClassNameClassification` wraps a dual encoder (``transformers.CLIPModel``,
``VisionTextDualEncoderModel``, or anything with ``get_image_features`` / ``get_text_features`` and a
``logit_scale``) and a tokenizer. Each class ``c`` is described by its name in ``K`` templates ("a photo of a
{}."); its text embedding is the normalised mean of the ``K`` normalised prompt embeddings (CLIP's prompt
ensembling), computed at every forward pass, so PET on the text tower moves it. The logits are
``logit_scale.exp() * image_embeds @ class_embeds.T`` ``(batch, num_classes)``: the class-name-text classification of
CLIP's zero-shot protocol, trained with the trainer's cross-entropy.

Only the classes made known with :meth:`~CLIPForClassNameClassification.reveal_classes` are encoded in the
classifier; the others get the lowest logit. :class:`RevealSeenClasses`, a task-level callback, reveals the classes
seen so far at the start of each task, so a future class name never reaches a gradient or the features the PEGP
bases are grown from.

:func:`get_clip_pet_model` puts any registered PET on the image tower, the text tower or both.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from pegp_hf.continual.callbacks import ContinualCallback
from pegp_hf.tuners.factory import get_pet_model

DEFAULT_TEMPLATES = (  # a few of CLIP's ImageNet prompts
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a drawing of a {}.",
    "a close-up photo of a {}.",
    "an image of a {}.",
)


def ensemble_prompts(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP's prompt ensembling: ``(C, K, D)`` normalised prompt embeddings -> ``(C, D)``, the normalised mean over the
    ``K`` templates of each class."""
    return F.normalize(prompt_embeds.mean(dim=1), dim=-1)


@dataclass
class CLIPClassNameOutput(ModelOutput):
    """``logits`` ``(B, C)`` for ``pixel_values``; ``image_embeds`` ``(B, D)`` and ``text_embeds`` ``(M, D)``
    (L2-normalised) for ``pixel_values`` / ``input_ids``; with the logits, the ``class_embeds`` ``(C, D)`` and the
    ``logit_scale`` (a scalar, already exponentiated) they were computed from."""

    logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    class_embeds: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


class CLIPForClassNameClassification(nn.Module):
    """A dual encoder that classifies images among class-name prompts (see the module docstring).

    Args:
        dual_encoder: ``CLIPModel`` / ``VisionTextDualEncoderModel`` (registered as ``self.clip``, so PET and
            ``layers_pattern="vision_model"`` / ``"text_model"`` find its towers).
        tokenizer: the text tower's tokenizer.
        class_names: one name per label id; the label ids of the task sequence index this list.
        templates: ``K`` prompt templates with one ``{}`` for the class name.
    """

    base_model_prefix = "clip"  # read by PEFT (transformers' weight-conversion lookup), as on a PreTrainedModel

    def __init__(
        self,
        dual_encoder: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        class_names: Sequence[str],
        templates: Sequence[str] = DEFAULT_TEMPLATES,
    ) -> None:
        super().__init__()
        if not class_names:
            raise ValueError("class_names is empty: the classifier needs one name per label id")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names has duplicates: {list(class_names)}")
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"templates must be non-empty and hold exactly one '{{}}' each; wrong: {bad}")
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(dual_encoder, method):
                raise TypeError(f"{type(dual_encoder).__name__} has no {method}: pass a CLIP-style dual encoder")
        self.clip = dual_encoder
        self.tokenizer = tokenizer
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.config = copy.deepcopy(dual_encoder.config)  # the wrapper's labels, without touching the encoder's
        self.config.id2label = dict(enumerate(self.class_names))
        self.config.label2id = {name: index for index, name in enumerate(self.class_names)}
        prompts = self.tokenize([t.format(name) for name in self.class_names for t in self.templates])
        count, length = len(self.class_names), prompts["input_ids"].shape[1]
        for key, value in prompts.items():  # (C, K, L): moved with the model, not saved
            self.register_buffer(f"class_{key}", value.view(count, len(self.templates), length), persistent=False)
        self.register_buffer("known", torch.zeros(count, dtype=torch.bool), persistent=False)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them), ``(M, L)``."""
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt"))

    def reveal_classes(self, classes: Sequence[int]) -> None:
        """Encode ``classes`` (label ids) from now on; every other class gets the lowest logit."""
        known = torch.zeros_like(self.known)
        known[list(classes)] = True
        self.known.copy_(known)

    def class_embeddings(self) -> torch.Tensor:
        """``(C, D)``: the prompt-ensembled, normalised text embedding of each known class; zero rows elsewhere."""
        index = self.known.nonzero().squeeze(1)
        embeds = ensemble_prompts(
            self.encode_text(**self.prompt_inputs(index)).view(len(index), len(self.templates), -1)
        )
        return embeds.new_zeros(len(self.class_names), embeds.shape[1]).index_copy(0, index, embeds)

    def prompt_inputs(self, classes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tokenised prompts of ``classes`` (label ids ``(C,)``), class by class and template by template:
        ``(C * K, L)`` per key, row ``c * K + k`` the ``k``-th template of ``classes[c]``."""
        buffers = [(name, buffer) for name, buffer in self.named_buffers(recurse=False) if name != "known"]
        return {name.removeprefix("class_"): buffer[classes].flatten(0, 1) for name, buffer in buffers}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, D)`` normalised image embeddings."""
        return F.normalize(self.clip.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)

    def encode_text(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Tokenised text ``(M, L)`` -> ``(M, D)`` normalised text embeddings."""
        return F.normalize(self.clip.get_text_features(**inputs).pooler_output, dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        class_logits: bool = True,
    ) -> CLIPClassNameOutput:
        """Embed the images and / or texts given; with images and ``class_logits``, also the logits over the
        known classes (``torch.finfo.min`` for the others). In eval mode with no class known yet (a reference set's
        pass before the first task), only the embeddings. Going through ``forward`` (not the ``encode_*``
        helpers) keeps FSDP / DDP wrappers in charge of the parameters."""
        if pixel_values is None and input_ids is None:
            raise ValueError("pass pixel_values, input_ids, or both")
        output = CLIPClassNameOutput()
        if input_ids is not None:
            text = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                text["token_type_ids"] = token_type_ids
            output.text_embeds = self.encode_text(**text)
        if pixel_values is not None:
            output.image_embeds = self.encode_image(pixel_values)
            if class_logits and (self.training or self.known.any()):
                if not self.known.any():
                    raise RuntimeError(
                        "no class is known yet: call reveal_classes(label ids) first, or train with "
                        "ContinualPEGPTrainer(callbacks=[pegp_hf.multimodal.RevealSeenClasses()])"
                    )
                output.class_embeds = self.class_embeddings().to(output.image_embeds.dtype)
                output.logit_scale = self.clip.logit_scale.exp()
                logits = output.logit_scale * output.image_embeds @ output.class_embeds.T
                output.logits = logits.masked_fill(~self.known, torch.finfo(logits.dtype).min)
        return output


class RevealSeenClasses(ContinualCallback):
    """At the start of each task, reveal every class seen so far to the trained
    :class:`CLIPForClassNameClassification` (inside a ``PeftModel`` or not): the class-name classifier then covers
    the task's classes and the old ones, never a future one."""

    def on_task_begin(self, args, state, control, model: nn.Module, tasks: Any, task_index: int, **kwargs) -> None:
        classifier = next((m for m in model.modules() if isinstance(m, CLIPForClassNameClassification)), None)
        if classifier is None:
            raise TypeError("RevealSeenClasses needs a model holding a CLIPForClassNameClassification")
        classifier.reveal_classes(tasks.seen_classes(task_index))


TOWERS = {"vision": "vision_model", "text": "text_model", "both": None}
PROJECTIONS = ("visual_projection", "text_projection")


def get_clip_pet_model(
    classifier: CLIPForClassNameClassification, pet: str, towers: str = "both", **options: Any
) -> nn.Module:
    """``classifier`` with PET ``pet`` (any registered method, :func:`~pegp_hf.tuners.get_pet_model`) on the chosen
    ``towers`` (``vision``, ``text`` or ``both``). The two projections ride along as frozen ``modules_to_save``:
    every checkpoint and Hub commit then holds the aligned joint space next to the adapter, and a resume loads it
    from there. Prompts on the text tower overwrite placeholder tokens (``insert=False``) unless told otherwise.

    Args:
        **options: ``width``, ``layers``, ``target_modules`` and any field of the method's config.
    """
    if towers not in TOWERS:
        raise ValueError(f"towers must be one of {list(TOWERS)}, not {towers!r}")
    if pet == "prompt" and towers == "text":
        options.setdefault("insert", False)
    model = get_pet_model(classifier, pet, modules_to_save=PROJECTIONS, layers_pattern=TOWERS[towers], **options)
    for name, parameter in model.named_parameters():
        if any(projection in name for projection in PROJECTIONS):
            parameter.requires_grad_(False)
    return model
