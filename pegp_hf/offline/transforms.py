"""Turning images into what a model takes, as ``datasets.Dataset.with_transform`` functions, with no image processor
to download: the embedded grey images (``(1, h, w)`` in ``[-1, 1]``, :mod:`pegp_hf.offline.datasets`) for a
pretrained RGB model, and the images of any local or Hub data set (:func:`images_to_pixel_values`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[dict[str, list]], dict[str, Any]]


def grey_to_rgb(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Transform:
    """Grey ``[-1, 1]`` ``(1, h, w)`` rows -> RGB ``(3, image_size, image_size)`` resized bilinearly and normalised
    with ``mean`` / ``std``; other columns are kept (also when a column alone is read, as ``dataset["label"]``).
    Images of several sizes may share a batch."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        out = dict(batch)
        if "pixel_values" in batch:
            greys = [torch.as_tensor(np.asarray(x, dtype=np.float32))[None] for x in batch["pixel_values"]]
            rgb = [F.interpolate((g + 1).repeat(1, 3, 1, 1) / 2, size=image_size, mode="bilinear") for g in greys]
            out["pixel_values"] = (torch.cat(rgb) - mean_t) / std_t
        return out

    return transform


def grey_to_processor_input(processor: Any) -> Transform:
    """Grey ``[-1, 1]`` ``(1, h, w)`` rows -> RGB ``uint8`` images -> ``processor`` (a pretrained model's image
    processor); ``label`` is kept."""

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        rgb = [
            np.repeat(((np.asarray(x)[0] + 1) * 127.5).astype(np.uint8)[..., None], 3, -1)
            for x in batch["pixel_values"]
        ]
        return {**processor(rgb, return_tensors="pt"), "label": batch["label"]}

    return transform


def images_to_pixel_values(
    image_column: str,
    label_column: str,
    image_size: int,
    channels: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Transform:
    """Images of ``image_column`` (PIL images of any mode, or ``uint8`` arrays) -> ``pixel_values``
    ``(channels, image_size, image_size)``: converted to RGB (``channels=3``) or grey (1), resized bilinearly, scaled
    to ``[0, 1]`` and normalised with ``mean`` / ``std``; ``label`` from ``label_column``. Nothing is downloaded."""
    from PIL import Image

    if channels not in (1, 3) or len(mean) != channels or len(std) != channels:
        raise ValueError(f"channels must be 1 or 3 with as many means and stds, got {channels}, {mean}, {std}")
    mean_t, std_t = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        pixels = []
        for image in batch[image_column]:
            image = image if hasattr(image, "convert") else Image.fromarray(np.asarray(image, dtype=np.uint8))
            image = image.convert("RGB" if channels == 3 else "L").resize((image_size, image_size), Image.BILINEAR)
            array = torch.as_tensor(np.asarray(image, dtype=np.float32) / 255.0)
            pixels.append(array.permute(2, 0, 1) if channels == 3 else array[None])
        return {"pixel_values": (torch.stack(pixels) - mean_t) / std_t, "label": batch[label_column]}

    return transform
