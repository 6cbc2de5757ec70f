"""``feature_capture="training"``: the bases grow from the forward passes of a task's last training steps, with no
extra pass, and span the exact pass's bases to a stated tolerance (fixed seed)."""

import pytest
import torch
from helpers import AtTaskStart, lora_weights, synthetic_images, tiny_vit, training_args

from pegp_hf import ContinualPEGPTrainer, PEGPTrainingArguments, class_incremental_tasks

TRAIN, TEST = synthetic_images(num_labels=4, per_class=48), synthetic_images(num_labels=4, seed=1)
TASKS = class_incremental_tasks(TRAIN, TEST, 2, seed=0)


def bases_after_task_1(tmp_path, mode, monkeypatch=None):
    args = training_args(tmp_path / mode, threshold=0.97, feature_capture=mode, feature_samples=64)
    trainer = ContinualPEGPTrainer(model=tiny_vit(), args=args, tasks=TASKS)
    if monkeypatch is not None:  # no separate feature pass may run
        monkeypatch.setattr(trainer, "_capture", lambda *a, **k: pytest.fail("a separate feature pass ran"))
    snapshot = AtTaskStart(1, lambda model: ({k: v.clone() for k, v in trainer.projector.bases.items()},
                                             lora_weights(model)))  # fmt: skip
    trainer.add_callback(snapshot)
    trainer.train()
    return snapshot.result, trainer


def test_training_capture_spans_the_exact_bases_without_an_extra_pass(tmp_path, monkeypatch):
    (exact, weights), _ = bases_after_task_1(tmp_path, "pass")
    (cheap, cheap_weights), trainer = bases_after_task_1(tmp_path, "training", monkeypatch)
    assert all(torch.equal(weights[n], cheap_weights[n]) for n in weights)  # capturing changed no training
    lora_a = [name for name in exact if "lora_A" in name]
    assert lora_a and all(exact[name].shape[1] > 0 for name in lora_a)
    for name, basis in exact.items():
        a, b = basis.double(), cheap[name].double()
        assert abs(a.shape[1] - b.shape[1]) <= 1, name
        if a.shape[1]:
            # stated tolerance: on average, cos^2 of the principal angles from the exact basis into the cheap one
            assert float((b.T @ a).square().sum()) / a.shape[1] >= 0.97, name
    assert trainer.results.timings[0]["capture_seconds"] < trainer.results.timings[0]["train_seconds"]


def test_the_captured_steps_are_the_last_ones_for_about_feature_samples_samples(tmp_path):
    args = training_args(tmp_path, threshold=0.97, feature_capture="training", feature_samples=40)
    trainer = ContinualPEGPTrainer(model=tiny_vit(), args=args, tasks=TASKS)
    counted = []
    first = next(iter(trainer.projector.tensors.values()))
    first.module.register_forward_hook(lambda m, a, o: counted.append(trainer._training_capture.capture is not None))
    trainer.train()
    # task 1: 2 epochs of 96 samples in batches of 16 (12 training passes), then 1 evaluation pass, never captured;
    # captured: the last ceil(40 / 16) = 3 training steps
    assert counted[:13] == [False] * 9 + [True] * 3 + [False]


def test_training_capture_refuses_gradient_checkpointing(tmp_path):
    with pytest.raises(ValueError, match="feature_capture='training' would count each checkpointed forward twice"):
        PEGPTrainingArguments(output_dir=str(tmp_path), feature_capture="training", gradient_checkpointing=True)


def test_training_capture_refuses_evaluation_inside_training(tmp_path):
    with pytest.raises(ValueError, match="an evaluation inside training"):
        PEGPTrainingArguments(output_dir=str(tmp_path), feature_capture="training", eval_strategy="epoch")


def test_lora_b_sums_come_from_the_final_a_when_a_moves_through_the_captured_steps():
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerState

    from pegp_hf.core import FeatureCovariances
    from pegp_hf.training_capture import TrainingFeatureCapture
    from pegp_hf.tuners.peft import lora_protected_tensors

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=3, target_modules=["0"]))
    tensors = {tensor.name: tensor for tensor in lora_protected_tensors(model)}
    (a_name, a), (b_name, b) = sorted(tensors.items(), key=lambda item: item[1].kind)
    assert (a.kind, b.kind, b.image_of) == ("lora_A", "lora_B", a_name)
    capture = TrainingFeatureCapture(lambda: FeatureCovariances(tensors.values(), None, False), 8, 4, tensors)
    state = TrainerState(max_steps=3)
    capture.on_train_begin(None, state, None)
    inputs = [torch.randn(4, 5, 8) for _ in range(3)]
    moved_sum = torch.zeros(3, 3, dtype=torch.float64)
    for step, x in enumerate(inputs):  # steps 1 and 2 are captured (ceil(8 / 4) = 2), A moves after each step
        state.global_step = step
        capture.on_step_begin(None, state, None)
        model(x)
        if step > 0:
            tokens = x.reshape(-1, 8).double() @ a.parameter.detach().double().T
            moved_sum += tokens.T @ tokens
        with torch.no_grad():
            a.parameter.add_(torch.randn_like(a.parameter))
    capture.on_train_end(None, state, None)

    x_sum = sum(x.reshape(-1, 8).double().T @ x.reshape(-1, 8).double() for x in inputs[1:])
    final = a.parameter.detach().double()
    assert torch.allclose(capture.covariances[a_name], x_sum)
    assert torch.allclose(capture.covariances[b_name], final @ x_sum @ final.T)  # the final A's outputs, exactly
    assert not torch.allclose(moved_sum, final @ x_sum @ final.T, rtol=0.1)  # what capturing A_t x would have summed
