"""Class-incremental heads: prototype exactness, statistics, alignment against recency bias, checkpoints."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import AtTaskStart, lora_weights, matrices, synthetic_images, tiny_vit, training_args
from safetensors.torch import load_file, save_file

from pegp_hf import ContinualPEGPTrainer, class_incremental_tasks
from pegp_hf.continual.classification import HEAD_NAME
from pegp_hf.continual.heads import ClassStatistics, align_linear_head, prototype_logits, shrunk_covariances
from pegp_hf.io.checkpoint import CheckpointError


def gaussian_classes(means, per_class, noise, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(means)).repeat_interleave(per_class)
    return means[labels] + noise * torch.randn(len(labels), means.shape[1], generator=generator), labels


def test_prototype_head_is_exact_on_separable_features():
    means = 5 * torch.eye(6, 16)  # 6 orthogonal class means
    train, train_labels = gaussian_classes(means, 20, noise=0.3)
    test, test_labels = gaussian_classes(means, 10, noise=0.3, seed=1)
    stats = ClassStatistics.empty(num_labels=8, dim=16, with_covariances=False)
    stats.update(train, train_labels)
    logits = prototype_logits(test, stats)
    assert logits.shape == (60, 8)
    assert torch.equal(logits.argmax(1), test_labels)
    assert (logits[:, 6:] == torch.finfo(torch.float32).min).all()  # never-seen classes are never predicted
    torch.testing.assert_close(stats.means[:6].float(), train.view(6, 20, 16).mean(1))


def test_statistics_merge_exactly_across_batches():
    features, labels = gaussian_classes(torch.randn(3, 5), 30, noise=1.0)
    whole = ClassStatistics.empty(3, 5, with_covariances=True)
    whole.update(features, labels)
    parts = ClassStatistics.empty(3, 5, with_covariances=True)
    order = torch.randperm(90, generator=torch.Generator().manual_seed(0))
    for chunk in order.split(17):
        parts.update(features[chunk], labels[chunk])
    torch.testing.assert_close(parts.counts, whole.counts)
    torch.testing.assert_close(parts.means, whole.means)
    torch.testing.assert_close(parts.covariances, whole.covariances, atol=1e-5, rtol=1e-5)
    reference = torch.cov(features[labels == 1].T.double(), correction=0).float()
    torch.testing.assert_close(whole.covariances[1], reference, atol=1e-5, rtol=1e-5)


def test_single_sample_class_is_shrunk_not_a_crash():
    features, labels = gaussian_classes(3 * torch.eye(3, 4), 10, noise=0.5)
    stats = ClassStatistics.empty(4, 4, with_covariances=True)
    stats.update(features, labels)
    stats.update(torch.tensor([[0.0, 0.0, 0.0, 3.0]]), torch.tensor([3]))  # class 3: one sample, zero covariance
    assert torch.count_nonzero(stats.covariances[3]) == 0
    assert (torch.linalg.eigvalsh(shrunk_covariances(stats, 0.1)) > 0).all()
    linear = torch.nn.Linear(4, 4)
    align_linear_head(linear, stats, epochs=3)
    assert torch.isfinite(linear.weight).all()
    assert prototype_logits(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), stats).argmax() == 3


def test_alignment_repairs_a_recency_biased_head():
    means = 2 * torch.eye(4, 8)
    features, labels = gaussian_classes(means, 50, noise=0.7)
    test, test_labels = gaussian_classes(means, 50, noise=0.7, seed=1)
    # the recency bias of a masked linear head: task 2's classes (2, 3) got larger logits than task 1's (0, 1)
    linear = torch.nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight.copy_(means)
        linear.bias.copy_(torch.tensor([0.0, 0.0, 6.0, 6.0]))
    old = test_labels < 2

    def old_class_accuracy():
        return float((linear(test).argmax(1)[old] == test_labels[old]).float().mean())

    biased = old_class_accuracy()
    stats = ClassStatistics.empty(4, 8, with_covariances=True)
    stats.update(features, labels)
    align_linear_head(linear, stats)
    aligned = old_class_accuracy()
    assert biased < 0.2
    assert aligned > 0.8
    assert float((linear(test).argmax(1) == test_labels).float().mean()) > 0.85  # new classes not sacrificed


TRAIN, TEST = synthetic_images(num_labels=4), synthetic_images(num_labels=4, seed=1)
TASKS = class_incremental_tasks(TRAIN, TEST, 2, seed=0)


def make(tmp_path, head, method="pegp", **overrides):
    args = training_args(tmp_path, head=head, method=method, threshold=0.95, **overrides)
    return ContinualPEGPTrainer(model=tiny_vit(), args=args, tasks=TASKS)


def classifier_inputs(model, pixel_values):
    captured = []
    head = model.base_model.model.classifier
    handle = head.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        model(pixel_values=pixel_values)
    handle.remove()
    return captured[0]


def test_prototype_accuracy_matches_an_independent_nearest_mean(tmp_path):
    trainer = make(tmp_path, "prototype", method="head_only")
    before = lora_weights(trainer.model)
    trainer.train()
    after = lora_weights(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # head_only: the PET never moved
    model = trainer.model  # frozen backbone: features now equal features at any earlier time
    means = {}
    for task in TASKS:
        x = classifier_inputs(model, torch.stack([r["pixel_values"] for r in task.train]))
        y = torch.tensor([int(r["label"]) for r in task.train])
        means.update({c: x[y == c].mean(0) for c in task.classes})
    classes = sorted(means)
    prototypes = F.normalize(torch.stack([means[c] for c in classes]), dim=-1)
    for i, task in enumerate(TASKS):
        x = classifier_inputs(model, torch.stack([r["pixel_values"] for r in task.test]))
        y = np.array([int(r["label"]) for r in task.test])
        predicted = np.array(classes)[(F.normalize(x, dim=-1) @ prototypes.T).argmax(1).numpy()]
        assert matrices(trainer)["class_incremental"][i, 1] == pytest.approx(100 * np.mean(predicted == y))


@pytest.mark.parametrize("head", ["prototype", "aligned", "ranpac"])
def test_statistics_round_trip_and_resume(tmp_path, head):
    full = make(tmp_path / "full", head)
    full.train()
    stored = load_file(tmp_path / "full" / "task-2" / HEAD_NAME)
    for key, value in full.objective.statistics.state_dict().items():
        assert torch.equal(stored[key], value), key
    assert ("covariances" in stored) == (head == "aligned")

    crashed = make(tmp_path / "crash", head)
    crashed.add_callback(AtTaskStart(1, lambda m: (_ for _ in ()).throw(RuntimeError("crash"))))
    with pytest.raises(RuntimeError, match="crash"):
        crashed.train()
    resumed = make(tmp_path / "crash", head)
    resumed.train(resume_from_checkpoint=True)
    np.testing.assert_array_equal(matrices(resumed)["class_incremental"], matrices(full)["class_incremental"])
    for key, value in full.objective.statistics.state_dict().items():
        torch.testing.assert_close(resumed.objective.statistics.state_dict()[key], value)


def test_head_statistics_that_do_not_fit_are_named(tmp_path):
    make(tmp_path / "a", "prototype").train()
    head_file = tmp_path / "a" / "task-1" / HEAD_NAME
    statistics = load_file(head_file)
    statistics["means"] = statistics["means"][:, :-1].contiguous()  # another feature dim; the adapter still fits
    save_file(statistics, head_file)
    with pytest.raises(CheckpointError, match=r"pegp_head\.safetensors holds head statistics of shapes"):
        make(tmp_path / "b", "prototype").train(resume_from_checkpoint=str(tmp_path / "a" / "task-1"))
    other_head = make(tmp_path / "c", "aligned")
    with pytest.raises(CheckpointError, match="was trained with head='prototype', not 'aligned'"):
        other_head.train(resume_from_checkpoint=str(tmp_path / "a" / "task-1"))
