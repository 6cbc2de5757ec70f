"""Task sequences built from ``datasets.Dataset`` splits.

A :class:`TaskSequence` is an ordered tuple of :class:`ContinualTask` (train split, test split, the label ids the task
owns, if any) plus the scenario it was built for. For the classification objective, the scenario decides how logits
are masked and which accuracy matrix is the headline one:

- ``class_incremental``: disjoint class sets; no task id at test time (logits of every seen class compete).
- ``task_incremental``: the same splits; the task id is given at test time (logits restricted to the task's classes).
- ``domain_incremental``: one task per value of a domain column; every task shares the full label space.
- ``online``: class-incremental splits seen in a single pass (one epoch per task).

Labels keep their dataset ids: the model's head covers every label id, and the trainer masks the ones a task does
not own, so no relabelling is needed and a checkpoint's head means the same thing in every task.

Tasks of a model that computes its own loss (a causal LM's ``-100``-masked token labels) own no classes:
:func:`dataset_tasks` makes a domain-incremental sequence of them, one task per named pair of splits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset

__all__ = [
    "SCENARIOS",
    "ContinualTask",
    "TaskSequence",
    "class_incremental_tasks",
    "dataset_tasks",
    "domain_incremental_tasks",
    "make_tasks",
    "online_tasks",
    "split_per_class",
    "task_incremental_tasks",
]

SCENARIOS = ("class_incremental", "task_incremental", "domain_incremental", "online")
_DISJOINT_SCENARIOS = ("class_incremental", "task_incremental", "online")


@dataclass(frozen=True)
class ContinualTask:
    """One task: its splits and the label ids it owns (sorted; empty for tasks without class labels)."""

    name: str
    train: Dataset
    test: Dataset
    classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class TaskSequence(Sequence):
    """An ordered sequence of tasks for one scenario (see the module docstring)."""

    tasks: tuple[ContinualTask, ...]
    scenario: str
    label_column: str | None = "label"

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; choose one of {SCENARIOS}")
        object.__setattr__(self, "tasks", tuple(self.tasks))

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int | slice) -> ContinualTask | tuple[ContinualTask, ...]:
        return self.tasks[index]

    @property
    def disjoint(self) -> bool:
        """True when tasks own disjoint classes (every scenario but domain-incremental): the loss masks the rest."""
        return self.scenario in _DISJOINT_SCENARIOS

    @property
    def task_classes(self) -> list[list[int]]:
        """The label ids of every task, in order (what a checkpoint records to recognise its sequence)."""
        return [list(task.classes) for task in self.tasks]

    def seen_classes(self, index: int) -> list[int]:
        """Sorted label ids of tasks ``0 .. index``."""
        return sorted(set().union(*(task.classes for task in self.tasks[: index + 1])))

    def check_splits(self) -> None:
        """Raise ``ValueError`` naming the problem if the sequence or a task's split is empty."""
        if not self.tasks:
            raise ValueError("the task sequence is empty")
        for task in self.tasks:
            for split_name, split in (("train", task.train), ("test", task.test)):
                if len(split) == 0:
                    raise ValueError(f"task {task.name!r} has an empty {split_name} split")

    def validate(self, num_labels: int) -> None:
        """Raise ``ValueError`` naming the problem if a task is empty, owns no classes, lacks the label column, uses a
        label outside ``[0, num_labels)`` or outside its own classes, or (class- / task-incremental, online) shares a
        class with another task."""
        self.check_splits()
        if self.label_column is None:
            raise ValueError("the tasks have no label column: classification needs class-labelled tasks")
        owner: dict[int, str] = {}
        for task in self.tasks:
            if not task.classes:
                raise ValueError(f"task {task.name!r} owns no classes")
            bad = [c for c in task.classes if not 0 <= c < num_labels]
            if bad:
                raise ValueError(
                    f"task {task.name!r} has labels {bad} outside [0, {num_labels}) (the model's num_labels)"
                )
            for split_name, split in (("train", task.train), ("test", task.test)):
                labels = _labels(split, self.label_column, f"task {task.name!r} {split_name} split")
                if len(labels) == 0:
                    raise ValueError(f"task {task.name!r} has an empty {split_name} split")
                stray = sorted(set(np.unique(labels).tolist()) - set(task.classes))
                if stray:
                    raise ValueError(
                        f"task {task.name!r} {split_name} split has labels {stray} the task does not own "
                        f"(its classes are {list(task.classes)}; the model has {num_labels} labels)"
                    )
            if self.scenario in _DISJOINT_SCENARIOS:
                for c in task.classes:
                    if c in owner:
                        raise ValueError(
                            f"class {c} is in both task {owner[c]!r} and task {task.name!r}: a {self.scenario} "
                            "sequence needs disjoint classes"
                        )
                    owner[c] = task.name


def _labels(split: Dataset, label_column: str, what: str) -> np.ndarray:
    """The integer class ids of ``split``'s ``label_column``.

    Raises:
        ValueError: the split is empty, lacks the column, or its labels are not integer class ids (with the fix).
    """
    if label_column not in split.column_names:
        raise ValueError(f"{what} has no label column {label_column!r} (columns: {split.column_names})")
    if len(split) == 0:
        raise ValueError(f"{what} is empty: it has no rows")
    labels = np.asarray(split.with_format("numpy")[label_column])
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.bool_)):
        raise ValueError(
            f"{what}'s {label_column!r} holds labels such as {np.asarray(labels.flat[0]).item()!r}, not integer "
            f"class ids: encode them first, e.g. dataset.class_encode_column({label_column!r})"
        )
    return labels.astype(np.int64)


def _select(split: Dataset, labels: np.ndarray, classes: Sequence[int]) -> Dataset:
    return split.select(np.flatnonzero(np.isin(labels, classes)).tolist())


def class_incremental_tasks(
    train: Dataset,
    test: Dataset,
    num_tasks: int,
    label_column: str = "label",
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    scenario: str = "class_incremental",
) -> TaskSequence:
    """Split ``train`` / ``test`` into ``num_tasks`` tasks of disjoint classes.

    The classes present in ``train`` are permuted by ``seed`` (or taken in ``class_order``, which must list each of
    them once) and cut into ``num_tasks`` contiguous groups of near-equal size (``numpy.array_split``).
    """
    if scenario not in _DISJOINT_SCENARIOS:
        raise ValueError(f"class splits serve {_DISJOINT_SCENARIOS}, not {scenario!r}")
    train_labels = _labels(train, label_column, "train dataset")
    test_labels = _labels(test, label_column, "test dataset")
    classes = np.unique(train_labels)
    if class_order is None:
        order = np.random.default_rng(seed).permutation(classes)
    else:
        order = np.asarray(list(class_order), dtype=np.int64)
        if sorted(order.tolist()) != classes.tolist():
            raise ValueError(
                f"class_order {order.tolist()} must list each class of the train dataset once: {classes.tolist()}"
            )
    if not 1 <= num_tasks <= len(classes):
        raise ValueError(f"num_tasks must be between 1 and the number of classes ({len(classes)}), got {num_tasks}")
    untrained = np.setdiff1d(np.unique(test_labels), classes)
    if len(untrained):
        dropped = int(np.isin(test_labels, untrained).sum())
        raise ValueError(
            f"the test dataset has {dropped} rows of classes {untrained.tolist()} that the train dataset lacks: no "
            "task would own them and they would be dropped; filter them out of the test dataset first"
        )
    tasks = []
    for index, group in enumerate(np.array_split(order, num_tasks)):
        group = sorted(int(c) for c in group)
        tasks.append(
            ContinualTask(
                name=f"task-{index + 1}",
                train=_select(train, train_labels, group),
                test=_select(test, test_labels, group),
                classes=tuple(group),
            )
        )
    return TaskSequence(tuple(tasks), scenario=scenario, label_column=label_column)


def task_incremental_tasks(
    train: Dataset,
    test: Dataset,
    num_tasks: int,
    label_column: str = "label",
    seed: int = 0,
    class_order: Sequence[int] | None = None,
) -> TaskSequence:
    """The class splits of :func:`class_incremental_tasks`, evaluated with the task id given."""
    return class_incremental_tasks(train, test, num_tasks, label_column, seed, class_order, "task_incremental")


def online_tasks(
    train: Dataset,
    test: Dataset,
    num_tasks: int,
    label_column: str = "label",
    seed: int = 0,
    class_order: Sequence[int] | None = None,
) -> TaskSequence:
    """The class splits of :func:`class_incremental_tasks`, each streamed once (the trainer requires one epoch)."""
    return class_incremental_tasks(train, test, num_tasks, label_column, seed, class_order, "online")


def domain_incremental_tasks(
    train: Dataset,
    test: Dataset,
    domain_column: str,
    label_column: str = "label",
    domain_order: Sequence | None = None,
) -> TaskSequence:
    """One task per value of ``domain_column`` (in ``domain_order``, default sorted), all sharing the label space."""
    train_labels = _labels(train, label_column, "train dataset")
    _labels(test, label_column, "test dataset")
    for split_name, split in (("train", train), ("test", test)):
        if domain_column not in split.column_names:
            raise ValueError(
                f"{split_name} dataset has no domain column {domain_column!r} (columns: {split.column_names})"
            )
    train_domains = np.asarray(train[domain_column])
    test_domains = np.asarray(test[domain_column])
    order = list(domain_order) if domain_order is not None else sorted(np.unique(train_domains).tolist())
    classes = tuple(int(c) for c in np.unique(train_labels))
    tasks = [
        ContinualTask(
            name=str(domain),
            train=train.select(np.flatnonzero(train_domains == domain).tolist()),
            test=test.select(np.flatnonzero(test_domains == domain).tolist()),
            classes=classes,
        )
        for domain in order
    ]
    return TaskSequence(tuple(tasks), scenario="domain_incremental", label_column=label_column)


def dataset_tasks(splits: Mapping[str, tuple[Dataset, Dataset]]) -> TaskSequence:
    """One task per ``name: (train, test)`` item, in order, owning no classes: the sequence of a model that computes
    its own loss (e.g. instruction data sets for a causal LM, each row with ``input_ids`` and ``labels``).

    Its scenario is ``domain_incremental``: every task shares the model's output space.
    """
    tasks = tuple(ContinualTask(name, train, test) for name, (train, test) in splits.items())
    return TaskSequence(tasks, scenario="domain_incremental", label_column=None)


def split_per_class(
    dataset: Dataset, per_class: int, label_column: str = "label", seed: int = 0
) -> tuple[Dataset, Dataset]:
    """``(held, rest)``: ``per_class`` rows of each class drawn with ``seed``, and every other row (e.g. a base split
    kept apart from the continual tasks).

    Raises:
        ValueError: a class has no more than ``per_class`` rows, so none would be left.
    """
    labels = np.asarray(dataset.with_format(None)[label_column])
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class:
            raise ValueError(f"class {c} has {len(members)} rows: none would be left after {per_class} are held out")
        held[rng.choice(members, per_class, replace=False)] = True
    return dataset.select(np.flatnonzero(held)), dataset.select(np.flatnonzero(~held))


def make_tasks(
    scenario: str,
    train: Dataset,
    test: Dataset,
    num_tasks: int,
    label_column: str = "label",
    seed: int = 0,
    domain_column: str | None = None,
    class_order: Sequence[int] | None = None,
) -> TaskSequence:
    """The task sequence of ``scenario`` from two splits: ``num_tasks`` class splits (class order drawn with
    ``seed``, or ``class_order``) for the class-split scenarios, one task per value of ``domain_column`` for
    ``domain_incremental``."""
    if scenario == "domain_incremental":
        if domain_column is None:
            raise ValueError("the domain_incremental scenario needs a domain column (one task per domain)")
        return domain_incremental_tasks(train, test, domain_column, label_column)
    if scenario not in _DISJOINT_SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {SCENARIOS}")
    return class_incremental_tasks(train, test, num_tasks, label_column, seed=seed, class_order=class_order,
                                   scenario=scenario)  # fmt: skip


def class_groups(train: Dataset, group_column: str, label_column: str = "label") -> dict[Any, list[int]]:
    """The classes under each value of ``group_column`` (e.g. the source data set of a cross-data-set set), values
    and classes in order of first appearance in ``train``.

    Raises:
        ValueError: ``train`` has no ``group_column``, or a class appears under two of its values.
    """
    if group_column not in train.column_names:
        raise ValueError(f"the train dataset has no column {group_column!r} to group classes by: {train.column_names}")
    values = train.with_format(None)[group_column]  # the stored column, not the transform's output
    groups: dict[Any, list[int]] = {}
    owner: dict[int, Any] = {}
    for label, group in zip(_labels(train, label_column, "train dataset"), values, strict=True):
        label = int(label)
        if owner.setdefault(label, group) != group:
            raise ValueError(f"class {label} appears under {group_column}={owner[label]!r} and {group!r}: classes "
                             f"must belong to one {group_column} value to be grouped by it")  # fmt: skip
        if label not in groups.setdefault(group, []):
            groups[group].append(label)
    return groups


def grouped_class_order(train: Dataset, group_column: str, label_column: str = "label", seed: int = 0) -> list[int]:
    """A class order that keeps the :func:`class_groups` together (every MNIST class before every animal class), the
    groups in order of first appearance in ``train`` and the classes shuffled by ``seed`` within each group."""
    rng = np.random.default_rng(seed)
    groups = class_groups(train, group_column, label_column)
    return [int(c) for members in groups.values() for c in rng.permutation(sorted(members))]


def check_grouped_tasks(tasks: TaskSequence, train: Dataset, group_column: str, label_column: str = "label") -> None:
    """Raise if a task of ``tasks`` (made from a :func:`grouped_class_order`) holds classes of two values of
    ``group_column``: its task count does not split each group evenly."""
    groups = class_groups(train, group_column, label_column)
    group_of = {label: group for group, members in groups.items() for label in members}
    for index, task in enumerate(tasks):
        held = {group_of[c] for c in task.classes}
        if len(held) > 1:
            raise ValueError(
                f"task {index + 1} holds classes of {group_column} values {sorted(map(str, held))}: with "
                f"{len(tasks)} tasks the class groups are not split evenly; choose a num_tasks that divides each "
                f"group's class count"
            )
