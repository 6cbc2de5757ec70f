"""Continual-learning benchmarks by name: task sequences over their Hub copies, with the literature's class orders.

- ``split_cifar100``: ``uoft-cs/cifar100`` (``img``, ``fine_label``), 10 tasks of 10 classes in iCaRL's order, as
  PyCIL / LAMDA-PILOT keep it: ``numpy.random.seed(1993); numpy.random.permutation(100)``.
- ``imagenet_r``: ``axiong/imagenet-r`` (one 30,000-image split, ``wnid``), cut 80 / 20 per class into train / test
  as L2P / CODA-Prompt do; 10 tasks of 20 classes in the seed-1993 order.
- ``cub200``: ``Donghyun99/CUB-200-2011`` (``image``, ``label``), 10 tasks of 20 classes in the seed-1993 order.
- ``five_datasets_text``: AG News, Yelp, Amazon, DBpedia and Yahoo Answers (Zhang et al. 2015), one task per data set
  in order 1-4 of de Masson d'Autume et al. ("Episodic Memory in Lifelong Language Learning", NeurIPS 2019).

Nothing is downloaded without the network: a data set that cannot be loaded raises a ``ValueError`` that names it
and says how to point at a local copy. The Hub ids are those we know of; they were not loaded on the machine that
wrote this module (no network), so ``path=`` / ``paths=`` take any copy with the named columns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, Features, Value

from pegp_hf.continual.tasks import ContinualTask, TaskSequence, class_incremental_tasks

PILOT_SEED = 1993  # iCaRL's class-order seed, kept by PyCIL and LAMDA-PILOT


@dataclass(frozen=True)
class ImageBenchmark:
    """An image benchmark: where its data live, which columns hold image and label, how it is split."""

    path: str
    image_column: str
    label_column: str
    num_tasks: int
    test_share: float | None = None  # a single split, cut per class into train / test with seed 0


IMAGE_BENCHMARKS = {
    "split_cifar100": ImageBenchmark("uoft-cs/cifar100", "img", "fine_label", 10),
    "imagenet_r": ImageBenchmark("axiong/imagenet-r", "image", "wnid", 10, test_share=0.2),
    "cub200": ImageBenchmark("Donghyun99/CUB-200-2011", "image", "label", 10),
}

# name -> (Hub copy, text columns joined with " ", label column), Zhang et al. (2015)'s five sets
TEXT_DATASETS = {
    "ag_news": ("fancyzhx/ag_news", ("text",), "label"),
    "yelp": ("Yelp/yelp_review_full", ("text",), "label"),
    "amazon": ("fancyzhx/amazon_review_full", ("title", "content"), "label"),
    "dbpedia": ("fancyzhx/dbpedia_14", ("title", "content"), "label"),
    "yahoo": ("community-datasets/yahoo_answers_topics", ("question_title", "question_content", "best_answer"),
              "topic"),
}  # fmt: skip
# de Masson d'Autume et al., "Episodic Memory in Lifelong Language Learning" (NeurIPS 2019), orders 1-4
TEXT_ORDERS = (
    ("yelp", "ag_news", "dbpedia", "amazon", "yahoo"),
    ("dbpedia", "yahoo", "ag_news", "amazon", "yelp"),
    ("yelp", "yahoo", "amazon", "dbpedia", "ag_news"),
    ("ag_news", "yelp", "amazon", "yahoo", "dbpedia"),
)


def pilot_class_order(num_classes: int) -> list[int]:
    """The class order of PyCIL / LAMDA-PILOT: ``numpy.random.seed(1993); numpy.random.permutation(num_classes)``."""
    return np.random.RandomState(PILOT_SEED).permutation(num_classes).tolist()


def _load(path: str, split: str | None, load: Callable[..., Dataset]) -> Dataset:
    try:
        return load(path, split=split) if split is not None else load(path)
    except Exception as error:  # offline, a wrong id or a missing split: say which data set and how to fix it
        raise ValueError(
            f"could not load the data set {path!r} (split {split!r}): {type(error).__name__}: {error}. Without the "
            "network, save a copy with datasets' save_to_disk / to_parquet elsewhere and pass its folder as path="
        ) from error


def named_image_tasks(
    name: str, path: str | None = None, num_tasks: int | None = None, load: Callable[..., Dataset] | None = None
) -> TaskSequence:
    """The class-incremental sequence of benchmark ``name`` (``IMAGE_BENCHMARKS``) with its standard class order.

    Args:
        path: another copy of the data set (Hub id or local folder) with the same columns (default: the Hub copy).
        num_tasks: overrides the benchmark's task count.
        load: ``datasets.load_dataset`` by default.

    Returns:
        Tasks whose rows keep the image column and carry an integer ``label`` (``wnid`` strings are mapped to ids in
        sorted order).
    """
    if name not in IMAGE_BENCHMARKS:
        raise ValueError(f"unknown image benchmark {name!r}; choose one of {sorted(IMAGE_BENCHMARKS)}")
    spec = IMAGE_BENCHMARKS[name]
    load = load or datasets.load_dataset
    source = path or spec.path
    if spec.test_share is None:
        raw_train = _load(source, "train", load)
        names = sorted(set(raw_train[spec.label_column]))  # the train split's ids, given to the test split too
        train = _with_integer_labels(raw_train, spec.label_column, names)
        test = _with_integer_labels(_load(source, "test", load), spec.label_column, names)
    else:
        whole = _with_integer_labels(_load(source, "test", load), spec.label_column)
        train, test = _per_class_split(whole, spec.test_share)
    num_classes = len(set(train["label"]))
    return class_incremental_tasks(train, test, num_tasks or spec.num_tasks, "label",
                                   class_order=pilot_class_order(num_classes))  # fmt: skip


def five_datasets_text(
    order: int = 1,
    train_per_task: int | None = 115_000,
    test_per_task: int | None = 7_600,
    paths: Mapping[str, str] | None = None,
    load: Callable[..., Dataset] | None = None,
    seed: int = 0,
) -> TaskSequence:
    """AG News, Yelp, Amazon, DBpedia and Yahoo Answers as five tasks in MbPA++'s order ``order`` (1-4), each
    ``train_per_task`` / ``test_per_task`` rows drawn with ``seed`` (MbPA++'s 115,000 / 7,600; ``None``: all).

    Rows hold ``text`` (the set's text columns joined) and ``label``: each set's labels are offset past the previous
    sets' (AG News 0-3, Yelp 4-8, Amazon 9-13, DBpedia 14-27, Yahoo 28-37 whatever the order), so the tasks own
    disjoint classes of one 38-way classifier (MbPA++ merged Yelp's and Amazon's ratings into 33).
    """
    if not 1 <= order <= len(TEXT_ORDERS):
        raise ValueError(f"order must be 1-{len(TEXT_ORDERS)} (de Masson d'Autume et al.'s orders), got {order}")
    load, paths = load or datasets.load_dataset, paths or {}
    train_parts, test_parts, offset = [], [], 0
    for name, (path, columns, label) in TEXT_DATASETS.items():
        splits = []
        for split, rows in (("train", train_per_task), ("test", test_per_task)):
            data = _load(paths.get(name, path), split, load)
            missing = [c for c in (*columns, label) if c not in data.column_names]
            if missing:
                raise ValueError(f"{name}: the data set has no column {missing} (it has {data.column_names})")
            if rows is not None and len(data) > rows:
                data = data.shuffle(seed=seed).select(range(rows))
            splits.append(data)
        for data, parts in zip(splits, (train_parts, test_parts), strict=True):
            parts.append(_as_text_rows(data, columns, label, offset))
        feature = splits[0].features[label]
        offset += feature.num_classes if isinstance(feature, ClassLabel) else int(max(splits[0][label])) + 1
    parts = dict(zip(TEXT_DATASETS, zip(train_parts, test_parts, strict=True), strict=True))
    tasks = tuple(ContinualTask(name, *parts[name], tuple(sorted(set(parts[name][0]["label"]))))
                  for name in TEXT_ORDERS[order - 1])  # fmt: skip
    return TaskSequence(tasks, scenario="class_incremental", label_column="label")


def _as_text_rows(data: Dataset, columns: Sequence[str], label: str, offset: int) -> Dataset:
    def row(example: dict) -> dict:
        text = " ".join(str(example[c]) for c in columns if example[c])
        return {"text": text, "label": int(example[label]) + offset}

    return data.map(row, remove_columns=data.column_names,
                    features=Features({"text": Value("string"), "label": Value("int64")}))  # fmt: skip


def _with_integer_labels(data: Dataset, column: str, names: Sequence | None = None) -> Dataset:
    """``data`` with an integer ``label`` column from ``column``: integers as they are, strings mapped to their index
    in ``names`` (default: the sorted distinct values; give the train split's to a test split)."""
    feature = data.features[column]
    if isinstance(feature, ClassLabel) or feature.dtype.startswith("int"):
        return data if column == "label" else data.rename_column(column, "label")
    ids = {n: i for i, n in enumerate(sorted(set(data[column])) if names is None else names)}
    return data.map(lambda example: {"label": ids[example[column]]}, remove_columns=[column])


def _per_class_split(data: Dataset, test_share: float) -> tuple[Dataset, Dataset]:
    """``(train, test)`` with ``test_share`` of each class's rows (at least one) in test, drawn with seed 0."""
    labels = np.asarray(data["label"])
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test[rng.choice(members, max(1, round(test_share * len(members))), replace=False)] = True
    return data.select(np.flatnonzero(~test)), data.select(np.flatnonzero(test))
