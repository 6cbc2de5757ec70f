import numpy as np
import pytest
from datasets import Dataset

from pegp_hf import ContinualTask, TaskSequence, class_incremental_tasks, domain_incremental_tasks, online_tasks


def labelled(labels, **columns):
    return Dataset.from_dict({"x": np.arange(len(labels)), "label": list(labels), **columns})


TRAIN, TEST = labelled(np.repeat(np.arange(6), 5)), labelled(np.repeat(np.arange(6), 2))


def test_class_incremental_split_is_seeded_disjoint_and_complete():
    tasks = class_incremental_tasks(TRAIN, TEST, num_tasks=3, seed=3)
    again = class_incremental_tasks(TRAIN, TEST, num_tasks=3, seed=3)
    other = class_incremental_tasks(TRAIN, TEST, num_tasks=3, seed=4)
    assert tasks.task_classes == again.task_classes != other.task_classes
    assert sorted(c for t in tasks for c in t.classes) == list(range(6))
    for task in tasks:
        assert len(task.classes) == 2
        assert set(task.train["label"]) == set(task.test["label"]) == set(task.classes)
        assert len(task.train) == 10 and len(task.test) == 4
    tasks.validate(num_labels=6)
    assert tasks.scenario == "class_incremental"


def test_explicit_class_order_and_uneven_split():
    tasks = class_incremental_tasks(TRAIN, TEST, num_tasks=4, class_order=[5, 4, 3, 2, 1, 0])
    assert tasks.task_classes == [[4, 5], [2, 3], [1], [0]]


def test_builder_errors_name_the_problem():
    with pytest.raises(ValueError, match="no label column 'target'"):
        class_incremental_tasks(TRAIN, TEST, num_tasks=2, label_column="target")
    with pytest.raises(ValueError, match="num_tasks must be between 1 and the number of classes"):
        class_incremental_tasks(TRAIN, TEST, num_tasks=7)
    with pytest.raises(ValueError, match="class_order"):
        class_incremental_tasks(TRAIN, TEST, num_tasks=2, class_order=[0, 1, 2])
    with pytest.raises(ValueError, match="train dataset is empty"):
        class_incremental_tasks(labelled([]), TEST, num_tasks=2)
    names = labelled(["cat", "dog", "cat", "dog"])
    with pytest.raises(ValueError, match=r"holds labels such as 'cat', not integer class ids.*class_encode_column"):
        class_incremental_tasks(names, names, num_tasks=2)
    with pytest.raises(ValueError, match=r"holds labels such as 0\.5"):
        class_incremental_tasks(labelled([0.5, 1.5]), TEST, num_tasks=2)


def test_test_rows_of_classes_without_training_rows_are_refused_not_dropped():
    """Before, they were dropped in silence (24 of 144 test rows in one sweep case)."""
    with pytest.raises(ValueError, match=r"the test dataset has 4 rows of classes \[6, 7\] that the train dataset"):
        class_incremental_tasks(TRAIN, labelled(np.repeat(np.arange(8), 2)), num_tasks=3)


def test_validate_rejects_overlapping_classes():
    a = ContinualTask("a", labelled([0, 1]), labelled([0, 1]), (0, 1))
    b = ContinualTask("b", labelled([1, 2]), labelled([1, 2]), (1, 2))
    with pytest.raises(ValueError, match="class 1 is in both task 'a' and task 'b'"):
        TaskSequence((a, b), "class_incremental").validate(num_labels=3)
    TaskSequence((a, b), "domain_incremental").validate(num_labels=3)  # a shared label space is fine there


def test_validate_rejects_empty_tasks_and_bad_labels():
    full = ContinualTask("a", labelled([0, 1]), labelled([0, 1]), (0, 1))
    empty = ContinualTask("b", labelled([]), labelled([2]), (2,))
    with pytest.raises(ValueError, match="task 'b' has an empty train split"):
        TaskSequence((full, empty), "class_incremental").validate(num_labels=3)
    with pytest.raises(ValueError, match=r"labels \[1\] outside \[0, 1\)"):
        TaskSequence((full,), "class_incremental").validate(num_labels=1)
    stray = ContinualTask("c", labelled([0, 2]), labelled([0]), (0,))
    with pytest.raises(ValueError, match=r"labels \[2\] the task does not own"):
        TaskSequence((stray,), "class_incremental").validate(num_labels=3)
    with pytest.raises(ValueError, match="sequence is empty"):
        TaskSequence((), "class_incremental").validate(num_labels=3)
    with pytest.raises(ValueError, match="unknown scenario"):
        TaskSequence((full,), "streaming")


def test_domain_incremental_tasks_split_by_domain_and_share_labels():
    train = labelled([0, 1, 0, 1, 2, 2], domain=["a", "a", "b", "b", "b", "a"])
    test = labelled([0, 1, 2, 0], domain=["a", "b", "a", "b"])
    tasks = domain_incremental_tasks(train, test, domain_column="domain", domain_order=["b", "a"])
    assert [t.name for t in tasks] == ["b", "a"]
    assert [len(t.train) for t in tasks] == [3, 3]
    assert all(t.classes == (0, 1, 2) for t in tasks)
    with pytest.raises(ValueError, match="no domain column 'site'"):
        domain_incremental_tasks(train, test, domain_column="site")


def test_online_tasks_are_class_splits():
    tasks = online_tasks(TRAIN, TEST, num_tasks=2)
    assert tasks.scenario == "online" and len(tasks) == 2


def test_a_grouped_class_order_keeps_each_source_together_and_shuffles_within_it():
    from pegp_hf.continual.tasks import grouped_class_order, make_tasks

    source = ["b"] * 15 + ["a"] * 15  # classes 0-2 come from "b", 3-5 from "a": "b" appears first
    train = labelled(np.repeat(np.arange(6), 5), source=source)
    orders = {seed: grouped_class_order(train, "source", seed=seed) for seed in range(4)}
    for order in orders.values():
        assert sorted(order[:3]) == [0, 1, 2] and sorted(order[3:]) == [3, 4, 5]
    assert len({tuple(order) for order in orders.values()}) > 1  # the seed shuffles within the groups
    tasks = make_tasks("class_incremental", train, TEST, 2, class_order=orders[0])
    assert tasks.task_classes == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="no column 'domain'"):
        grouped_class_order(train, "domain")
    mixed = labelled(np.repeat(np.arange(6), 5), source=["a", "b"] * 15)
    with pytest.raises(ValueError, match="class 0 appears under source='a' and 'b'"):
        grouped_class_order(mixed, "source")
