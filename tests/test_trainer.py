"""The continual loop: scenarios, masking, bad input, arguments."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import matrices, plain_vit, synthetic_images, tiny_vit, training_args
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification

from pegp_hf import (
    ContinualPEGPTrainer,
    ContinualTask,
    PEGPTrainingArguments,
    TaskSequence,
    class_incremental_tasks,
    domain_incremental_tasks,
    online_tasks,
    task_incremental_tasks,
)

TRAIN, TEST = synthetic_images(num_labels=4), synthetic_images(num_labels=4, seed=1)


def run(tmp_path, tasks, num_labels=4, **overrides):
    trainer = ContinualPEGPTrainer(model=tiny_vit(num_labels), args=training_args(tmp_path, **overrides), tasks=tasks)
    output = trainer.train()
    return trainer, output


def test_class_incremental_run_fills_both_accuracy_matrices(tmp_path):
    trainer, output = run(tmp_path, class_incremental_tasks(TRAIN, TEST, 2))
    for name in ("class_incremental", "task_incremental"):
        matrix = matrices(trainer)[name]
        assert not np.isnan(matrix[np.triu_indices(2)]).any() and np.isnan(matrix[1, 0])
    measured = np.triu_indices(2)
    # the task's classes are a subset of the seen classes, so knowing the task can only help
    assert (matrices(trainer)["task_incremental"][measured] >= matrices(trainer)["class_incremental"][measured]).all()
    results = trainer.continual_results()
    assert output.metrics["acc"] == results["acc"] == np.mean(matrices(trainer)["class_incremental"][:, 1])
    assert results["accuracy_matrix"] == results["class_incremental"]["matrix"]
    assert len(results["timings"]) == 2
    task_logs = [log for log in trainer.state.log_history if "continual_average" in log]
    assert task_logs[-1]["task"] == 2


def test_masked_loss_never_touches_old_class_rows_of_the_head(tmp_path):
    tasks = class_incremental_tasks(TRAIN, TEST, 2)
    model = tiny_vit(4)
    head = model.base_model.model.classifier.modules_to_save["default"]
    initial = head.weight.detach().clone()
    trainer = ContinualPEGPTrainer(model=model, args=training_args(tmp_path), tasks=tasks)
    trainer.train()
    first, second = list(tasks[0].classes), list(tasks[1].classes)
    assert not np.allclose(head.weight[first].detach(), initial[first])
    # rows of task 1 moved during task 1 only: compare with the task-1 checkpoint
    stored = load_file(f"{tmp_path}/task-1/adapter_model.safetensors")["base_model.model.classifier.weight"]
    np.testing.assert_array_equal(head.weight[first].detach().numpy(), stored[first].numpy())
    assert np.allclose(stored[second].numpy(), initial[second].numpy())  # task-2 rows untouched during task 1


def test_seen_loss_classes_let_old_rows_compete_while_future_rows_stay_out(tmp_path):
    tasks = class_incremental_tasks(TRAIN, TEST, 2)
    model = tiny_vit(4)
    head = model.base_model.model.classifier.modules_to_save["default"]
    initial = head.weight.detach().clone()
    trainer = ContinualPEGPTrainer(model=model, args=training_args(tmp_path, loss_classes="seen"), tasks=tasks)
    trainer.train()
    first, second = list(tasks[0].classes), list(tasks[1].classes)
    stored = load_file(f"{tmp_path}/task-1/adapter_model.safetensors")["base_model.model.classifier.weight"]
    assert np.allclose(stored[second].numpy(), initial[second].numpy())  # future classes stay out during task 1
    assert not np.allclose(head.weight[first].detach().numpy(), stored[first].numpy())  # old rows compete in task 2


def test_task_incremental_headline_is_the_task_aware_matrix(tmp_path):
    trainer, _ = run(tmp_path, task_incremental_tasks(TRAIN, TEST, 2))
    results = trainer.continual_results()
    assert results["accuracy_matrix"] == results["task_incremental"]["matrix"]
    assert results["acc"] == results["task_incremental"]["average"]


def test_domain_incremental_trains_on_the_shared_label_space(tmp_path):
    domain = ["a" if i % 2 else "b" for i in range(len(TRAIN))]
    train = TRAIN.add_column("domain", domain)
    test = TEST.add_column("domain", ["a" if i % 2 else "b" for i in range(len(TEST))])
    tasks = domain_incremental_tasks(train, test, "domain")
    assert [len(t.train) for t in tasks] == [48, 48] and [len(t.test) for t in tasks] == [48, 48]
    model = tiny_vit(4)
    initial = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    trainer = ContinualPEGPTrainer(model=model, args=training_args(tmp_path), tasks=tasks)
    trainer.train()
    after_task_1 = load_file(f"{tmp_path}/task-1/adapter_model.safetensors")["base_model.model.classifier.weight"]
    moved = (after_task_1 - initial).abs().amax(dim=1)
    assert (moved > 1e-4).all()  # no logit mask: every class's row learned in task 1
    assert not np.isnan(matrices(trainer)["class_incremental"][:, 1]).any()


def test_online_scenario_makes_one_pass(tmp_path):
    tasks = online_tasks(TRAIN, TEST, 2)
    with pytest.raises(ValueError, match="single pass"):
        run(tmp_path, tasks, num_train_epochs=2)
    _, output = run(tmp_path, tasks, num_train_epochs=1)
    assert output.global_step == 2 * int(np.ceil(48 / 16))


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        (
            TaskSequence((ContinualTask("a", TRAIN.select(range(0)), TEST, (0, 1, 2, 3)),), "domain_incremental"),
            "task 'a' has an empty train split",
        ),
        (
            TaskSequence(
                (
                    ContinualTask(
                        "a", TRAIN.filter(lambda r: r["label"] < 2), TEST.filter(lambda r: r["label"] < 2), (0, 1)
                    ),
                    ContinualTask(
                        "b", TRAIN.filter(lambda r: r["label"] > 0), TEST.filter(lambda r: r["label"] > 0), (1, 2, 3)
                    ),
                ),
                "class_incremental",
            ),
            "class 1 is in both task 'a' and task 'b'",
        ),
    ],
)
def test_bad_task_sequences_fail_before_anything_is_written(tmp_path, tasks, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, tasks)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_labels_outside_the_head_fail_before_anything_is_written(tmp_path):
    wide = synthetic_images(num_labels=6)
    tasks = class_incremental_tasks(wide, synthetic_images(num_labels=6, seed=1), 2)
    with pytest.raises(ValueError, match=r"outside \[0, 4\) \(the model's num_labels\)"):
        run(tmp_path, tasks, num_labels=4)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_missing_label_column_is_named(tmp_path):
    unlabelled = Dataset.from_dict({"pixel_values": np.zeros((4, 1, 8, 8), dtype=np.float32), "y": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match="no label column 'label'"):
        class_incremental_tasks(unlabelled, unlabelled, 2)


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="threshold must be in"):
        PEGPTrainingArguments(output_dir=str(tmp_path), threshold=1.5)
    with pytest.raises(ValueError, match="loss_classes must be one of"):
        PEGPTrainingArguments(output_dir=str(tmp_path), loss_classes="all")
    with pytest.raises(ValueError, match="method must be one of"):
        PEGPTrainingArguments(output_dir=str(tmp_path), method="ewc")
    with pytest.raises(ValueError, match="save_strategy must be 'no'"):
        PEGPTrainingArguments(output_dir=str(tmp_path), save_strategy="steps")
    with pytest.raises(ValueError, match="protect is not a valid regular expression"):
        PEGPTrainingArguments(output_dir=str(tmp_path), protect="lora_[")
    with pytest.raises(ValueError, match="dataloader_persistent_workers must be False"):
        PEGPTrainingArguments(output_dir=str(tmp_path), dataloader_persistent_workers=True, dataloader_num_workers=1)
    with pytest.raises(ValueError, match="dataloader_drop_last must be False"):
        PEGPTrainingArguments(output_dir=str(tmp_path), dataloader_drop_last=True)


def test_unprotectable_lora_and_reused_optimizers_are_refused(tmp_path):
    tasks = class_incremental_tasks(TRAIN, TEST, 2)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=8, patch_size=4, num_channels=1, num_labels=4)  # fmt: skip
    biased = get_peft_model(
        ViTForImageClassification(config), LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)
    )
    with pytest.raises(ValueError, match="trainable LoRA bias"):
        ContinualPEGPTrainer(model=biased, args=training_args(tmp_path), tasks=tasks)
    model = tiny_vit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fresh optimizer"):
        ContinualPEGPTrainer(model=model, args=training_args(tmp_path), tasks=tasks, optimizers=(optimizer, None))


def test_a_trainer_trains_its_sequence_once(tmp_path):
    trainer, _ = run(tmp_path, class_incremental_tasks(TRAIN, TEST, 2))
    with pytest.raises(RuntimeError, match="already trained 2 tasks"):
        trainer.train()


def test_protect_pattern_selects_tensors_and_must_match_something(tmp_path):
    tasks = class_incremental_tasks(TRAIN, TEST, 2)
    only_a = ContinualPEGPTrainer(model=tiny_vit(), args=training_args(tmp_path, protect="lora_A"), tasks=tasks)
    assert only_a.projector.tensors and all("lora_A" in n for n in only_a.projector.tensors)
    expected = (
        r"of the lora adapter matches protect='adapter_down'.*protectable tensors are base_model\.model\..*lora_A"
    )
    with pytest.raises(ValueError, match=expected):
        ContinualPEGPTrainer(model=tiny_vit(), args=training_args(tmp_path, protect="adapter_down"), tasks=tasks)
    from peft import IA3Config

    ia3 = get_peft_model(plain_vit(), IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"of the ia3 adapter matches protect='lora'.*tensors are .*ia3_l"):
        ContinualPEGPTrainer(model=ia3, args=training_args(tmp_path, protect="lora"), tasks=tasks)


def test_trainer_refuses_datasets_and_models_without_adapter(tmp_path):
    tasks = class_incremental_tasks(TRAIN, TEST, 2)
    with pytest.raises(TypeError, match="args must be PEGPTrainingArguments, got TrainingArguments"):
        ContinualPEGPTrainer(model=tiny_vit(), args=TrainingArguments(str(tmp_path), use_cpu=True), tasks=tasks)
    with pytest.raises(TypeError, match=r"tasks must be a TaskSequence, got list: build one with class_incremental"):
        ContinualPEGPTrainer(model=tiny_vit(), args=training_args(tmp_path), tasks=list(tasks))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"output_dir .*a-file is a file; task checkpoints go into a folder"):
        training_args(tmp_path / "a-file")
    with pytest.raises(ValueError, match="sets train_dataset itself"):
        ContinualPEGPTrainer(model=tiny_vit(), args=training_args(tmp_path), tasks=tasks, train_dataset=TRAIN)
    with pytest.raises(TypeError, match="must carry a PET adapter"):
        ContinualPEGPTrainer(model=tiny_vit().get_base_model(), args=training_args(tmp_path), tasks=tasks)
