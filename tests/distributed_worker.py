"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): one continual run, per-rank results.

python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR PHASE [fsdp2]

PHASE is ``full``, ``crash`` (every rank fails as task 2 starts), ``crash-rank1`` (rank 1 alone fails; torchrun
stops rank 0), ``resume``, ``replay`` (a tiny CLIP with prototype replay, DDP), or ``refit`` (the same with the
stored embeddings and the text projection's re-fit, DDP). The backend is ``ddp``
(default), ``fsdp2`` (``fully_shard``), or ``zero1`` / ``zero2`` (DeepSpeed on its CPU accelerator).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import AtTaskStart, distributed_case, distributed_clip_case, matrices, refit_clip_case

from pegp_hf import ContinualPEGPTrainer


def emulate_fsdp2_on_cpu(args) -> None:
    """Make Accelerate prepare the model with FSDP2 on these gloo CPU processes. Accelerate 1.16 turns FSDP on only
    for accelerator backends (``AcceleratorState`` switches MULTI_GPU, not MULTI_CPU, to FSDP), so the processes are
    declared MULTI_GPU once the Trainer's ``PartialState`` exists; ``fully_shard`` itself runs on the CPU mesh."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    assert args.device.type == "cpu"  # sets the PartialState up
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU, all-gathered if FSDP2 sharded it (a collective)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().cpu()


def deepspeed_config(stage: int) -> dict:
    """ZeRO-``stage`` with the Trainer's own optimizer (SGD with momentum, weight decay 0: the update needs no
    re-projection) and every size taken from the TrainingArguments."""
    auto = {key: "auto" for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                    "gradient_clipping", "train_batch_size")}  # fmt: skip
    return {"zero_optimization": {"stage": stage}, **auto}


def replay(output_dir: str) -> None:
    """The tiny CLIP with prototype replay under DDP: per rank, the class means, the trained weights and matrices."""
    model, tasks, args, objective, callbacks = distributed_clip_case(output_dir, per_device_batch=8)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=tasks, objective=objective, callbacks=callbacks)
    trainer.train()
    torch.save(
        {
            "world_size": trainer.accelerator.num_processes,
            "means": objective.prototypes.means, "counts": objective.prototypes.counts,
            "params": {n: full(p) for n, p in model.named_parameters() if p.requires_grad},
            "accuracy": {k: torch.tensor(v) for k, v in matrices(trainer).items()},
        },
        Path(output_dir) / f"replay-rank{trainer.accelerator.process_index}.pt",
    )  # fmt: skip


def refit(output_dir: str) -> None:
    """The tiny CLIP with the text projection's re-fit under DDP: per rank, the re-fitted projection, the reference
    probabilities and the stored embeddings."""
    model, tasks, args, objective, callbacks = refit_clip_case(output_dir, per_device_batch=8)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=tasks, objective=objective, callbacks=callbacks)
    trainer.train()
    torch.save(
        {"projection": model.get_base_model().clip.text_projection.weight.detach().clone(),
         "teacher": objective.refit.teacher, "stored": objective.memory.features},
        Path(output_dir) / f"refit-rank{trainer.accelerator.process_index}.pt",
    )  # fmt: skip


def main(output_dir: str, phase: str, backend: str = "ddp") -> None:
    if phase == "replay":
        return replay(output_dir)
    if phase == "refit":
        return refit(output_dir)
    zero = {"zero1": 1, "zero2": 2}.get(backend)
    extra = {"deepspeed": deepspeed_config(zero)} if zero else {}
    model, tasks, args = distributed_case(output_dir, per_device_batch=8, **extra)
    if backend == "fsdp2":
        emulate_fsdp2_on_cpu(args)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=tasks)
    assert trainer.is_fsdp_enabled == (backend == "fsdp2") and trainer.is_deepspeed_enabled == bool(zero)
    if trainer.accelerator.process_index == 1:  # were this rank to grow its own bases, they would differ
        grow = trainer.projector.grow

        def perturbed(covariances, threshold, names=None):
            noise = {name: c + 0.5 * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype, device=c.device)
                     for name, c in covariances.items()}  # fmt: skip
            return grow(noise, threshold, names)

        trainer.projector.grow = perturbed
    if phase == "crash" or (phase == "crash-rank1" and trainer.accelerator.process_index == 1):
        trainer.add_callback(AtTaskStart(1, lambda m: (_ for _ in ()).throw(RuntimeError("simulated crash"))))
    trainer.train(resume_from_checkpoint=True if phase == "resume" else None)
    steps = [log for log in trainer.state.log_history if "pegp_update_overlap" in log]  # the last task's steps
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "world_size": trainer.accelerator.num_processes,
            "sharded": [n for n, p in model.named_parameters() if p.requires_grad and hasattr(p, "full_tensor")],
            "bases": {n: b.cpu() for n, b in trainer.projector.bases.items()},
            "params": {n: full(p) for n, p in model.named_parameters() if p.requires_grad},
            "overlaps": [log["pegp_update_overlap"] for log in steps],
            "update_max": [log["pegp_update_max"] for log in steps],
            "accuracy": {k: torch.tensor(v) for k, v in matrices(trainer).items()},
        },
        Path(output_dir) / f"{phase}-rank{rank}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
