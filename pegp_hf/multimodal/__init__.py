"""CLIP-style dual encoders: the class-name classifier and its task-level class reveal
(:mod:`~pegp_hf.multimodal.clip`), replay of old-class image prototypes (:mod:`~pegp_hf.multimodal.prototypes`),
cross-modal measures (:mod:`~pegp_hf.multimodal.crossmodal`), the alignment stage
(:mod:`~pegp_hf.multimodal.alignment`) and template captions (:mod:`~pegp_hf.multimodal.captions`)."""

from pegp_hf.multimodal.alignment import align_projections, label_aware_contrastive_loss
from pegp_hf.multimodal.captions import DIGIT_NAMES, DIGIT_TEMPLATES, add_template_captions
from pegp_hf.multimodal.clip import (
    DEFAULT_TEMPLATES,
    CLIPClassNameOutput,
    CLIPForClassNameClassification,
    RevealSeenClasses,
    ensemble_prompts,
    get_clip_pet_model,
)
from pegp_hf.multimodal.crossmodal import CrossModalEvaluator, ZeroShotSet
from pegp_hf.multimodal.prototypes import PrototypeReplayObjective

__all__ = [
    "DEFAULT_TEMPLATES",
    "DIGIT_NAMES",
    "DIGIT_TEMPLATES",
    "CLIPClassNameOutput",
    "CLIPForClassNameClassification",
    "CrossModalEvaluator",
    "PrototypeReplayObjective",
    "RevealSeenClasses",
    "ZeroShotSet",
    "add_template_captions",
    "align_projections",
    "ensemble_prompts",
    "get_clip_pet_model",
    "label_aware_contrastive_loss",
]
