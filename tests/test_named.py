"""Benchmarks by name: the literature's class orders and splits, on local stand-ins for the Hub copies (this machine
has no network), and a clear error when a data set cannot be loaded."""

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from pegp_hf.continual.named import TEXT_ORDERS, five_datasets_text, named_image_tasks, pilot_class_order


def fake_loader(tables):
    def load(path, split=None):
        if (path, split) not in tables:
            raise FileNotFoundError(f"no {path} {split}")
        return tables[path, split]

    return load


def images(num_classes, per_class, label_column="fine_label", names=None):
    labels = np.repeat(np.arange(num_classes), per_class)
    values = [names[i] for i in labels] if names else labels.tolist()
    return Dataset.from_dict({"img": [[float(i)] for i in range(len(labels))], label_column: values})


def test_split_cifar100_uses_the_pilot_class_order():
    np.random.seed(1993)
    expected = np.random.permutation(100).tolist()  # PyCIL / LAMDA-PILOT's own call
    assert pilot_class_order(100) == expected
    load = fake_loader({("uoft-cs/cifar100", "train"): images(100, 3), ("uoft-cs/cifar100", "test"): images(100, 1)})
    tasks = named_image_tasks("split_cifar100", load=load)
    assert len(tasks) == 10
    for index, task in enumerate(tasks):
        assert list(task.classes) == sorted(expected[10 * index : 10 * (index + 1)])
        assert len(task.train) == 30 and len(task.test) == 10


def test_imagenet_r_is_split_80_20_per_class_from_its_single_split():
    wnids = [f"n{i:08d}" for i in range(200)]
    whole = images(200, 10, label_column="wnid", names=wnids[::-1])  # class 0 of the data is the last wnid
    tasks = named_image_tasks("imagenet_r", load=fake_loader({("axiong/imagenet-r", "test"): whole}))
    assert len(tasks) == 10 and all(len(task.classes) == 20 for task in tasks)
    train = np.concatenate([np.asarray(task.train["label"]) for task in tasks])
    test = np.concatenate([np.asarray(task.test["label"]) for task in tasks])
    assert np.bincount(train, minlength=200).tolist() == [8] * 200 and np.bincount(test).tolist() == [2] * 200
    seen = {row[0] for task in tasks for row in task.train["img"]} & {
        row[0] for task in tasks for row in task.test["img"]
    }
    assert not seen  # no image in both
    assert list(tasks[0].classes) == sorted(pilot_class_order(200)[:20])


def text_tables():
    tables = {}
    sizes = {"ag_news": 4, "yelp": 5, "amazon": 5, "dbpedia": 14, "yahoo": 10}
    columns = {"ag_news": ["text"], "yelp": ["text"], "amazon": ["title", "content"], "dbpedia": ["title", "content"],
               "yahoo": ["question_title", "question_content", "best_answer"]}  # fmt: skip
    paths = {}
    for name, classes in sizes.items():
        label = "topic" if name == "yahoo" else "label"
        for split in ("train", "test"):
            rows = {c: [f"{name} {c} {i}" for i in range(2 * classes)] for c in columns[name]}
            rows[label] = [i % classes for i in range(2 * classes)]
            features = Features({**{c: Value("string") for c in columns[name]}, label: ClassLabel(num_classes=classes)})
            tables[f"local/{name}", split] = Dataset.from_dict(rows, features=features)
        paths[name] = f"local/{name}"
    return tables, paths


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_five_datasets_text_follows_the_mbpa_orders_with_disjoint_labels(order):
    tables, paths = text_tables()
    tasks = five_datasets_text(order=order, paths=paths, load=fake_loader(tables))
    assert tuple(task.name for task in tasks) == TEXT_ORDERS[order - 1]
    ranges = {"ag_news": range(0, 4), "yelp": range(4, 9), "amazon": range(9, 14), "dbpedia": range(14, 28),
              "yahoo": range(28, 38)}  # fmt: skip
    for task in tasks:
        assert list(task.classes) == list(ranges[task.name])
        assert set(task.train["label"]) == set(ranges[task.name])
    amazon = next(task for task in tasks if task.name == "amazon")
    assert amazon.train[0]["text"] == "amazon title 0 amazon content 0"


def test_a_data_set_that_cannot_be_loaded_is_named_with_the_fix():
    with pytest.raises(ValueError, match=r"could not load the data set 'uoft-cs/cifar100'.*pass its folder as path="):
        named_image_tasks("split_cifar100", load=fake_loader({}))
    with pytest.raises(ValueError, match="unknown image benchmark 'cifar'"):
        named_image_tasks("cifar")
    with pytest.raises(ValueError, match="order must be 1-4"):
        five_datasets_text(order=5)


def test_string_labels_of_a_two_split_copy_get_the_train_splits_ids():
    def split(names):
        return Dataset.from_dict({"img": [[float(i)] for i in range(len(names))], "fine_label": names, "tag": names})

    names = [f"c{i:03d}" for i in range(100)]
    train = split([name for name in names[::-1] for _ in range(2)])
    test = split(names[1::2] + names[::2])  # another row order, so ids taken from the test split alone would differ
    tasks = named_image_tasks("split_cifar100", load=fake_loader({("uoft-cs/cifar100", "train"): train,
                                                                  ("uoft-cs/cifar100", "test"): test}))  # fmt: skip
    for task in tasks:
        for part in (task.train, task.test):
            for row in part:
                assert row["tag"] == names[row["label"]]  # id = index in the train split's sorted names
