"""ContinualModel.from_pretrained: a task checkpoint loaded onto a fresh base model scores as the trained model did,
for LoRA (PEFT) and the pegp_hf tuners, with every head; CLIP's class-name classifier; the errors."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import IMAGE, plain_vit, tiny_clip, tiny_clip_tokenizer, tiny_vit, training_args, with_captions
from transformers import AutoImageProcessor, AutoModelForImageClassification

import pegp_hf.io.hub
from pegp_hf import ContinualModel, ContinualPEGPTrainer, class_incremental_tasks
from pegp_hf.continual.classification import HEAD_NAME
from pegp_hf.io.checkpoint import CheckpointError
from pegp_hf.multimodal.clip import CLIPForClassNameClassification, RevealSeenClasses, get_clip_pet_model
from pegp_hf.tuners import get_pet_model

README = Path(__file__).parents[1] / "README.md"


def noisy_images(per_class: int, seed: int) -> Dataset:
    """Four class patterns under heavy noise: the heads disagree on some images, so no accuracy is trivially 100."""
    prototypes = np.random.default_rng(1234).normal(size=(4, 1, IMAGE, IMAGE)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), per_class)
    pixels = prototypes[labels] + 2.0 * rng.normal(size=(len(labels), 1, IMAGE, IMAGE)).astype(np.float32)
    return Dataset.from_dict({"pixel_values": pixels, "label": labels}).with_format("torch")


TRAIN, TEST = noisy_images(24, seed=0), noisy_images(12, seed=1)
TASKS = class_incremental_tasks(TRAIN, TEST, 2, seed=0)
PIXELS = TEST[:]["pixel_values"]
RUNS = [(pet, head) for pet in ("lora", "adapter", "prefix", "prompt")
        for head in ("masked_linear", "prototype", "aligned", "ranpac")]  # fmt: skip


def pet_model(pet: str) -> torch.nn.Module:
    """The recipe's model (``get_pet_model`` with the classifier saved), tiny."""
    return get_pet_model(plain_vit(), pet, width=3, modules_to_save=["classifier"], target_modules=None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(pet, head)``: ``(trainer, output_dir)`` of a 2-task run, trained once per module."""
    runs = {}

    def run(pet: str, head: str):
        if (pet, head) not in runs:
            output_dir = tmp_path_factory.mktemp(f"{pet}-{head}")
            args = training_args(output_dir, head=head, threshold=0.9, num_train_epochs=1, ranpac_dim=64,
                                 align_epochs=2, align_samples_per_class=64)  # fmt: skip
            trainer = ContinualPEGPTrainer(model=pet_model(pet), args=args, tasks=TASKS)
            trainer.train()
            runs[pet, head] = trainer, output_dir
        return runs[pet, head]

    return run


def trained_logits(trainer, dataset) -> torch.Tensor:
    """The logits the trainer's accuracy matrices were computed from (``ClassificationAccuracy``)."""
    features, logits, _ = trainer.objective.predict(trainer, dataset)
    return logits if features is None else trainer.objective.head_logits(features)


def accuracy(predicted: torch.Tensor, dataset) -> float:
    """As ``restricted_accuracy`` computes it: percent, float64."""
    return float(100.0 * np.mean(predicted.numpy() == dataset[:]["label"].numpy()))


@pytest.mark.parametrize(("pet", "head"), RUNS, ids=[f"{pet}-{head}" for pet, head in RUNS])
def test_the_loaded_model_scores_as_the_trained_one(trained, pet, head):
    trainer, output_dir = trained(pet, head)
    loaded = ContinualModel.from_pretrained(output_dir, plain_vit())  # the output_dir: its newest task, task-2
    assert loaded.checkpoint.name == "task-2" and loaded.head == head and loaded.seen_classes == [0, 1, 2, 3]
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())

    expected = trained_logits(trainer, TEST)
    with torch.no_grad():
        output = loaded(pixel_values=PIXELS, labels=TEST[:]["label"])  # labels are dropped, as in evaluation
        raw = loaded.model(pixel_values=PIXELS).logits
        untrained = plain_vit().eval()(pixel_values=PIXELS).logits
    torch.testing.assert_close(output.logits, expected, rtol=1e-5, atol=1e-5)
    assert output.features.shape == (len(TEST), 32)
    assert not torch.allclose(raw, untrained, atol=1e-3)  # the adapter and head were loaded: a bare base fails
    if head in ("prototype", "ranpac"):  # the head's scores are not the classifier's: a loader ignoring them fails
        assert not torch.allclose(raw, expected, atol=1e-3)

    # the stored last column of both matrices, recomputed from the loaded model's predictions
    stored = {name: matrix.values[:, -1] for name, matrix in loaded.results.matrices.items()}
    column = [accuracy(loaded.predict(task.test, batch_size=7), task.test) for task in TASKS]
    np.testing.assert_array_equal(column, stored["class_incremental"])
    column = [accuracy(loaded.predict(task.test, classes=task.classes), task.test) for task in TASKS]
    np.testing.assert_array_equal(column, stored["task_incremental"])
    assert min(stored["class_incremental"]) < 100  # not a trivial column that any loader would reproduce


def test_an_earlier_task_loads_its_own_head_and_the_stored_state(trained):
    trainer, output_dir = trained("lora", "prototype")
    first = ContinualModel.from_pretrained(output_dir, plain_vit(), task=1)
    assert first.checkpoint.name == "task-1" and first.finished_tasks == 1
    assert first.seen_classes == sorted(TASKS[0].classes) and first.task_classes == [list(TASKS[0].classes)]
    logits = first(pixel_values=PIXELS).logits
    unseen = sorted(TASKS[1].classes)
    assert (logits[:, unseen] == torch.finfo(logits.dtype).min).all()  # task 2's classes had no mean yet
    assert set(first.predict(TEST).tolist()) <= set(TASKS[0].classes)
    stored = first.results.matrices["class_incremental"].values
    assert accuracy(first.predict(TASKS[0].test), TASKS[0].test) == stored[0, 0] and np.isnan(stored[:, 1]).all()

    last = ContinualModel.from_pretrained(output_dir / "task-2", plain_vit())
    assert last.task_names == [task.name for task in TASKS] and last.training_config["head"] == "prototype"
    assert last.training_config == trainer._config() and last.config.num_labels == 4
    for name, matrix in trainer.results.matrices.items():
        np.testing.assert_array_equal(last.results.matrices[name].values, matrix.values)
    assert last.results.headline == trainer.results.headline
    assert last.predict({"pixel_values": PIXELS[:5], "label": TEST[:5]["label"]}).shape == (5,)  # one batch


def test_a_base_model_given_by_folder_or_by_hub_repo(trained, tmp_path, monkeypatch):
    trainer, output_dir = trained("prefix", "prototype")
    expected = trained_logits(trainer, TEST)
    plain_vit().save_pretrained(tmp_path / "base")  # its config names ViTForImageClassification
    by_folder = ContinualModel.from_pretrained(output_dir, str(tmp_path / "base"))
    torch.testing.assert_close(by_folder(pixel_values=PIXELS).logits, expected, rtol=1e-5, atol=1e-5)

    shutil.copytree(output_dir / "task-2", tmp_path / "remote")  # a pushed repo: the task folder at its root
    monkeypatch.setattr(pegp_hf.io.hub, "snapshot_download", lambda repo_id, token=None, revision=None:
                        str(tmp_path / "remote") if repo_id == "user/run" else None)  # fmt: skip
    from_hub = ContinualModel.from_pretrained("user/run", plain_vit())
    assert from_hub.finished_tasks == 2
    torch.testing.assert_close(from_hub(pixel_values=PIXELS).logits, expected, rtol=1e-5, atol=1e-5)


def test_what_does_not_fit_is_named(trained, tmp_path):
    _, lora_dir = trained("lora", "prototype")
    _, prefix_dir = trained("prefix", "prototype")
    with pytest.raises(CheckpointError, match="is not a pegp_hf task checkpoint"):
        ContinualModel.from_pretrained(tmp_path, plain_vit())
    with pytest.raises(CheckpointError, match="holds no task checkpoint task-5"):
        ContinualModel.from_pretrained(lora_dir, plain_vit(), task=5)
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        ContinualModel.from_pretrained(tmp_path / "missing", plain_vit())
    with pytest.raises(ValueError, match=r"does not record its base model.*pass base_model="):
        ContinualModel.from_pretrained(lora_dir)  # built from a config: nothing to load by name
    for folder in (lora_dir, prefix_dir):
        with pytest.raises(ValueError, match="does not fit the base model ViTForImageClassification"):
            ContinualModel.from_pretrained(folder, plain_vit(hidden=48))
    with pytest.raises(ValueError, match="does not fit the base model"):
        ContinualModel.from_pretrained(lora_dir, plain_vit(num_labels=6))  # another classifier
    with pytest.raises(ValueError, match="already carries a PEFT adapter"):
        ContinualModel.from_pretrained(lora_dir, tiny_vit())
    with pytest.raises(ValueError, match="no module named 'fc'"):
        ContinualModel.from_pretrained(lora_dir, plain_vit(), head_module="fc")
    with pytest.raises(TypeError, match="load a base model by name"):
        ContinualModel.from_pretrained(lora_dir, plain_vit(), torch_dtype=torch.float16)
    shutil.copytree(lora_dir / "task-2", tmp_path / "headless")
    (tmp_path / "headless" / HEAD_NAME).unlink()
    with pytest.raises(CheckpointError, match=f"trained with head='prototype' but holds no {HEAD_NAME}"):
        ContinualModel.from_pretrained(tmp_path / "headless", plain_vit())


def test_clip_class_name_classifier_gets_its_adapter_projections_and_seen_classes(tmp_path):
    names, templates = ["circle", "square", "cross", "bar"], ["a photo of a {} .", "an image of the {} ."]

    def classifier(perturbed: bool = False) -> CLIPForClassNameClassification:
        model = CLIPForClassNameClassification(tiny_clip(), tiny_clip_tokenizer(), names, templates)
        if perturbed:  # projections unlike the trained ones: the adapter's saved copies must be the ones used
            with torch.no_grad():
                model.clip.visual_projection.weight.normal_()
                model.clip.text_projection.weight.normal_()
        return model

    test = with_captions(TEST, names, seed=1)
    tasks = class_incremental_tasks(with_captions(noisy_images(12, seed=0), names), test, 2, seed=0)
    model = get_clip_pet_model(classifier(), "lora", "both", width=4, layers="all", target_modules=["q_proj", "v_proj"])
    args = training_args(tmp_path, threshold=0.9, num_train_epochs=1)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=tasks, callbacks=[RevealSeenClasses()])
    trainer.train()
    with torch.no_grad():
        expected = trainer.model.eval()(pixel_values=PIXELS).logits

    first = ContinualModel.from_pretrained(tmp_path, classifier(perturbed=True), task=1)
    assert first.model.get_base_model().known.tolist() == [c in tasks[0].classes for c in range(4)]
    loaded = ContinualModel.from_pretrained(tmp_path, classifier(perturbed=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=PIXELS).logits, expected, rtol=1e-5, atol=1e-5)
    column = [accuracy(loaded.predict(task.test), task.test) for task in tasks]  # the caption column is left out
    np.testing.assert_array_equal(column, loaded.results.matrices["class_incremental"].values[:, -1])


def test_the_readme_example_runs(trained, tmp_path, monkeypatch):
    section = README.read_text().split("### Load a continual adapter for inference", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    trainer, output_dir = trained("lora", "aligned")
    (tmp_path / "out").symlink_to(output_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoModelForImageClassification, "from_pretrained", lambda name, num_labels: plain_vit())
    monkeypatch.setattr(AutoImageProcessor, "from_pretrained",
                        lambda name: lambda images, return_tensors: {"pixel_values": torch.stack(images)})  # fmt: skip
    namespace = {"images": list(PIXELS[:6])}
    exec(compile(code, str(README), "exec"), namespace)
    torch.testing.assert_close(namespace["logits"], trained_logits(trainer, TEST)[:6], rtol=1e-5, atol=1e-5)
    assert torch.equal(namespace["predicted"], namespace["logits"].argmax(1))
