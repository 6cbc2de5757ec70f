"""Where PEGP projects, for each Accelerate backend, and what each backend cannot do.

| backend | projection point | why |
|---|---|---|
| single process, DDP | ``training_step``, sync micro-batch | after accumulation and DDP's all-reduce, before clipping |
| FSDP2 | ``training_step``, on each rank's local rows | FSDP2 shards dim 0; the projection acts on the last axis |
| DeepSpeed ZeRO 1 / 2 | tensor hooks on the PET leaf parameters | it steps inside ``backward``: too late after |
| FSDP1 | refused | flat parameters split rows of a weight across ranks |

Projection is linear, so projecting every micro-batch's gradient in a hook equals projecting their sum.
"""

from __future__ import annotations

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
