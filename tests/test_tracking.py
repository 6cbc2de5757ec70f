"""Tracking across the task sequence: one increasing step axis and every task's accuracy, read back from the
TensorBoard event files the Trainer's own integration writes."""

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import AtTaskStart, matrices, synthetic_images, tiny_vit, training_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pegp_hf import ContinualPEGPTrainer, class_incremental_tasks

TRAIN, TEST = synthetic_images(num_labels=6), synthetic_images(num_labels=6, seed=1)
TASKS = class_incremental_tasks(TRAIN, TEST, 3, seed=0)


def scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` over every event file under ``root``, sorted by step."""
    found = defaultdict(list)
    for folder in {path.parent for path in root.rglob("events.out.tfevents.*")}:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found[tag] += [(event.step, event.value) for event in events.Scalars(tag)]
    return {tag: sorted(values) for tag, values in found.items()}


def make(output_dir):
    args = training_args(output_dir, report_to=["tensorboard"], logging_steps=1, threshold=0.95)
    return ContinualPEGPTrainer(model=tiny_vit(num_labels=6), args=args, tasks=TASKS)


def check_the_sequence_was_logged(logged, trainer):
    steps = np.cumsum([timing["optimizer_steps"] for timing in trainer.results.timings])
    assert [step for step, _ in logged["train/loss"]] == list(range(1, steps[-1] + 1))  # one axis, no restart
    for name, matrix in matrices(trainer).items():
        for task in range(3):  # task i's curve: A[i, t] after each task t >= i, at the step that ended task t
            curve = logged[f"train/{name}/task_{task + 1}"]
            assert [step for step, _ in curve] == list(steps[task:])
            np.testing.assert_allclose([value for _, value in curve], matrix[task, task:], rtol=1e-6)
    assert [step for step, _ in logged["train/continual_average"]] == list(steps)


def test_tensorboard_gets_one_step_axis_and_every_task_accuracy(tmp_path):
    trainer = make(tmp_path)
    trainer.train()
    logged = scalars(tmp_path / "runs")
    check_the_sequence_was_logged(logged, trainer)
    history = [entry["step"] for entry in trainer.state.log_history if "loss" in entry]
    assert history == sorted(history) and len(set(history)) == len(history)


def test_a_resumed_run_continues_the_step_axis(tmp_path):
    crashed = make(tmp_path)
    crashed.add_callback(AtTaskStart(1, lambda model: (_ for _ in ()).throw(RuntimeError("crash"))))
    with pytest.raises(RuntimeError, match="crash"):
        crashed.train()
    resumed = make(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    check_the_sequence_was_logged(scalars(tmp_path / "runs"), resumed)


def test_the_default_recipe_logs_one_run_per_method_to_tensorboard(tmp_path):
    from recipes import vit_class_incremental

    summary = vit_class_incremental.main([
        "--dataset", "digits", "--num_tasks", "2", "--num_train_epochs", "1", "--feature_samples", "64",
        "--output_dir", str(tmp_path), "--disable_tqdm", "true", "--report_to", "tensorboard", "--logging_steps", "5",
        "--plots", "false",
    ])  # fmt: skip
    for method, results in summary.items():
        logged = scalars(tmp_path / method / "runs")  # one TensorBoard run per method, under its output_dir
        loss_steps = [step for step, _ in logged["train/loss"]]
        assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] > 5  # one axis across both tasks
        total = sum(timing["optimizer_steps"] for timing in results["timings"])
        matrix = results["class_incremental"]["matrix"]
        assert logged["train/class_incremental/task_1"][-1] == (total, pytest.approx(matrix[0][1], rel=1e-6))
        assert logged["train/class_incremental/task_2"] == [(total, pytest.approx(matrix[1][1], rel=1e-6))]
