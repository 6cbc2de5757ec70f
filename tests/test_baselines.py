"""The baselines of pre-trained class-incremental learning and the head statistics that follow drift: the RanPAC
head against a closed-form ridge solution, ``first_session`` freezing the PET after task 1, and semantic drift
compensation moving stored means by the measured drift."""

import numpy as np
import pytest
import torch
from helpers import AtTaskStart, lora_weights, matrices, synthetic_images, tiny_vit, training_args

from pegp_hf import ContinualPEGPTrainer, PEGPTrainingArguments, class_incremental_tasks
from pegp_hf.continual.heads import ClassStatistics, compensate_drift
from pegp_hf.continual.ranpac import RIDGE_CANDIDATES, RandomProjectionStatistics, select_ridge


def gaussian_classes(num_classes, dim, per_class, seed=0, noise=0.5):
    generator = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(100))
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return means[labels] + noise * torch.randn(len(labels), dim, generator=generator), labels


def test_ranpac_head_is_the_ridge_solution_on_every_feature_seen():
    features, labels = gaussian_classes(6, 16, 30)
    statistics = RandomProjectionStatistics.empty(num_labels=8, dim=16, projection_dim=64, seed=0)
    first = labels < 3
    statistics.update(features[first], labels[first], ridge=0.5)  # task 1: classes 0-2
    statistics.update(features[~first], labels[~first], ridge=0.5)  # task 2: classes 3-5

    # the closed form on all 180 samples at once, as an augmented least-squares problem (no Gram matrix)
    hidden = np.maximum(features.double().numpy() @ statistics.projection.double().numpy(), 0.0)
    targets = np.eye(8)[labels.numpy()]
    augmented = np.vstack([hidden, np.sqrt(0.5) * np.eye(64)])
    expected, *_ = np.linalg.lstsq(augmented, np.vstack([targets, np.zeros((64, 8))]), rcond=None)
    np.testing.assert_allclose(statistics.weights().numpy(), expected, rtol=1e-7, atol=1e-9)

    test, test_labels = gaussian_classes(6, 16, 10, seed=1)
    logits = statistics.logits(test)
    np.testing.assert_allclose(logits[:, :6].numpy(), (np.maximum(test.double().numpy() @ statistics.projection.double()
                               .numpy(), 0) @ expected)[:, :6], rtol=1e-4, atol=1e-5)  # fmt: skip
    assert (logits[:, 6:] == torch.finfo(torch.float32).min).all()  # classes 6, 7 never seen
    assert float((logits.argmax(1) == test_labels).float().mean()) > 0.95


def test_the_ridge_is_the_candidate_that_best_predicts_a_held_out_fifth():
    features, labels = gaussian_classes(3, 12, 20, noise=2.0)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    hidden = torch.relu(
        features[order].double() @ torch.randn(12, 40, generator=torch.Generator().manual_seed(1)).double()
    )
    onehot = torch.nn.functional.one_hot(labels[order], 3).double()
    fit, held_out = hidden[:48].numpy(), hidden[48:].numpy()
    errors = [
        np.mean((held_out @ np.linalg.solve(fit.T @ fit + ridge * np.eye(40), fit.T @ onehot[:48].numpy())
                 - onehot[48:].numpy()) ** 2)
        for ridge in RIDGE_CANDIDATES
    ]  # fmt: skip
    assert select_ridge(hidden, onehot) == RIDGE_CANDIDATES[int(np.argmin(errors))]
    assert len(set(np.round(np.log10(errors), 3))) > 3  # the candidates really differ on this data


def test_drift_compensation_moves_each_old_mean_by_the_drift_of_the_samples_near_it():
    statistics = ClassStatistics.empty(num_labels=4, dim=6, with_covariances=False)
    near_zero, near_one = torch.zeros(6), torch.full((6,), 10.0)
    statistics.update(torch.stack([near_zero, near_one]), torch.tensor([0, 1]))
    generator = torch.Generator().manual_seed(0)
    before = torch.cat([near_zero + 0.3 * torch.randn(20, 6, generator=generator),
                        near_one + 0.3 * torch.randn(20, 6, generator=generator)])  # fmt: skip
    drift_zero, drift_one = torch.tensor([1.0, -2.0, 0, 0, 0, 0]), torch.tensor([0, 0, 0, 0.5, 0.5, 3.0])
    after = before + torch.cat([drift_zero.expand(20, 6), drift_one.expand(20, 6)])
    shift = compensate_drift(statistics, before, after, torch.tensor([0, 1]))
    torch.testing.assert_close(shift.float(), torch.stack([drift_zero, drift_one]), atol=1e-6, rtol=0)
    torch.testing.assert_close(statistics.means[:2].float(), torch.stack([drift_zero, near_one + drift_one]))
    assert torch.equal(statistics.means[2:], torch.zeros(2, 6))  # unseen rows untouched


TRAIN, TEST = synthetic_images(num_labels=4), synthetic_images(num_labels=4, seed=1)
TASKS = class_incremental_tasks(TRAIN, TEST, 2, seed=0)


def make(tmp_path, **overrides):
    args = training_args(tmp_path, threshold=0.95, **overrides)
    return ContinualPEGPTrainer(model=tiny_vit(), args=args, tasks=TASKS)


def test_first_session_trains_the_pet_on_task_1_only(tmp_path):
    trainer = make(tmp_path, method="first_session")
    initial = lora_weights(trainer.model)
    head = lambda model: {n: p.detach().clone() for n, p in model.named_parameters() if "classifier" in n}  # noqa: E731
    after_task_1 = AtTaskStart(1, lambda model: (lora_weights(model), head(model)))
    trainer.add_callback(after_task_1)
    trainer.train()
    adapted, head_after_task_1 = after_task_1.result
    assert any(not torch.equal(initial[n], adapted[n]) for n in initial)  # task 1 trained the PET
    final = lora_weights(trainer.model)
    assert all(torch.equal(adapted[n], final[n]) for n in adapted)  # and nothing moved it afterwards
    assert any(not torch.equal(value, head(trainer.model)[n]) for n, value in head_after_task_1.items())
    bases = trainer.projector.bases  # the LoRA tensors are listed, but no subspace is kept: nothing to protect
    assert bases and all(basis.shape[1] == 0 for basis in bases.values())


def test_first_session_resumes_frozen(tmp_path):
    full = make(tmp_path / "full", method="first_session")
    full.train()
    crashed = make(tmp_path / "crash", method="first_session")
    crashed.add_callback(AtTaskStart(1, lambda model: (_ for _ in ()).throw(RuntimeError("crash"))))
    with pytest.raises(RuntimeError, match="crash"):
        crashed.train()
    resumed = make(tmp_path / "crash", method="first_session")
    resumed.train(resume_from_checkpoint=True)
    assert all(torch.equal(full_w, lora_weights(resumed.model)[n]) for n, full_w in lora_weights(full.model).items())
    np.testing.assert_array_equal(matrices(resumed)["class_incremental"], matrices(full)["class_incremental"])


def classifier_inputs(model, rows):
    captured = []
    head = model.base_model.model.classifier
    handle = head.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    training = model.training
    model.eval()
    with torch.no_grad():
        model(pixel_values=torch.stack([row["pixel_values"] for row in rows]))
    model.train(training)
    handle.remove()
    return captured[0]


def test_drift_compensation_in_the_trainer_uses_the_same_samples_before_and_after_the_task(tmp_path):
    plain = make(tmp_path / "plain", method="sequential", head="prototype")
    plain.train()
    compensated = make(tmp_path / "sdc", method="sequential", head="prototype", drift_compensation=True)
    rows = TASKS[1].train.shuffle(seed=compensated.args.seed).select(range(len(TASKS[1].train))).with_format("torch")
    before = AtTaskStart(1, lambda model: classifier_inputs(model, rows))
    compensated.add_callback(before)
    compensated.train()
    for name, weight in lora_weights(plain.model).items():  # the extra forward pass changed no training
        assert torch.equal(weight, lora_weights(compensated.model)[name]), name
    old, new = list(TASKS[0].classes), list(TASKS[1].classes)
    expected = ClassStatistics(plain.objective.statistics.counts.clone(), plain.objective.statistics.means.clone(),
                               None)  # fmt: skip
    shift = compensate_drift(expected, before.result, classifier_inputs(compensated.model, rows), torch.tensor(old))
    assert shift.abs().max() > 1e-3  # sequential tuning moved the features, so there is a drift to follow
    means = compensated.objective.statistics.means
    torch.testing.assert_close(means[old], expected.means[old], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means[new], plain.objective.statistics.means[new])


def test_drift_compensation_needs_a_head_with_class_means(tmp_path):
    with pytest.raises(ValueError, match="drift_compensation moves the class means of the prototype / aligned"):
        PEGPTrainingArguments(output_dir=str(tmp_path), head="ranpac", drift_compensation=True)


@pytest.mark.parametrize(
    ("method", "head", "threshold", "warned"),
    [("pegp", "aligned", 0.97, True), ("pegp", "ranpac", 0.99, True), ("pegp", "ranpac", 0.999, False),
     ("pegp", "masked_linear", 0.97, False), ("sequential", "aligned", 0.97, False)],
)  # fmt: skip
def test_a_statistics_head_under_pegp_below_the_measured_threshold_is_warned_about(
    tmp_path, caplog, method, head, threshold, warned
):
    args = training_args(tmp_path, method=method, head=head, threshold=threshold)
    with caplog.at_level("WARNING", logger="pegp_hf.continual.classification"):
        ContinualPEGPTrainer(model=tiny_vit(), args=args, tasks=TASKS)
    assert ("pass threshold>=0.999" in caplog.text) == warned
