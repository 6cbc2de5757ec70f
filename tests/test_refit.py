"""Re-fitting the text projection of a continual CLIP on stored image embeddings (pegp_hf.multimodal.refit)."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import clip_tasks, tiny_clip_classifier, training_args
from safetensors.torch import load_file, save_file

from pegp_hf import ContinualPEGPTrainer
from pegp_hf.multimodal.clip import RevealSeenClasses, ensemble_prompts, get_clip_pet_model
from pegp_hf.multimodal.prototypes import REFIT_NAME, PrototypeReplayObjective
from pegp_hf.multimodal.refit import (
    DecisionMargin,
    Distillation,
    TextProjectionRefit,
    projected,
    projection_weights,
    prompt_features,
    refit_loss,
    refit_text_projection,
)
from pegp_hf.utils import CheckpointError


def _classifier():
    classifier = tiny_clip_classifier(0)
    classifier.reveal_classes([0, 1, 2, 3])
    return classifier


def _stored(per_class: int = 12, spread: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings ``(4 * per_class, 16)`` around four random directions, and their labels."""
    generator = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    labels = torch.arange(4).repeat_interleave(per_class)
    return F.normalize(centres[labels] + spread * torch.randn(len(labels), 16, generator=generator), dim=-1), labels


@torch.no_grad()
def _measured(classifier, embeds, labels, scale):
    """The model's own prompt embeddings ``(C, K, D)`` scored as the refit's loss says, and the share of
    ``embeds`` whose most similar prompt is of another class."""
    classifier.eval()
    prompts = classifier.encode_text(**classifier.prompt_inputs(torch.arange(4))).view(4, 2, -1).double()
    logits = scale * torch.einsum("nd,ckd->nck", embeds.double(), prompts)
    own = torch.logsumexp(logits[torch.arange(len(labels)), labels], 1)
    loss = (torch.logsumexp(logits.flatten(1), 1) - own).mean()
    loss = loss + F.cross_entropy(scale * embeds.double() @ ensemble_prompts(prompts).T, labels)
    wrong = (logits.flatten(1).argmax(1) // 2 != labels).double().mean()
    return float(loss), float(wrong)


def test_the_refit_puts_the_stored_embeddings_on_their_own_prompts_and_changes_only_the_projection():
    classifier = _classifier()
    embeds, labels = _stored()
    before = {name: t.detach().clone() for name, t in [*classifier.named_parameters(), *classifier.named_buffers()]}
    loss_before, wrong_before = _measured(classifier, embeds, labels, 10.0)
    figures = refit_text_projection(classifier, embeds, labels, scale=10.0)
    loss_after, wrong_after = _measured(classifier, embeds, labels, 10.0)
    # the loss it reports is the loss of the model as it now computes its prompts (the hooked features are right)
    assert figures["refit_loss_before"] == pytest.approx(loss_before, rel=1e-5)
    assert figures["refit_loss_after"] == pytest.approx(loss_after, rel=1e-5)
    assert loss_after < 0.5 * loss_before and wrong_before > 0.3 and wrong_after == 0.0, (figures, wrong_before)
    changed = [name for name, t in [*classifier.named_parameters(), *classifier.named_buffers()]
               if not torch.equal(t, before[name])]  # fmt: skip
    assert changed == ["clip.text_projection.weight"]
    new, old = classifier.clip.text_projection.weight.detach(), before[changed[0]]
    assert figures["refit_weight_change"] == pytest.approx(float((new - old).norm() / old.norm()), rel=1e-5)

    again = _classifier()
    refit_text_projection(again, embeds, labels, scale=10.0)
    assert torch.equal(again.clip.text_projection.weight, new)  # every process writes the same bits


def test_bad_stored_embeddings_are_refused_before_the_projection_changes():
    classifier = _classifier()
    embeds, labels = _stored()
    weight = classifier.clip.text_projection.weight.clone()
    nan = embeds.clone()
    nan[3, 2] = float("nan")
    for bad, message in (((nan, labels, 10.0), "NaN"), ((embeds[:0], labels[:0], 10.0), "N > 0"),
                         ((embeds, labels[:-1], 10.0), "labels"), ((embeds, labels, 0.0), "scale"),
                         ((embeds, labels + 1, 10.0), "not all known"),
                         ((embeds[:, :8], labels, 10.0), "width 8")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            refit_text_projection(classifier, *bad)
    classifier.reveal_classes([0, 1])
    with pytest.raises(ValueError, match="RevealSeenClasses"):
        refit_text_projection(classifier, embeds, labels, 10.0)
    assert torch.equal(classifier.clip.text_projection.weight, weight)


def test_the_margin_term_counts_only_the_decisions_that_no_longer_hold_by_the_margin():
    features = torch.eye(3, dtype=torch.float64)[:, None, :]  # 3 classes, 1 prompt each: the class directions
    identity = torch.eye(3, dtype=torch.float64)  # so each cosine is the embedding's coordinate
    embeds = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.6, 0.55, 0.0], [0.0, 0.1, 1.0]], dtype=torch.float64), dim=1)
    cosines = embeds.clone()
    term = DecisionMargin(embeds, torch.tensor([0, 0, 2]), logit_scale=10.0, margin=0.1, weight=1.0)
    # rows 0 and 2 hold their decision by more than 0.1; row 1 by 0.737 - 0.676 only
    short = 10.0 * (cosines[1, 1] - cosines[1, 0] + 0.1)
    assert short > 0 and float(term.loss(identity, None, features)) == pytest.approx(float(short**2 / 3))
    assert float(DecisionMargin(embeds, torch.tensor([0, 0, 2]), 10.0, 0.0, 1.0).loss(identity, None, features)) == 0
    flipped = DecisionMargin(embeds, torch.tensor([1, 0, 2]), 10.0, 0.0, 1.0)  # row 0 said class 1
    assert float(flipped.loss(identity, None, features)) == pytest.approx(
        float((10.0 * (cosines[0, 0] - cosines[0, 1])) ** 2 / 3)
    )


def _decisions(classifier, embeds):
    """The class each of ``embeds`` ``(R, D)`` gets from the classifier's prompt-ensembled classes now."""
    prompts = projected(prompt_features(classifier, torch.arange(4)), *projection_weights(classifier))
    return (embeds @ ensemble_prompts(prompts).T).argmax(1)


def test_the_margin_term_keeps_every_reference_decision_and_leaves_the_fit_freer_than_the_kl():
    embeds, labels = _stored()
    generator = torch.Generator().manual_seed(5)
    reference = F.normalize(torch.randn(40, 16, generator=generator, dtype=torch.float64), dim=1)
    classifier = _classifier()
    decisions = _decisions(classifier, reference)
    free = _classifier()
    refit_text_projection(free, embeds, labels, 10.0)
    assert (_decisions(free, reference) != decisions).sum() >= 5  # without a reference term, decisions move

    scale = float(classifier.clip.logit_scale.detach().exp())
    margin = _classifier()
    refit_text_projection(margin, embeds, labels, 10.0, DecisionMargin(reference, decisions, scale, 0.05, 10.0))
    assert torch.equal(_decisions(margin, reference), decisions)
    teacher = torch.softmax(scale * reference @ projected(prompt_features(classifier, torch.arange(4)).flatten(0, 1),
                                                          *projection_weights(classifier)).T, dim=1)  # fmt: skip
    kl = _classifier()
    refit_text_projection(kl, embeds, labels, 10.0, Distillation(reference, teacher, scale, 10.0))

    def fit(model):  # the stored embeddings' own loss, the reference term left out
        features = prompt_features(model, torch.arange(4))
        return float(refit_loss(*projection_weights(model), features, embeds.double(), labels, 10.0))

    assert fit(margin) < fit(kl) < fit(_classifier()), (fit(margin), fit(kl))


def _reference():
    return clip_tasks()[1].test  # any image rows: here task 2's test images


def _trainer(output_dir, scale=10.0, reference=None, reference_weight=10.0, **refit):
    model = get_clip_pet_model(tiny_clip_classifier(0), "lora", width=4, layers="all",
                               target_modules=("q_proj", "v_proj"))  # fmt: skip
    refit = TextProjectionRefit(scale, reference, reference_weight, **refit)
    objective = PrototypeReplayObjective(spread="stored", refit=refit)
    return ContinualPEGPTrainer(model=model, args=training_args(output_dir, loss_classes="seen"), tasks=clip_tasks(),
                                objective=objective, callbacks=[RevealSeenClasses()])  # fmt: skip


def test_the_trainer_refits_after_each_task_saves_the_projection_and_resumes_to_the_same_weights(tmp_path):
    full = _trainer(tmp_path / "full")
    start = full.model.get_base_model().clip.text_projection.weight.clone()
    full.train()
    projection = full.model.get_base_model().clip.text_projection
    assert not torch.equal(projection.weight, start)
    assert torch.equal(projection.original_module.weight, start)  # PEFT's copy moved, the base weight did not
    saved = load_file(tmp_path / "full" / "task-2" / "adapter_model.safetensors")
    key = next(k for k in saved if "text_projection" in k)
    assert torch.equal(saved[key], projection.weight)

    shutil.copytree(tmp_path / "full" / "task-1", tmp_path / "resumed" / "task-1")
    resumed = _trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)
    torch.testing.assert_close(resumed.model.get_base_model().clip.text_projection.weight, projection.weight)
    assert resumed.continual_results()["class_incremental"] == full.continual_results()["class_incremental"]
    with pytest.raises(CheckpointError, match="replay"):  # a checkpoint made with another re-fit is refused
        _trainer(tmp_path / "other", scale=30.0).train(resume_from_checkpoint=str(tmp_path / "full" / "task-1"))


@torch.no_grad()
def _reference_divergence(trainer) -> float:
    """KL(p_0 || p_W) on the reference images, with the model as it is now."""
    refit = trainer.objective.refit
    classifier = trainer.model.get_base_model()
    probabilities = refit.reference_probabilities(trainer, classifier)
    return float(F.kl_div(probabilities.log(), refit.teacher, reduction="batchmean"))


def test_the_reference_term_keeps_the_pretrained_predictions_on_the_reference_images(tmp_path):
    kept = _trainer(tmp_path / "kept", reference=_reference(), reference_weight=100.0)
    start = kept.model.get_base_model().clip.text_projection.weight.clone()
    kept.train()
    teacher = kept.objective.refit.teacher
    assert teacher.shape == (len(_reference()), 4 * 2) and torch.allclose(teacher.sum(1), teacher.new_ones(1))
    untrained = _trainer(tmp_path / "untrained", reference=_reference())
    pretrained = untrained.objective.refit.reference_probabilities(untrained, untrained.model.get_base_model())
    torch.testing.assert_close(teacher, pretrained)  # p_0: the model before the first task
    free = _trainer(tmp_path / "free", reference=_reference(), reference_weight=1e-6)
    free.train()
    assert not torch.equal(kept.model.get_base_model().clip.text_projection.weight, start)
    assert _reference_divergence(kept) < 0.2 * _reference_divergence(free), (
        _reference_divergence(kept),
        _reference_divergence(free),
    )

    shutil.copytree(tmp_path / "kept" / "task-1", tmp_path / "resumed" / "task-1")
    resumed = _trainer(tmp_path / "resumed", reference=_reference(), reference_weight=100.0)
    resumed.train(resume_from_checkpoint=True)
    assert torch.equal(resumed.objective.refit.teacher, teacher)  # read back, not taken again from the trained model
    torch.testing.assert_close(resumed.model.get_base_model().clip.text_projection.weight,
                               kept.model.get_base_model().clip.text_projection.weight)  # fmt: skip
    other = clip_tasks()[0].test.select(range(len(_reference())))  # as many rows, other images
    with pytest.raises(CheckpointError, match="reference_sha256"):
        _trainer(tmp_path / "other", reference=other, reference_weight=100.0).train(
            resume_from_checkpoint=str(tmp_path / "kept" / "task-1")
        )
    (tmp_path / "broken").mkdir()
    shutil.copytree(tmp_path / "kept" / "task-1", tmp_path / "broken" / "task-1")
    (tmp_path / "broken" / "task-1" / REFIT_NAME).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=REFIT_NAME):
        _trainer(tmp_path / "broken", reference=_reference(), reference_weight=100.0).train(resume_from_checkpoint=True)
    save_file({"teacher": teacher.round().long()}, tmp_path / "broken" / "task-1" / REFIT_NAME)  # ids' dtype
    with pytest.raises(CheckpointError, match="reference probabilities"):
        _trainer(tmp_path / "broken", reference=_reference(), reference_weight=100.0).train(resume_from_checkpoint=True)


def test_the_trainer_keeps_the_pretrained_decisions_with_the_margin_term_and_resumes_them(tmp_path):
    kept = _trainer(tmp_path / "kept", reference=_reference(), reference_weight=100.0, reference_loss="margin")
    kept.train()
    teacher = kept.objective.refit.teacher
    untrained = _trainer(tmp_path / "untrained", reference=_reference(), reference_loss="margin")
    pretrained = untrained.objective.refit.reference_decisions(untrained, untrained.model.get_base_model())
    assert teacher.dtype == torch.int64 and torch.equal(teacher, pretrained)  # the decisions before the first task
    free = _trainer(tmp_path / "free", reference=_reference(), reference_weight=1e-6, reference_loss="margin")
    free.train()
    lost = {name: int((t.objective.refit.reference_decisions(t, t.model.get_base_model()) != teacher).sum())
            for name, t in (("kept", kept), ("free", free))}  # fmt: skip
    assert lost["kept"] == 0 < lost["free"], lost  # 0 and 8 of 16 here

    shutil.copytree(tmp_path / "kept" / "task-1", tmp_path / "resumed" / "task-1")
    resumed = _trainer(tmp_path / "resumed", reference=_reference(), reference_weight=100.0, reference_loss="margin")
    resumed.train(resume_from_checkpoint=True)
    assert torch.equal(resumed.objective.refit.teacher, teacher)
    torch.testing.assert_close(resumed.model.get_base_model().clip.text_projection.weight,
                               kept.model.get_base_model().clip.text_projection.weight)  # fmt: skip
    with pytest.raises(CheckpointError, match="replay"):  # the KL term cannot continue a margin run
        _trainer(tmp_path / "kl", reference=_reference(), reference_weight=100.0).train(
            resume_from_checkpoint=str(tmp_path / "kept" / "task-1")
        )
    shutil.copytree(tmp_path / "kept" / "task-1", tmp_path / "broken" / "task-1")
    for bad in (torch.full_like(teacher, 9), teacher.double(), torch.cat([teacher, teacher[:1]])):  # class 9 of 4,
        save_file({"teacher": bad}, tmp_path / "broken" / "task-1" / REFIT_NAME)  # probabilities' dtype, a row more
        with pytest.raises(CheckpointError, match="reference decisions"):
            _trainer(
                tmp_path / "broken", reference=_reference(), reference_weight=100.0, reference_loss="margin"
            ).train(resume_from_checkpoint=True)


def test_refit_settings_that_cannot_work_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="spread='stored'"):
        PrototypeReplayObjective(refit=TextProjectionRefit(10.0))
    for options in ({"scale": 0.0}, {"scale": 1.0, "reference_weight": 0.0}, {"scale": 1.0, "max_iter": 0}):
        with pytest.raises(ValueError, match="scale > 0, reference_weight > 0 and max_iter >= 1"):
            TextProjectionRefit(**options)
    for options in ({"reference_loss": "l2"}, {"margin": -0.1}):
        with pytest.raises(ValueError, match="reference_loss is one of"):
            TextProjectionRefit(1.0, **options)
    with pytest.raises(ValueError, match="pass a reference set"):
        TextProjectionRefit(1.0, reference_loss="margin")
    with pytest.raises(ValueError, match="reference set is empty"):
        TextProjectionRefit(1.0, _reference().select([]))
    plain = TextProjectionRefit(1.0)
    with pytest.raises(TypeError, match="modules_to_save"):  # a re-fitted base weight would not be saved
        plain.check(tiny_clip_classifier(0), training_args(tmp_path))
    untrained = _trainer(tmp_path / "untrained", reference=_reference())
    with pytest.raises(RuntimeError, match="before the first task"):
        untrained.objective.refit(untrained, untrained.model.get_base_model(), untrained.objective.memory)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="not FSDP / DeepSpeed"):
        _trainer(tmp_path)
    assert not (tmp_path / "task-1").exists()
