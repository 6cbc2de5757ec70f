import math

import numpy as np
import pytest

from pegp_hf.continual.metrics import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    intransigence,
    summarize,
)

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


def test_a_loss_matrix_forgets_when_its_values_rise():
    from pegp_hf.continual.results import ContinualMatrix

    loss = ContinualMatrix(np.array([[1.0, 1.5, 1.2], [NAN, 0.8, 0.9], [NAN, NAN, 0.5]]), higher_is_better=False)
    summary = loss.summary(done=3)
    assert summary["average"] == pytest.approx((1.2 + 0.9 + 0.5) / 3)
    # task 1: 1.2 - min(1.0, 1.5) = 0.2; task 2: 0.9 - 0.8 = 0.1
    assert summary["forgetting"] == pytest.approx(0.15)
    # BWT: -(1.2 - 1.0) and -(0.9 - 0.8): negative, as forgetting
    assert summary["bwt"] == pytest.approx(-0.15)
    assert loss.summary(done=2) == {"average": pytest.approx(1.15), "forgetting": pytest.approx(0.5),
                                    "bwt": pytest.approx(-0.5)}  # fmt: skip
    assert loss.summary(done=0) == {}


def test_results_record_columns_in_order_and_refuse_a_gap():
    from pegp_hf.continual.results import ContinualResults, MatrixSpec

    results = ContinualResults.empty("class_incremental", "a", [MatrixSpec("a"), MatrixSpec("b", False)], 2)
    with pytest.raises(ValueError, match="task 2 recorded after 0 finished tasks"):
        results.record_task(1, {"a": [1, 2], "b": [1, 2]}, {}, {}, {})
    with pytest.raises(ValueError, match="matrix 'b' needs 1 values"):
        results.record_task(0, {"a": [50.0]}, {}, {}, {})
    results.record_task(0, {"a": [50.0], "b": [2.0]}, {"x": 1.0}, {"train_seconds": 1.0}, {"max_update": None})
    stored = results.to_dict()
    assert stored["accuracy_matrix"] == [[50.0, None], [None, None]] and stored["acc"] == 50.0
    assert stored["b"] == {"matrix": [[2.0, None], [None, None]], "higher_is_better": False, "average": 2.0,
                           "forgetting": 0.0, "bwt": 0.0}  # fmt: skip
    restored = results.restore(stored, 1)
    assert restored.to_dict() == stored
    with pytest.raises(ValueError, match="same evaluators"):
        ContinualResults.empty("class_incremental", "c", [MatrixSpec("c")], 2).restore(stored, 1)
    with pytest.raises(ValueError, match="share a name"):
        ContinualResults.empty("class_incremental", "a", [MatrixSpec("a"), MatrixSpec("a")], 2)


def test_forward_transfer_and_intransigence_against_hand_values():
    matrix = [[80.0, 70.0, 60.0], [np.nan, 90.0, 85.0], [np.nan, np.nan, 70.0]]
    assert forward_transfer(matrix, single_task=[85.0, 95.0, 80.0]) == pytest.approx(((90 - 95) + (70 - 80)) / 2)
    assert intransigence(matrix, joint=[90.0, 90.0, 90.0]) == pytest.approx(((90 - 80) + 0 + (90 - 70)) / 3)
    assert forward_transfer([[50.0]], single_task=[60.0]) == 0.0
    with pytest.raises(ValueError, match="one finite accuracy per task"):
        intransigence(matrix, joint=[90.0, 90.0])


def test_the_evaluate_module_loads_offline_and_builds_the_matrix_from_predictions():
    import evaluate

    from pegp_hf.continual import CONTINUAL_ACCURACY

    metric = evaluate.load(CONTINUAL_ACCURACY)
    # task 0 after task 0: 3 of 4 right; task 0 after task 1: 1 of 2; task 1 after task 1: 2 of 2
    metric.add_batch(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0], task=[0] * 4, after_task=[0] * 4)
    metric.add_batch(predictions=[0, 1, 2, 3], references=[0, 0, 2, 3], task=[0, 0, 1, 1], after_task=[1] * 4)
    result = metric.compute(single_task=[80.0, 90.0], joint=[100.0, 100.0])
    assert result["accuracy_matrix"] == [[75.0, 50.0], [None, 100.0]]
    assert result["acc"] == pytest.approx(75.0) and result["forgetting"] == pytest.approx(25.0)
    assert result["bwt"] == pytest.approx(-25.0) and result["fwt"] == pytest.approx(10.0)
    assert result["intransigence"] == pytest.approx(12.5)
    metric.add_batch(predictions=[0], references=[0], task=[1], after_task=[0])
    with pytest.raises(ValueError, match="0 <= task <= after_task"):
        metric.compute()
