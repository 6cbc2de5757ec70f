"""PEFT beyond LoRA: IA3 scaling vectors are protected coordinate by coordinate; a PEFT method pegp_hf does not know
(LoHa) trains without projection and checkpoints through PEFT, and ``method="pegp"`` on it is refused by name."""

import numpy as np
import pytest
import torch
from helpers import matrices, plain_vit, synthetic_images, training_args
from peft import IA3Config, LoHaConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from pegp_hf import ContinualPEGPTrainer, class_incremental_tasks
from pegp_hf.core import FeatureCovariances, GradientProjector, grow_axis_basis
from pegp_hf.tuners import find_protected_tensors, get_pet_model

TASKS = class_incremental_tasks(synthetic_images(num_labels=4), synthetic_images(num_labels=4, seed=1), 2, seed=0)


def vit(seed: int = 0) -> ViTForImageClassification:
    return plain_vit(seed=seed)


def ia3_vit(seed: int = 0) -> PeftModel:
    """IA3 on q / v (output scaling, ``(out, 1)``) and on fc2 (input scaling of a feed-forward layer, ``(1, in)``)."""
    config = IA3Config(target_modules=["q_proj", "v_proj", "fc2"], feedforward_modules=["fc2"],
                       modules_to_save=["classifier"])  # fmt: skip
    return get_peft_model(vit(seed), config)


def test_axis_basis_takes_the_most_energetic_coordinates_first():
    energy = torch.tensor([1.0, 50.0, 0.0, 30.0, 19.0])
    covariance = torch.diag(energy) + 0.1 * (torch.ones(5, 5) - torch.eye(5))  # off-diagonal terms play no part
    basis = grow_axis_basis(covariance, threshold=0.75)
    assert basis.T.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]  # 50 + 30 of 100.5 >= 0.75
    grown = grow_axis_basis(covariance, threshold=0.995, basis=basis)
    assert grown[:, :2].equal(basis) and grown.shape[1] == 4  # the old axes first, then 19 and 1; never the empty one
    assert grow_axis_basis(covariance, threshold=1.0, basis=grown).equal(grown)


def test_ia3_vectors_are_found_with_their_feature_axis():
    tensors = {t.kind: t for t in find_protected_tensors(ia3_vit())}
    assert set(tensors) == {"ia3_output", "ia3_input"}
    output, feedforward = tensors["ia3_output"], tensors["ia3_input"]
    assert output.parameter.shape == (32, 1) and output.transposed and output.feature_dim == 32
    assert feedforward.parameter.shape == (1, 64) and not feedforward.transposed and feedforward.feature_dim == 64
    assert output.axis_aligned and feedforward.axis_aligned


def test_projected_ia3_updates_leave_protected_coordinates_and_old_outputs_alone():
    """Bases from task-1 features (eps 0.9); five projected SGD steps on task-2 data: every protected coordinate of
    every vector stays exactly, and the IA3 layers' outputs on task 1 move far less than without projection."""

    def layer_outputs(model, pixels):
        outputs = []
        layers = [
            m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "fc2")) and hasattr(m, "ia3_l")
        ]
        handles = [m.register_forward_hook(lambda mod, a, out: outputs.append(out.detach().clone())) for m in layers]
        with torch.no_grad():
            model(pixel_values=pixels)
        for handle in handles:
            handle.remove()
        return outputs

    task_1 = TASKS[0].train.with_format("torch")[:]["pixel_values"]
    task_2 = TASKS[1].train.with_format("torch")[:]
    drifts = {}
    for project in (True, False):
        model = ia3_vit().eval()
        tensors = find_protected_tensors(model)
        with FeatureCovariances(tensors) as capture, torch.no_grad():
            model(pixel_values=task_1)
        projector = GradientProjector(tensors)
        projector.grow(capture.covariances, threshold=0.9)
        before, outputs_before = {t.name: t.parameter.detach().clone() for t in tensors}, layer_outputs(model, task_1)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(
                model(pixel_values=task_2["pixel_values"]).logits, task_2["label"]
            ).backward()
            if project:
                projector.project_gradients()
            optimizer.step()
        for tensor in tensors:
            basis = projector.bases[tensor.name]
            assert 0 < basis.shape[1] < tensor.feature_dim, tensor.name  # some coordinates are protected, not all
            moved = tensor.rows(tensor.parameter.detach() - before[tensor.name]) @ basis
            assert (moved == 0).all() if project else moved.abs().max() > 0, tensor.name
        after = layer_outputs(model, task_1)
        drifts[project] = max(((a - b).norm() / b.norm()).item() for a, b in zip(after, outputs_before, strict=True))
    assert drifts[True] < 0.5 * drifts[False], drifts


def test_an_ia3_sequence_trains_checkpoints_and_resumes(tmp_path):
    args = training_args(tmp_path, threshold=0.95, optim="adamw_torch", learning_rate=0.01)
    trainer = ContinualPEGPTrainer(model=ia3_vit(), args=args, tasks=TASKS)
    trainer.train()
    updates = trainer.continual_results()["updates"]
    assert updates[1]["max_update_overlap"] < 1e-6 < updates[1]["max_update"]  # Adam's update, re-projected
    bases = load_file(tmp_path / "task-2" / "pegp_subspaces.safetensors")
    assert bases and set(bases) <= set(load_file(tmp_path / "task-2" / "adapter_model.safetensors"))
    resumed = ContinualPEGPTrainer(model=ia3_vit(), args=training_args(tmp_path / "again", threshold=0.95,
                                   optim="adamw_torch", learning_rate=0.01), tasks=TASKS)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "task-1"))
    for name, matrix in matrices(trainer).items():
        np.testing.assert_array_equal(matrices(resumed)[name], matrix)


def test_an_unknown_peft_method_trains_without_projection_and_pegp_names_the_known_ones(tmp_path):
    def loha():
        return get_peft_model(
            vit(), LoHaConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
        )

    with pytest.raises(ValueError, match=r"PEFT's LOHA adapter .* registered PEFT methods: lora, ia3"):
        ContinualPEGPTrainer(model=loha(), args=training_args(tmp_path / "pegp"), tasks=TASKS)
    trainer = ContinualPEGPTrainer(model=loha(), args=training_args(tmp_path, method="sequential"), tasks=TASKS)
    trainer.train()
    assert trainer.projector.tensors == {} and trainer.continual_results()["subspace_dims"] == {}
    loaded = PeftModel.from_pretrained(vit(), tmp_path / "task-2")  # a plain PEFT checkpoint
    pixels = TASKS[1].test.with_format("torch")[:]["pixel_values"]
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(pixel_values=pixels).logits, trainer.model(pixel_values=pixels).logits)
    assert "- loha" in (tmp_path / "task-2" / "README.md").read_text()


def test_get_pet_model_builds_ia3_by_name():
    model = get_pet_model(vit(), "ia3", layers="all", target_modules=("q_proj", "v_proj"))
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type.value == "IA3"
    with pytest.raises(ValueError, match="no width"):
        get_pet_model(vit(), "ia3", width=4)
