"""Task-level events: a ContinualCallback hears when each task begins, ends and is saved, in order, with the task,
the results so far and the checkpoint folder."""

from pathlib import Path

from helpers import synthetic_images, tiny_vit, training_args
from transformers import TrainerCallback

from pegp_hf import ContinualCallback, ContinualPEGPTrainer, class_incremental_tasks

TASKS = class_incremental_tasks(synthetic_images(per_class=16), synthetic_images(per_class=8, seed=1), 2, seed=0)


class Recorder(ContinualCallback):
    def __init__(self) -> None:
        self.events = []

    def on_task_begin(self, args, state, control, tasks, task_index, model=None, **kwargs):
        self.events.append(("begin", task_index, tasks[task_index].name, model is not None))

    def on_task_end(self, args, state, control, task_index, results, **kwargs):
        self.events.append(("end", task_index, results.finished_tasks))

    def on_task_save(self, args, state, control, task_index, checkpoint_dir, **kwargs):
        self.events.append(
            ("save", task_index, Path(checkpoint_dir).name, (Path(checkpoint_dir) / "pegp_state.json").is_file())
        )

    def on_train_begin(self, args, state, control, **kwargs):  # an ordinary TrainerCallback event, once per task
        self.events.append(("train_begin",))


class Plain(TrainerCallback):
    """A callback without task events, next to the continual ones."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_end(self, args, state, control, **kwargs):
        self.calls += 1


def test_task_events_fire_in_order_with_their_arguments(tmp_path):
    recorder, plain = Recorder(), Plain()
    trainer = ContinualPEGPTrainer(model=tiny_vit(), args=training_args(tmp_path), tasks=TASKS,
                                   callbacks=[recorder, plain])  # fmt: skip
    trainer.train()
    assert recorder.events == [
        ("begin", 0, "task-1", True), ("train_begin",), ("end", 0, 1), ("save", 0, "task-1", True),
        ("begin", 1, "task-2", True), ("train_begin",), ("end", 1, 2), ("save", 1, "task-2", True),
    ]  # fmt: skip
    assert plain.calls == 2
