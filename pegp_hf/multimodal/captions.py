"""Captions for labelled images that have none: each image's class name in a prompt template."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from datasets import Dataset

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a drawing of a {}.",
    "an image of the numeral {}.",
)


def add_template_captions(
    split: Dataset, class_names: Sequence[str], templates: Sequence[str], seed: int, label_column: str = "label"
) -> Dataset:
    """``split`` with a ``caption`` column: each row's class name in one of ``templates`` drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.with_format(None)[label_column])
    picks = rng.integers(len(templates), size=len(labels))
    captions = [templates[k].format(class_names[y]) for k, y in zip(picks, labels, strict=True)]
    return split.add_column("caption", captions)
