"""PEGP's guarantee measured on tensors: after task 2, old inputs give the same LoRA layer outputs."""

import copy

import pytest
import torch
from helpers import AtTaskStart, lora_layer_outputs, lora_weights, synthetic_images, tiny_vit, training_args
from transformers import TrainerCallback

from pegp_hf import ContinualPEGPTrainer, GradientProjector, class_incremental_tasks
from pegp_hf.core.subspace import max_overlap


class GradientsAtStep(TrainerCallback):
    """Records max |G U| of the gradients the optimizer is about to use (after projection and clipping)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        projector = self.trainer.projector
        if projector.active:
            self.trainer.seen_overlaps.append(
                max(float(max_overlap(t.parameter.grad, projector.bases[n])) for n, t in projector.tensors.items())
            )


def small_tasks(per_class=6):
    # 12 task-1 training images x 5 tokens = 60 feature vectors in 64 dims: the task-1 basis of every lora_A stays
    # below full rank, so task 2 still has room to learn while old inputs must keep their outputs.
    return class_incremental_tasks(
        synthetic_images(per_class=per_class), synthetic_images(per_class=4, seed=1), num_tasks=2, seed=0
    )


def run_two_tasks(tmp_path, method="pegp", rank=4, **overrides):
    tasks = small_tasks()
    samples = overrides.get("feature_samples", 64)  # the inputs the task-1 bases are built from (as the trainer picks)
    basis_inputs = tasks[0].train.shuffle(seed=0).select(range(min(samples, len(tasks[0].train))))
    old_inputs = torch.stack([row["pixel_values"] for row in basis_inputs])
    model = tiny_vit(hidden=64, rank=rank)
    settings = dict(threshold=1.0, per_device_train_batch_size=4, num_train_epochs=3, learning_rate=0.1)
    settings.update(overrides)
    trainer = ContinualPEGPTrainer(model=model, args=training_args(tmp_path, method=method, **settings), tasks=tasks)
    record = AtTaskStart(
        1, lambda m: (lora_layer_outputs(m, old_inputs), lora_weights(m), copy.deepcopy(trainer.projector.bases))
    )
    trainer.add_callback(record)
    trainer.train()
    outputs_before, weights_before, bases_after_task_1 = record.result
    return trainer, outputs_before, weights_before, lora_layer_outputs(model, old_inputs), bases_after_task_1


def max_relative_change(before, after):
    return max(float((after[n] - before[n]).abs().max() / before[n].abs().max()) for n in before)


OPTIMIZERS = {
    "sgd_momentum": dict(optim="sgd", optim_args="momentum=0.9"),
    "adamw_reprojected": dict(optim="adamw_torch", learning_rate=0.01, weight_decay=0.05),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_old_inputs_keep_their_lora_outputs_under_pegp(tmp_path, optimizer):
    trainer, before, weights_before, after, bases = run_two_tasks(tmp_path, **OPTIMIZERS[optimizer])
    assert max_relative_change(before, after) < 1e-4
    # ... while task 2 really trained the adapter (lora_A has free directions left)
    weights_after = lora_weights(trainer.model)
    moved = max(float((weights_after[n] - weights_before[n]).abs().max()) for n in weights_before if "lora_A" in n)
    assert moved > 1e-4  # float noise is ~1e-9
    assert all(0 < bases[n].shape[1] < 64 for n in bases if "lora_A" in n)  # task-1 bases left room


def test_lora_b_keeps_old_outputs_with_a_partial_basis(tmp_path):
    # One task-1 sample = 5 tokens: A x spans 5 of B's 8 input dims, so B's basis is partial (not simply frozen).
    trainer, before, weights_before, after, bases = run_two_tasks(
        tmp_path, rank=8, feature_samples=1, optim="sgd", optim_args="momentum=0.9"
    )
    b_dims = [bases[n].shape[1] for n in bases if "lora_B" in n]
    assert all(0 < k < 8 for k in b_dims), b_dims
    assert max_relative_change(before, after) < 1e-4
    weights_after = lora_weights(trainer.model)
    moved = max(float((weights_after[n] - weights_before[n]).abs().max()) for n in weights_before if "lora_B" in n)
    assert moved > 1e-4


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_without_projection_old_outputs_move(tmp_path, optimizer):
    _, before, _, after, _ = run_two_tasks(tmp_path, method="sequential", **OPTIMIZERS[optimizer])
    assert max_relative_change(before, after) > 0.5  # docs/method.md: "by more than 50%" (SGD 53%)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_step_update_is_orthogonal_to_the_old_bases(tmp_path, optimizer):
    trainer, _, weights_before, _, bases = run_two_tasks(tmp_path, **OPTIMIZERS[optimizer])
    steps = [log for log in trainer.state.log_history if "pegp_update_overlap" in log]
    assert len(steps) == trainer.state.global_step > 0  # logging_steps=1: one diagnostic per optimizer step
    assert all(log["pegp_update_overlap"] <= 1e-6 < log["pegp_update_max"] for log in steps)
    weights_after = lora_weights(trainer.model)
    for name in trainer.projector.tensors:  # delta A . U_A and delta B . U_B, on the tensors
        key = name.removeprefix("base_model.model.")
        delta = weights_after[name] - weights_before[name]
        assert bases[name].shape[1] > 0, key
        assert float((delta @ bases[name]).abs().max()) < 1e-5, key


def test_adamw_without_update_reprojection_breaks_the_guarantee(tmp_path):
    trainer, before, _, after, _ = run_two_tasks(tmp_path, update_reprojection="off", **OPTIMIZERS["adamw_reprojected"])
    steps = [log for log in trainer.state.log_history if "pegp_update_overlap" in log]
    # docs/method.md: "the overlap is as large as the update" (max |dW U| against max |dW|, step by step)
    assert max(log["pegp_update_overlap"] / log["pegp_update_max"] for log in steps) > 0.5
    assert max_relative_change(before, after) > 1e-3


def test_update_reprojection_auto_is_off_only_for_plain_sgd_without_weight_decay(tmp_path):
    def decision(**overrides):
        trainer = ContinualPEGPTrainer(model=tiny_vit(), args=training_args(tmp_path, **overrides), tasks=small_tasks())
        trainer.create_optimizer()
        return trainer._bracket.reprojects(trainer.optimizer, trainer.projector)

    assert decision(optim="sgd", optim_args="momentum=0.9,nesterov=true") is False
    assert decision(optim="sgd", weight_decay=0.01) is True
    assert decision(optim="adamw_torch") is True
    assert decision(optim="adamw_torch", update_reprojection="off") is False


def test_gradient_accumulation_gives_the_same_projected_updates(tmp_path):
    tasks = small_tasks(per_class=8)  # 16 images per task: one step of 16 == two accumulated steps of 8

    def final_weights(batch, accumulation):
        model = tiny_vit(hidden=64)
        args = training_args(
            tmp_path / f"b{batch}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            optim_args="momentum=0.9",
            threshold=0.99,
            max_grad_norm=1.0,
        )
        trainer = ContinualPEGPTrainer(model=model, args=args, tasks=tasks)
        trainer.seen_overlaps = []
        trainer.add_callback(GradientsAtStep(trainer))
        trainer.train()
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, trainer

    one, trainer = final_weights(16, 1)
    two, _ = final_weights(8, 2)
    assert trainer.projector.active
    assert trainer.seen_overlaps and max(trainer.seen_overlaps) < 1e-6  # clipped, stepped grads were projected
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_periodic_update_check_samples_the_steps_and_keeps_the_guarantee(tmp_path, optimizer, monkeypatch):
    snapshots = []
    original = GradientProjector.snapshot
    monkeypatch.setattr(GradientProjector, "snapshot", lambda self: snapshots.append(1) or original(self))
    settings = dict(update_check_steps=3, **OPTIMIZERS[optimizer])
    trainer, before, weights_before, after, bases = run_two_tasks(tmp_path, **settings)
    steps = trainer.state.global_step  # of task 2, the only one with bases
    measured = [log for log in trainer.state.log_history if "pegp_update_overlap" in log]
    assert len(measured) == -(-steps // 3)  # steps 1, 4, 7, ... of the task (logging_steps=1)
    assert all(log["pegp_update_overlap"] <= 1e-6 < log["pegp_update_max"] for log in measured)
    # plain SGD needs no re-projection: only the measured steps are bracketed; AdamW re-projects every step
    assert len(snapshots) == (steps if optimizer == "adamw_reprojected" else len(measured))
    assert max_relative_change(before, after) < 1e-4  # old outputs still in place
    weights_after = lora_weights(trainer.model)
    for name in trainer.projector.tensors:
        assert float(((weights_after[name] - weights_before[name]) @ bases[name]).abs().max()) < 1e-5, name


def test_grouped_projection_is_each_tensors_own_projection():
    """Equally shaped tensors are projected together against zero-padded bases: every gradient and every update must
    be what its own basis gives alone, whatever k, for transposed (IA3-like) tensors, and with a gradient missing."""
    from torch import nn

    from pegp_hf.core.protected import ProtectedTensor, module_input
    from pegp_hf.core.subspace import project_out

    torch.manual_seed(0)
    layers = [nn.Linear(6, 4, bias=False) for _ in range(3)] + [nn.Linear(6, 5, bias=False)]
    column = nn.Module()
    column.scale = nn.Parameter(torch.randn(6, 1))  # (d, 1): the feature axis is the first
    tensors = [ProtectedTensor(f"w{i}", "w", layer, "weight", layer, module_input) for i, layer in enumerate(layers)]
    tensors.append(ProtectedTensor("col", "w", column, "scale", column, module_input, transposed=True))
    projector = GradientProjector(tensors)
    dims = [1, 3, 2, 0, 4]  # k per tensor: a group of three 4 x 6 with different k (one without gradient), one empty
    projector.load_bases(
        {t.name: torch.linalg.qr(torch.randn(6, 6))[0][:, :k] for t, k in zip(tensors, dims, strict=True)}
    )
    for tensor in tensors[1:]:
        tensor.parameter.grad = torch.randn_like(tensor.parameter)
    gradients = {t.name: t.parameter.grad.clone() for t in tensors[1:]}
    projector.project_gradients()
    assert tensors[0].parameter.grad is None
    for tensor in tensors[1:]:
        expected = tensor.rows(project_out(tensor.rows(gradients[tensor.name]), projector.bases[tensor.name]))
        torch.testing.assert_close(tensor.parameter.grad, expected, rtol=0, atol=1e-6)
        assert not torch.equal(expected, gradients[tensor.name]) or dims[tensors.index(tensor)] == 0
    projector.snapshot()
    before = {t.name: t.parameter.detach().clone() for t in tensors}
    steps = {t.name: torch.randn_like(t.parameter) for t in tensors}
    with torch.no_grad():
        for tensor in tensors:
            tensor.parameter.add_(steps[tensor.name])
    overlap, largest = projector.finish_update(reproject=True)
    for tensor in tensors:
        basis = projector.bases[tensor.name]
        expected = before[tensor.name] + tensor.rows(project_out(tensor.rows(steps[tensor.name]), basis))
        torch.testing.assert_close(tensor.parameter.detach(), expected, rtol=0, atol=1e-6)
    assert float(overlap) < 1e-6 and float(largest) > 0.1
    projector.load_bases({t.name: torch.linalg.qr(torch.randn(6, 6))[0][:, :2] for t in tensors})  # new bases
    gradient = torch.randn_like(tensors[1].parameter)
    tensors[1].parameter.grad = gradient.clone()
    projector.project_gradients()  # with the new bases, not the stacked old ones
    expected = project_out(gradient, projector.bases[tensors[1].name])
    torch.testing.assert_close(tensors[1].parameter.grad, expected, rtol=0, atol=1e-6)


def test_the_projection_workspace_holds_each_steps_own_gradients():
    """A group projects in a workspace kept from step to step: each step's gradients must be its own, projected as
    their own bases give, also after a step with a gradient missing, and in float64 once the parameters become
    float64 (the groups and their buffers are rebuilt for the new dtype, not reused at float32 precision); the bases
    follow parameters moved to another device after they were loaded."""
    from torch import nn

    from pegp_hf.core.protected import ProtectedTensor, module_input
    from pegp_hf.core.subspace import project_out

    torch.manual_seed(0)
    layers = [nn.Linear(6, 4, bias=False) for _ in range(3)]
    tensors = [ProtectedTensor(f"w{i}", "w", layer, "weight", layer, module_input) for i, layer in enumerate(layers)]
    projector = GradientProjector(tensors)
    projector.load_bases({t.name: torch.linalg.qr(torch.randn(6, 6))[0][:, : 2 + i] for i, t in enumerate(tensors)})

    def step(missing: int | None = None, atol: float = 1e-6) -> None:
        gradients = {t.name: torch.randn_like(t.parameter) for t in tensors}
        for i, tensor in enumerate(tensors):
            tensor.parameter.grad = None if i == missing else gradients[tensor.name].clone()
        projector.project_gradients()
        for i, tensor in enumerate(tensors):
            if i == missing:
                assert tensor.parameter.grad is None
                continue
            basis = projector.bases[tensor.name].to(tensor.parameter.dtype)
            expected = project_out(gradients[tensor.name], basis)
            torch.testing.assert_close(tensor.parameter.grad, expected, rtol=0, atol=atol)

    for missing in (None, None, 1, None):
        step(missing)
    for layer in layers:
        layer.weight.data = layer.weight.data.double()
    step(atol=1e-12)
    for layer in layers:  # moved after the bases were loaded (FSDP2 on a resume): the groups follow the parameters
        layer.to("meta")
    for tensor in tensors:
        tensor.parameter.grad = torch.empty_like(tensor.parameter)
    projector.project_gradients()
    projector.release_buffers()
    projector.project_gradients()  # made again


def test_finish_update_refuses_a_step_without_its_own_snapshot():
    """The update is measured against the snapshot's stacked rows: without a snapshot, or with the bases replaced
    since it (its buffers then belong to other groups), ``W_before`` would not be the parameters' own."""
    from torch import nn

    from pegp_hf.core.protected import ProtectedTensor, module_input

    torch.manual_seed(0)
    layers = [nn.Linear(6, 4, bias=False) for _ in range(2)]
    tensors = [ProtectedTensor(f"w{i}", "w", layer, "weight", layer, module_input) for i, layer in enumerate(layers)]
    projector = GradientProjector(tensors)
    projector.load_bases({t.name: torch.linalg.qr(torch.randn(6, 6))[0][:, :2] for t in tensors})
    with pytest.raises(RuntimeError, match="needs snapshot"):
        projector.finish_update(reproject=True)
    for _ in range(2):  # the second step reuses the first one's buffers: they must hold this step's weights
        projector.snapshot()
        before = [t.parameter.detach().clone() for t in tensors]
        with torch.no_grad():
            for tensor in tensors:
                tensor.parameter.add_(torch.randn_like(tensor.parameter))
        projector.finish_update(reproject=True)
        for tensor, old in zip(tensors, before, strict=True):
            delta = tensor.parameter.detach() - old
            assert float(delta.abs().max()) > 0.1
            assert float((delta @ projector.bases[tensor.name]).abs().max()) < 1e-6
    with pytest.raises(RuntimeError, match="needs snapshot"):
        projector.finish_update(reproject=True)
    projector.snapshot()
    projector.load_bases({t.name: torch.linalg.qr(torch.randn(6, 6))[0][:, :3] for t in tensors})
    with pytest.raises(RuntimeError, match="changed between"):
        projector.finish_update(reproject=True)


def test_snapshot_keeps_each_dtype_exact_and_empty_shards_measure_nothing():
    """Equally shaped tensors of different dtypes get different buffers (a float32 weight's ``W_before`` rounded to
    bfloat16 would move it inside its protected span); a tensor with no local rows (an FSDP2 rank holding none of a
    small tensor) is stepped and measured without error."""
    from torch import nn

    from pegp_hf.core.protected import ProtectedTensor, module_input

    torch.manual_seed(0)
    layers = [nn.Linear(6, 4, bias=False).to(torch.bfloat16), nn.Linear(6, 4, bias=False)]  # bfloat16 first
    empty = nn.Module()
    empty.weight = nn.Parameter(torch.empty(0, 6))
    owners = [*layers, empty]
    tensors = [ProtectedTensor(f"w{i}", "w", m, "weight", m, module_input) for i, m in enumerate(owners)]
    projector = GradientProjector(tensors)
    projector.load_bases({t.name: torch.linalg.qr(torch.randn(6, 6))[0][:, :3] for t in tensors})
    with torch.no_grad():
        layers[1].weight.copy_(1 + 1e-3 * torch.randn(4, 6))  # bfloat16 holds these to about 4e-3 only
    before = layers[1].weight.detach().clone()
    projector.snapshot()
    with torch.no_grad():
        for layer in layers:
            layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    overlap, largest = projector.finish_update(reproject=True).tolist()
    moved = layers[1].weight.detach() - before
    assert float((moved @ projector.bases["w1"]).abs().max()) < 1e-6 and float(moved.abs().max()) > 1e-2
    assert overlap < 1e-2 and largest > 1e-2  # (the bfloat16 tensor's own rounding sets the first)


@pytest.mark.parametrize(
    ("dtype", "reproject"), [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)]
)
def test_finish_update_measures_the_parameters_as_they_are_after_the_step(dtype, reproject):
    """``[max |delta W U|, max |delta W|]`` is taken on the parameters as the step left them: after re-projection
    (the workspace already holds them in float32; bfloat16 parameters round on the copy back) or without it (the
    workspace still holds an earlier step's rows)."""
    from torch import nn

    from pegp_hf.core.protected import ProtectedTensor, module_input

    torch.manual_seed(0)
    layers = [nn.Linear(6, 4, bias=False).to(dtype) for _ in range(2)]
    tensors = [ProtectedTensor(f"w{i}", "w", layer, "weight", layer, module_input) for i, layer in enumerate(layers)]
    projector = GradientProjector(tensors)
    projector.load_bases({t.name: torch.linalg.qr(torch.randn(6, 6))[0][:, :3] for t in tensors})
    for scale in (1.0, 0.1):  # the second step finds the first one's rows in the workspace
        projector.snapshot()
        before = [t.parameter.detach().float().clone() for t in tensors]
        with torch.no_grad():
            for tensor in tensors:
                tensor.parameter.add_(scale * torch.randn_like(tensor.parameter))
        overlap, largest = projector.finish_update(reproject=reproject).tolist()
        deltas = [t.parameter.detach().float() - old for t, old in zip(tensors, before, strict=True)]
        assert largest == max(float(delta.abs().max()) for delta in deltas)
        pairs = zip(tensors, deltas, strict=True)
        expected = max(float((delta @ projector.bases[t.name]).abs().max()) for t, delta in pairs)
        assert overlap == pytest.approx(expected, rel=1e-5, abs=1e-7)
