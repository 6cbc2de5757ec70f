"""A fifth PET method added in this one file, with no edit anywhere else: it registers itself, and the trainer,
checkpoints, ``load_pet_pretrained`` and ``get_pet_model`` take it like the built-in ones."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pytest
import torch
from helpers import AtTaskStart, plain_vit, synthetic_images, training_args
from torch import nn
from transformers import ViTForImageClassification

from pegp_hf import ContinualPEGPTrainer, class_incremental_tasks
from pegp_hf.core import ProtectedTensor, module_input
from pegp_hf.tuners import (
    TUNERS,
    Attachment,
    PETConfig,
    PETModule,
    available_pets,
    get_pet_model,
    inject_pet,
    load_pet_pretrained,
    read_pet_configs,
    register_tuner,
)
from pegp_hf.tuners.discovery import find_block_stacks, mlp_module, select_layers

# ---- the new tuner: a full linear side branch h = mlp(x) + W x, W zero at start, protected against x -----------


@dataclass
class SideLinearConfig(PETConfig):
    pet_type = "side_linear"
    scale: float = 1.0


class SideLinear(PETModule):
    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.linear.weight)
        self.scale = scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.scale * self.linear(hidden_states)

    def protected_tensors(self, name: str) -> list[ProtectedTensor]:
        return [ProtectedTensor(f"{name}.linear.weight", "side_linear", self.linear, "weight", self.linear,
                                module_input)]  # fmt: skip


def _add_branch(mlp: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + mlp.pegp_side_linear(args[0])


def plan_side_linear(model: nn.Module, config: SideLinearConfig) -> list[Attachment]:
    attachments = []
    for _, stack in find_block_stacks(model, config.layers_pattern):
        for index in select_layers(len(stack), config.layers):
            _, mlp = mlp_module(stack[index])
            dim = mlp.fc1.in_features
            build = partial(SideLinear, dim, config.scale)
            attachments.append(
                Attachment(mlp, "pegp_side_linear", build, lambda m: m.register_forward_hook(_add_branch))
            )
    return attachments


@pytest.fixture(autouse=True, scope="module")
def registered():
    """What a tuner module does at import (``register_tuner(...)`` at its end), undone after these tests so that the
    registry other tests see stays the library's."""
    register_tuner(SideLinearConfig, plan_side_linear, size_field=None)
    yield
    TUNERS.pop(SideLinearConfig.pet_type)


# ---- the tests ---------------------------------------------------------------------------------------------------

TASKS = class_incremental_tasks(synthetic_images(num_labels=4), synthetic_images(num_labels=4, seed=1), 2, seed=0)


def vit(seed: int = 0) -> ViTForImageClassification:
    return plain_vit(seed=seed)


@torch.no_grad()
def branch_outputs(model: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """``W x`` of every side branch on ``pixels`` (eval mode)."""
    outputs = []
    handles = [m.register_forward_hook(lambda mod, a, out: outputs.append(out.clone()))
               for m in model.modules() if isinstance(m, SideLinear)]  # fmt: skip
    model.eval()
    model(pixel_values=pixels)
    for handle in handles:
        handle.remove()
    return outputs


def run(tmp_path, method: str):
    model = inject_pet(vit(), SideLinearConfig(layers="all", modules_to_save=["classifier"]))
    args = training_args(tmp_path / method, method=method, threshold=0.999, feature_samples=48)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=TASKS)
    old = TASKS[0].train.with_format("torch")[:]["pixel_values"]
    before = {}
    trainer.add_callback(AtTaskStart(1, lambda m: before.update(outputs=branch_outputs(m, old))))
    trainer.train()
    return trainer, before["outputs"], branch_outputs(trainer.model, old)


def relative_change(after: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(after, before, strict=True))


def test_the_new_tuner_is_registered_and_built_by_name():
    assert "side_linear" in available_pets()
    model = get_pet_model(vit(), "side_linear", layers=[0])
    with pytest.raises(ValueError, match="has no size"):
        get_pet_model(vit(), "side_linear", width=4)
    assert sum(isinstance(m, SideLinear) for m in model.modules()) == 1


def test_the_trainer_protects_it_and_old_outputs_stay_where_sequential_moves_them(tmp_path):
    pegp, before, after = run(tmp_path, "pegp")
    assert {t.kind for t in pegp.projector.tensors.values()} == {"side_linear"}
    assert all(k > 0 for k in pegp.projector.dims().values())
    _, seq_before, seq_after = run(tmp_path, "sequential")
    drift, seq_drift = relative_change(after, before), relative_change(seq_after, seq_before)
    assert drift < 0.1 * seq_drift, (drift, seq_drift)  # eps 0.999 leaves a little energy unprotected
    updates = pegp.continual_results()["updates"][1]
    assert updates["max_update_overlap"] < 1e-6 < updates["max_update"]  # every update is orthogonal to the basis
    assert (tmp_path / "pegp" / "task-2" / "pegp_subspaces.safetensors").is_file()


def test_its_checkpoint_loads_back_by_its_registered_name(tmp_path):
    trainer, _, _ = run(tmp_path, "pegp")
    folder = tmp_path / "pegp" / "task-2"
    assert [type(c) for c in read_pet_configs(folder)] == [SideLinearConfig]
    loaded = load_pet_pretrained(vit(), folder)  # the base model, then the tuner and head from the folder
    pixels = TASKS[1].test.with_format("torch")[:]["pixel_values"]
    trainer.model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, trainer.model(pixel_values=pixels).logits)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_tuner(SideLinearConfig, plan_side_linear, size_field=None)
