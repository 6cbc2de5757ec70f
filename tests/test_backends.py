"""Projection per backend: selection and refusals, the hook path, sharded rows, non-finite and mixed precision."""

import pytest
import torch
from helpers import synthetic_images, tiny_vit, training_args

from pegp_hf import ContinualPEGPTrainer, class_incremental_tasks
from pegp_hf.backends import check_update_reprojection, effective_optimizer, select_projection_mode
from pegp_hf.core.subspace import grow_basis, project_out

TASKS = class_incremental_tasks(synthetic_images(per_class=16), synthetic_images(per_class=8, seed=1), 2, seed=0)


@pytest.mark.parametrize(
    ("requested", "deepspeed", "fsdp", "expected"),
    [
        ("auto", False, None, "training_step"),  # single process, DDP
        ("auto", False, 2, "training_step"),  # FSDP2: local rows
        ("auto", True, None, "hooks"),  # DeepSpeed steps inside backward
        ("hooks", False, None, "hooks"),
        ("hooks", True, None, "hooks"),
    ],
)
def test_projection_point_per_backend(requested, deepspeed, fsdp, expected):
    assert select_projection_mode(requested, deepspeed, fsdp) == expected


def test_backends_that_cannot_project_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="Use FSDP2"):
        select_projection_mode("auto", deepspeed=False, fsdp_version=1)
    with pytest.raises(ValueError, match="ZeRO-3"):
        select_projection_mode("auto", deepspeed=True, fsdp_version=None, zero_stage=3)
    with pytest.raises(ValueError, match="projection_mode='hooks'"):
        select_projection_mode("training_step", deepspeed=True, fsdp_version=None)
    with pytest.raises(ValueError, match="master weights"):
        check_update_reprojection("auto", "adamw_torch", 0.0, deepspeed=True)
    with pytest.raises(ValueError, match="master weights"):
        check_update_reprojection("on", "sgd", 0.0, deepspeed=True)
    with pytest.raises(ValueError, match="master weights"):
        check_update_reprojection("auto", "sgd", 0.01, deepspeed=True)
    check_update_reprojection("auto", "sgd", 0.0, deepspeed=True)  # SGD's update is already projected
    check_update_reprojection("off", "adamw_torch", 0.0, deepspeed=True)  # the user accepts the approximation
    check_update_reprojection("auto", "adamw_torch", 0.01, deepspeed=False)  # re-projected outside DeepSpeed


def test_a_deepspeed_config_optimizer_is_what_the_refusal_checks():
    adamw = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}}
    assert effective_optimizer("sgd", 0.0, adamw) == ("adamw", 0.0)
    assert effective_optimizer("sgd", 0.0, {"optimizer": {"type": "SGD", "params": {"weight_decay": 0.01}}}) == (
        "sgd",
        0.01,
    )
    assert effective_optimizer("sgd", 0.0, {"zero_optimization": {"stage": 2}}) == ("sgd", 0.0)
    with pytest.raises(ValueError, match="master weights"):
        check_update_reprojection("auto", *effective_optimizer("sgd", 0.0, adamw), deepspeed=True)


def final_weights(tmp_path, **overrides):
    model = tiny_vit(hidden=64)
    args = training_args(tmp_path, optim="sgd", optim_args="momentum=0.9", threshold=0.99, **overrides)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=TASKS)
    trainer.train()
    return trainer, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_hook_projection_equals_training_step_projection(tmp_path, accumulation):
    batch = 16 // accumulation
    settings = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    step_trainer, by_step = final_weights(tmp_path / "step", **settings)
    hook_trainer, by_hook = final_weights(tmp_path / "hook", projection_mode="hooks", **settings)
    assert (step_trainer.projection_mode, hook_trainer.projection_mode) == ("training_step", "hooks")
    logs = [log for log in hook_trainer.state.log_history if "pegp_update_overlap" in log]
    assert logs and max(log["pegp_update_overlap"] for log in logs) < 1e-6 < min(log["pegp_update_max"] for log in logs)
    for name, value in by_step.items():
        torch.testing.assert_close(by_hook[name], value, atol=2e-6, rtol=1e-5, msg=name)


def test_row_shards_project_exactly_like_the_whole_tensor():
    # FSDP2 keeps dim-0 shards: the last-axis projection of each shard is that shard of the full projection.
    features = torch.randn(200, 6) @ torch.randn(6, 24)
    basis = grow_basis(features.T @ features, 0.99)
    full = torch.randn(10, 24)
    shards = [project_out(part, basis) for part in full.tensor_split(3, dim=0)]
    torch.testing.assert_close(torch.cat(shards), project_out(full, basis), atol=1e-6, rtol=0)


def test_non_finite_gradients_stay_non_finite_for_the_grad_scaler():
    basis = torch.linalg.qr(torch.randn(8, 3))[0]
    for bad in (float("inf"), float("nan")):
        grad = torch.randn(4, 8, dtype=torch.float16)
        grad[1, 2] = bad
        projected = project_out(grad, basis)
        assert not torch.isfinite(projected).all()  # the scaler's overflow check still sees it
        assert torch.isfinite(projected[[0, 2, 3]]).all()  # other rows are untouched by the bad value


def test_bf16_autocast_keeps_the_guarantee_and_the_fp32_update(tmp_path):
    _, fp32 = final_weights(tmp_path / "fp32")
    bf16_trainer, bf16 = final_weights(tmp_path / "bf16", bf16=True)
    logs = [log for log in bf16_trainer.state.log_history if "pegp_update_overlap" in log]
    assert logs and max(log["pegp_update_overlap"] for log in logs) < 1e-6 < min(log["pegp_update_max"] for log in logs)
    start = {n: p.detach() for n, p in tiny_vit(hidden=64).named_parameters() if p.requires_grad}
    # the updates, not the weights: they must agree far better than the weights move
    moved = torch.cat([(fp32[n] - start[n]).flatten() for n in start])
    apart = torch.cat([(bf16[n] - fp32[n]).flatten() for n in start])
    assert float(moved.norm()) > 0.1  # measured 0.40
    assert float(apart.norm()) < 0.02 * float(moved.norm())  # measured 0.0018: 0.45% of the update


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with the grad scaler needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_mixed_precision_gives_the_fp32_projected_update(tmp_path, precision):
    def run(**flags):
        model = tiny_vit(hidden=64)
        args = training_args(tmp_path / str(flags), optim="sgd", optim_args="momentum=0.9", threshold=0.99,
                             use_cpu=False, **flags)  # fmt: skip
        trainer = ContinualPEGPTrainer(model=model, args=args, tasks=TASKS)
        trainer.train()
        overlaps = [log["pegp_update_overlap"] for log in trainer.state.log_history if "pegp_update_overlap" in log]
        return trainer, {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}, overlaps

    _, fp32, _ = run()
    _, mixed, overlaps = run(**{precision: True})
    assert overlaps and max(overlaps) < 1e-5
    for name, value in fp32.items():
        torch.testing.assert_close(mixed[name], value, atol=5e-2, rtol=5e-2, msg=name)


def test_fsdp2_sharded_parameters_are_found_and_projected(tmp_path):
    """fully_shard replaces the parameter objects after the projector is built; it must follow them (1-rank gloo)."""
    import torch.distributed as dist

    fsdp = pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed.device_mesh import init_device_mesh

    from pegp_hf.core.capture import FeatureCovariances
    from pegp_hf.core.projector import GradientProjector
    from pegp_hf.core.subspace import max_overlap
    from pegp_hf.tuners import find_protected_tensors

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = tiny_vit(hidden=64)
        tensors = find_protected_tensors(model)
        with torch.no_grad():  # a non-zero B, so that A gets gradients
            for tensor in tensors:
                if tensor.kind == "lora_B":
                    tensor.parameter.normal_(0, 0.1)
        projector = GradientProjector(tensors)
        with FeatureCovariances(tensors) as capture, torch.no_grad():
            model.eval()
            model(pixel_values=torch.randn(8, 1, 8, 8))
        projector.grow(capture.covariances, 0.9)
        before = {name: id(t.parameter) for name, t in projector.tensors.items()}
        fsdp.fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        assert all(id(t.parameter) != before[name] for name, t in projector.tensors.items())  # replaced
        model.train()
        model(pixel_values=torch.randn(8, 1, 8, 8)).logits.square().sum().backward()
        projector.project_gradients()
        for name, tensor in projector.tensors.items():
            assert float(max_overlap(tensor.parameter.grad.to_local(), projector.bases[name])) < 1e-5, name
        projector.snapshot()
        with torch.no_grad():
            for tensor in projector.tensors.values():
                tensor.parameter.to_local().sub_(0.1 * tensor.parameter.grad.to_local())
        overlap, scale = projector.finish_update(reproject=True).tolist()
        assert overlap < 1e-6 < scale
    finally:
        dist.destroy_process_group()
