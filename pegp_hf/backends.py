"""Where PEGP projects, for each Accelerate backend, and what each backend cannot do.

| backend | projection point | why |
|---|---|---|
| single process, DDP | ``training_step``, sync micro-batch | after accumulation and DDP's all-reduce, before clipping |
| FSDP2 | ``training_step``, on each rank's local rows | FSDP2 shards dim 0; the projection acts on the last axis |
| DeepSpeed ZeRO 1 / 2 | tensor hooks on the PET leaf parameters | it steps inside ``backward``: too late after |
| FSDP1 | refused | flat parameters split rows of a weight across ranks |

Projection is linear, so projecting every micro-batch's gradient in a hook equals projecting their sum. After each
task the feature covariances are summed over processes and the bases grown on the main process and broadcast, so
every rank holds the same bits (:func:`grow_bases_on_every_rank`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, reduce

from pegp_hf.core.finite import check_tensors
from pegp_hf.core.projector import GradientProjector

if TYPE_CHECKING:
    from transformers import Trainer

logger = logging.getLogger(__name__)

PROJECTION_MODES = ("auto", "training_step", "hooks")


def select_projection_mode(
    requested: str, deepspeed: bool, fsdp_version: int | None, zero_stage: int | None = None
) -> str:
    """Resolve ``requested`` (``auto``, ``training_step`` or ``hooks``) for the running backend.

    Raises:
        ValueError: FSDP1, DeepSpeed ZeRO-3, or ``training_step`` under DeepSpeed.
    """
    if requested not in PROJECTION_MODES:
        raise ValueError(f"projection_mode must be one of {PROJECTION_MODES}, got {requested!r}")
    if fsdp_version == 1:
        raise ValueError(
            "FSDP1 flattens parameters and splits a weight's rows across ranks, so gradients cannot be projected "
            "on their feature axis. Use FSDP2 (fsdp_version: 2 in the accelerate config), DDP, or DeepSpeed ZeRO-2."
        )
    if deepspeed:
        if zero_stage == 3:
            raise ValueError(
                "DeepSpeed ZeRO-3 partitions the parameters, which feature capture and evaluation read whole: use "
                "ZeRO-1 / 2, DDP or FSDP2"
            )
        if requested == "training_step":
            raise ValueError(
                "DeepSpeed steps the optimizer inside backward, before training_step could project: use "
                "projection_mode='hooks' (or 'auto')"
            )
        return "hooks"
    return "training_step" if requested == "auto" else requested


def check_update_reprojection(update_reprojection: str, optim: str, weight_decay: float, deepspeed: bool) -> None:
    """Refuse update re-projection under DeepSpeed, whose optimizer keeps its own fp32 master weights.

    Under DeepSpeed, ``auto`` is accepted only for plain SGD with weight decay 0, whose update is already a
    combination of projected gradients; ``on`` is always refused.
    """
    if not deepspeed or update_reprojection == "off":
        return
    if update_reprojection == "on" or optim != "sgd" or weight_decay != 0.0:
        raise ValueError(
            "under DeepSpeed the optimizer keeps fp32 master weights that pegp_hf cannot re-project, so an Adam-like "
            "update (or weight decay) would leave the protected subspace. Use optim='sgd' with weight_decay=0 "
            "(momentum is fine), or set update_reprojection='off' to accept gradient projection only."
        )


def effective_optimizer(optim: str, weight_decay: float, deepspeed_config: dict | None) -> tuple[str, float]:
    """The optimizer name and weight decay that will really step: a DeepSpeed config's own ``optimizer`` section
    overrides ``TrainingArguments.optim`` (``"auto"`` values are filled from the arguments, as DeepSpeed does)."""
    section = (deepspeed_config or {}).get("optimizer")
    if not section:
        return optim, weight_decay
    decay = section.get("params", {}).get("weight_decay", "auto")
    return str(section.get("type", optim)).lower(), weight_decay if decay == "auto" else float(decay)


def resolve_projection_mode(trainer: Trainer, projector: GradientProjector) -> str:
    """The projection mode for ``trainer``'s Accelerate backend, after every refusal of this module (and FSDP2 with a
    tensor whose feature axis is its sharded first axis, such as IA3's output scaling). The refusals about
    projecting apply to ``method="pegp"`` only: the other methods never project."""
    args = trainer.args
    fsdp_version = trainer.accelerator.state.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None
    deepspeed = trainer.is_deepspeed_enabled
    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if deepspeed else None
    mode = select_projection_mode(args.projection_mode, deepspeed, fsdp_version, zero_stage)
    if args.method != "pegp":
        return mode
    config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config if deepspeed else None
    optim, decay = effective_optimizer(getattr(args.optim, "value", args.optim), args.weight_decay, config)
    check_update_reprojection(args.update_reprojection, optim, decay, deepspeed)
    transposed = [name for name, tensor in projector.tensors.items() if tensor.transposed]
    if fsdp_version == 2 and transposed:
        raise ValueError(
            f"FSDP2 shards dim 0, which is the feature axis of {transposed[0]} (and {len(transposed) - 1} more): "
            "its projection would not be exact on a shard. Use DDP or DeepSpeed ZeRO-2 for this PET."
        )
    return mode


def grow_bases_on_every_rank(
    projector: GradientProjector,
    covariances: Mapping[str, torch.Tensor],
    threshold: float,
    where: str = "growth",
    names: Iterable[str] | None = None,
    reference: bool = False,
) -> None:
    """Sum the per-process covariances, grow the bases of ``names`` (default: every protected tensor, as after a
    task; a reference set grows :meth:`~pegp_hf.core.projector.GradientProjector.reference_tensors` only) on the main
    process, logging tensors that became full, and broadcast them with the reference dims, so every rank holds the
    same bits (Accelerate's process state; one process: just grow). ``reference``: see
    :meth:`~pegp_hf.core.projector.GradientProjector.grow`.

    Raises:
        NonFiniteError: a summed covariance holds NaN / inf (on every rank: they all see the same sums); ``where``
            names the task in the message.
    """
    state = PartialState()
    distinct = {id(covariance): covariance for covariance in covariances.values()}  # shared sums are reduced once
    reduced = {key: _summed(covariance, state) for key, covariance in distinct.items()}
    summed = {name: reduced[id(covariance)] for name, covariance in covariances.items()}
    check_tensors(summed, "the feature covariances", where)
    if state.is_main_process:
        for name in projector.grow(summed, threshold, names, reference):
            logger.warning("basis of %s is full: its gradient is now projected to zero (frozen)", name)
    if state.num_processes > 1:
        cpu_bases = {name: basis.cpu() for name, basis in projector.bases.items()}
        bases, reference_dims = broadcast_object_list([cpu_bases, projector.reference_dims])
        projector.load_bases(bases, reference_dims)


def _summed(tensor: torch.Tensor, state: PartialState, chunk_bytes: int = 2**26) -> torch.Tensor:
    """``tensor`` summed over processes. A sum kept on the CPU (``covariances_on_cpu``) travels to the process's device
    in row chunks of about ``chunk_bytes`` for the all-reduce (NCCL reduces device tensors only) and comes back."""
    if state.num_processes == 1:
        return tensor
    if tensor.device == state.device:
        return reduce(tensor, "sum")
    rows = max(1, chunk_bytes // (tensor.shape[-1] * tensor.element_size()))
    return torch.cat([reduce(part.to(state.device), "sum").to(tensor.device) for part in tensor.split(rows)])


def check_frozen_after_first_task(trainer: Trainer, frozen: list[torch.nn.Parameter]) -> None:
    """Under DDP, weights frozen after the first task stop receiving gradients inside the wrapper built for task 1:
    refuse unless ``ddp_find_unused_parameters`` lets DDP skip them."""
    args = trainer.args
    if not frozen or args.world_size <= 1:
        return
    checkpointing = args.activation_checkpointing or args.gradient_checkpointing
    checkpointing = checkpointing or getattr(trainer.model, "is_activation_checkpointing", False)
    if args.ddp_find_unused_parameters is False or (args.ddp_find_unused_parameters is None and checkpointing):
        raise ValueError(
            "PET weights trained on the first task only (a frozen value prefix; an MLP prefix's embedding, hidden "
            "layer and key bias) stop receiving gradients inside the DDP wrapper built for task 1: set "
            "ddp_find_unused_parameters=True"
        )
