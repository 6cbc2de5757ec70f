import math

import numpy as np
import pytest

from pegp_hf.metrics import average_accuracy, backward_transfer, forgetting, summarize

NAN = math.nan


def test_two_tasks():
    a = [[90.0, 80.0], [NAN, 70.0]]
    assert summarize(a) == {"acc": 75.0, "forgetting": 10.0, "bwt": -10.0}


def test_three_tasks_forgetting_uses_best_earlier_column_not_the_diagonal():
    a = np.array([[50.0, 90.0, 70.0], [NAN, 80.0, 60.0], [NAN, NAN, 75.0]])
    assert average_accuracy(a) == pytest.approx((70 + 60 + 75) / 3)
    # task 1: max(50, 90) - 70 = 20; task 2: 80 - 60 = 20
    assert forgetting(a) == pytest.approx(20.0)
    # task 1: 70 - 50 = +20; task 2: 60 - 80 = -20
    assert backward_transfer(a) == pytest.approx(0.0)


def test_the_last_column_is_excluded_from_the_forgetting_max():
    a = [[60.0, 50.0, 95.0], [NAN, 70.0, 70.0], [NAN, NAN, 80.0]]
    # task 1 peaks only at the end: max over columns before the last is 60, so its forgetting is 60 - 95 = -35
    assert forgetting(a) == pytest.approx((-35.0 + 0.0) / 2)


def test_a_task_never_learned_forgets_nothing():
    a = [[0.0, 0.0, 0.0], [NAN, 100.0, 90.0], [NAN, NAN, 80.0]]
    assert average_accuracy(a) == pytest.approx(170.0 / 3)
    assert forgetting(a) == pytest.approx((0.0 + 10.0) / 2)
    assert backward_transfer(a) == pytest.approx((0.0 - 10.0) / 2)


def test_single_task_has_no_forgetting():
    assert summarize([[88.0]]) == {"acc": 88.0, "forgetting": 0.0, "bwt": 0.0}


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [], [[NAN, 1.0], [NAN, 2.0]]])
def test_malformed_matrices_are_rejected(bad):
    with pytest.raises(ValueError, match="accuracy matrix"):
        summarize(bad)
