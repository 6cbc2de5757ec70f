"""NaN / inf anywhere stops the run with an error naming task, step and tensors, and no checkpoint holds one."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import synthetic_images, tiny_vit, training_args
from transformers import TrainerCallback

from pegp_hf import ContinualEvaluator, ContinualPEGPTrainer, Evaluation, NonFiniteError, class_incremental_tasks
from pegp_hf.backends import grow_bases_on_every_rank
from pegp_hf.io.checkpoint import write_task_checkpoint


def tasks_with_nan_in(task_index, value=np.nan):
    """Three class-incremental tasks (6 classes) whose task ``task_index`` has one training image set to ``value``."""
    train = synthetic_images(num_labels=6).with_format(None)
    pixels = np.asarray(train["pixel_values"], dtype=np.float32)
    labels = np.asarray(train["label"])
    order = np.random.default_rng(0).permutation(6)  # the classes class_incremental_tasks gives task k (seed 0)
    victim = np.flatnonzero(np.isin(labels, order[2 * task_index : 2 * task_index + 2]))[0]
    pixels[victim, 0, 0, 0] = value
    poisoned = Dataset.from_dict({"pixel_values": pixels, "label": labels}).with_format("torch")
    return class_incremental_tasks(poisoned, synthetic_images(num_labels=6, seed=1), 3, seed=0)


def make(output_dir, tasks, **overrides):
    args = training_args(output_dir, threshold=0.95, num_train_epochs=1, **overrides)
    return ContinualPEGPTrainer(model=tiny_vit(num_labels=6), args=args, tasks=tasks)


@pytest.mark.parametrize(("method", "task", "value"), [("sequential", 1, np.nan), ("pegp", 0, np.nan),
                                                       ("pegp", 1, np.inf)])  # fmt: skip
def test_a_non_finite_input_stops_its_task_at_the_first_step_and_nothing_of_it_is_saved(tmp_path, method, task, value):
    """Without the check, ``sequential`` wrote NaN adapters while logging a loss of 0.0 and ``pegp`` ended in
    ``linalg.eigh failed to converge`` or in a JSON error after training."""
    tasks = tasks_with_nan_in(task, value)
    assert not np.isfinite(tasks[task].train.with_format("numpy")["pixel_values"]).all()  # the poisoned task
    trainer = make(tmp_path, tasks, method=method)
    expected = rf"task {task + 1}/3 \(task-{task + 1}\), optimizer step \d+: the training loss is not finite; check"
    with pytest.raises(NonFiniteError, match=expected) as error:
        trainer.train()
    assert "NaN / inf" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"task-{k}" for k in range(1, task + 1)]


def test_an_infinite_gradient_under_a_finite_loss_is_named(tmp_path):
    trainer = make(tmp_path, tasks_with_nan_in(0, value=0.0))
    weight = next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)
    weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(
        NonFiniteError, match=r"task 1/3 \(task-1\), optimizer step 1: the gradients are not finite in "
    ):
        trainer.train()
    assert not any(tmp_path.iterdir())


class PoisonAtTrainEnd(TrainerCallback):
    """Sets one LoRA weight to NaN when a task's training ends (after its last step's checks)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))


def test_non_finite_weights_after_training_are_named_before_features_are_taken(tmp_path):
    trainer = make(tmp_path, tasks_with_nan_in(0, value=0.0))
    trainer.add_callback(PoisonAtTrainEnd())
    with pytest.raises(NonFiniteError, match=r"task 1/3 \(task-1\): the weights after training are not finite in "
                                             r"base_model\.model\..*lora_B"):  # fmt: skip
        trainer.train()
    assert not any(tmp_path.iterdir())


def test_a_non_finite_covariance_is_named_and_no_basis_grows():
    trainer = make("unused", tasks_with_nan_in(0, value=0.0))
    projector = trainer.projector
    name = next(iter(projector.tensors))
    covariances = {n: torch.eye(t.feature_dim, dtype=torch.float64) for n, t in projector.tensors.items()}
    covariances[name] = covariances[name].clone()
    covariances[name][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"task 2/3: the feature covariances .* not finite in {name}"):
        grow_bases_on_every_rank(projector, covariances, 0.95, "task 2/3")
    assert not projector.active


class NaNFigure(ContinualEvaluator):
    def after_task(self, trainer, index):
        return Evaluation(scalars={"calibration": float("nan")})


def test_a_non_finite_figure_is_named_and_not_written(tmp_path):
    """Before the check, the state file failed with "Out of range float values are not JSON compliant"."""
    args = training_args(tmp_path, threshold=0.95, num_train_epochs=1)
    trainer = ContinualPEGPTrainer(model=tiny_vit(num_labels=6), args=args, tasks=tasks_with_nan_in(0, 0.0),
                                   evaluators=[NaNFigure()])  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"task 1/3 \(task-1\): the evaluation figures \['calibration'\]"):
        trainer.train()
    assert not any(tmp_path.iterdir())


def test_the_checkpoint_writer_refuses_non_finite_weights(tmp_path):
    trainer = make("unused", tasks_with_nan_in(0, value=0.0))
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"not writing .*task-1: the adapter weights are not finite in "):
        write_task_checkpoint(tmp_path / "task-1", trainer.pet, trainer.projector, trainer.objective, {}, str)
    assert not any(tmp_path.iterdir())
