"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): one continual run, per-rank results.

python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR {full|crash|crash-rank1|resume}

``crash`` fails every rank as task 2 starts, ``crash-rank1`` rank 1 alone (rank 0 is stopped by torchrun).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import AtTaskStart, distributed_case, matrices

from pegp_hf import ContinualPEGPTrainer


def main(output_dir: str, phase: str) -> None:
    model, tasks, args = distributed_case(output_dir, per_device_batch=8)
    trainer = ContinualPEGPTrainer(model=model, args=args, tasks=tasks)
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
            "bases": {n: b.cpu() for n, b in trainer.projector.bases.items()},
            "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "overlaps": [log["pegp_update_overlap"] for log in steps],
            "update_max": [log["pegp_update_max"] for log in steps],
            "accuracy": {k: torch.tensor(v) for k, v in matrices(trainer).items()},
        },
        Path(output_dir) / f"{phase}-rank{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
