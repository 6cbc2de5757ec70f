"""``PEGPTrainingArguments``: ``TrainingArguments`` plus the few knobs of continual PEGP training."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

from pegp_hf.backends import PROJECTION_MODES
from pegp_hf.continual.heads import HEADS

METHODS = ("pegp", "sequential", "head_only", "first_session")
REPROJECTION = ("auto", "on", "off")
LOSS_CLASSES = ("task", "seen")
FEATURE_CAPTURE = ("pass", "training")


@dataclass
class PEGPTrainingArguments(TrainingArguments):
    """Arguments of :class:`~pegp_hf.ContinualPEGPTrainer`. Epochs, batch size, learning rate, optimizer ... apply
    to every task; a fresh optimizer and scheduler are made for each one.

    Parameters by group: the method (``method``, ``threshold``, ``feature_samples``, ``reference_threshold``,
    ``reference_samples``, ``protect``, ``update_reprojection``, ``projection_mode``) and the classification
    objective (``loss_classes``, ``head``, ``head_module``, ``head_shrinkage``, ``align_*``: read by
    :class:`~pegp_hf.continual.classification.ClassificationObjective`, unused by other objectives).
    """

    method: str = field(
        default="pegp",
        metadata={
            "help": "pegp: project PET gradients against old tasks' feature subspaces. sequential: the same PET "
            "trained task after task with no projection (the paper's naive baseline). head_only: the PET is frozen "
            "and only the head learns (the floor any PET method must beat). first_session: the PET trains on task 1 "
            "only, then is frozen and only the head learns (first-session adaptation, APER: Zhou et al. 2024).",
            "choices": list(METHODS),
        },
    )
    threshold: float = field(
        default=0.97,
        metadata={
            "help": "Energy threshold eps in (0, 1] of the GPM rule: each basis keeps the leading feature directions "
            "until they hold this share of the task's feature energy. Higher protects more, leaves less room to learn."
        },
    )
    feature_samples: int = field(
        default=768,
        metadata={
            "help": "Training samples of a finished task run through the model to capture features (paper: 768)."
        },
    )
    feature_tokens_per_sequence: int | None = field(
        default=None,
        metadata={
            "help": "At most this many real tokens of each captured sequence enter the feature covariances, spread "
            "evenly over it, so that long documents do not dominate a basis. Padding (attention_mask 0) never does."
        },
    )
    reference_threshold: float = field(
        default=0.99,
        metadata={
            "help": "Energy threshold eps of the reference set ('task 0', the trainer's reference_dataset): before "
            "the first task, the bases of LoRA A / adapter down / IA3 grow from the reference features to this "
            "share, and LoRA A / adapter down are moved into their null space (docs/method.md)."
        },
    )
    reference_samples: int | None = field(
        default=None,
        metadata={"help": "Rows of the reference set run through the model (default: feature_samples)."},
    )
    feature_capture: str = field(
        default="pass",
        metadata={
            "help": "Where the features of a finished task come from. pass: a separate eval pass over feature_samples "
            "training samples after the task (exact: the final weights, no dropout). training: the forward passes of "
            "the task's last optimizer steps, about feature_samples samples, as they train (no extra forward pass; "
            "the weights still move and dropout is on during those steps).",
            "choices": list(FEATURE_CAPTURE),
        },
    )
    covariances_on_cpu: bool = field(
        default=False,
        metadata={
            "help": "Keep the feature covariances in float64 on the CPU, each batch's product computed in float32 on "
            "the device: for models whose d x d sums would not fit next to them (docs/distributed.md)."
        },
    )
    protect: str = field(
        default=".*",
        metadata={
            "help": "Regular expression (re.search) on parameter names: the protectable PET tensors it matches are "
            "projected; e.g. 'lora_A' protects only LoRA A. Protecting one LoRA factor alone guarantees nothing."
        },
    )
    update_reprojection: str = field(
        default="auto",
        metadata={
            "help": "Project the parameter update W_after - W_before after each optimizer step. auto: on unless the "
            "optimizer is plain torch SGD (momentum / Nesterov allowed) with weight decay 0 on protected tensors, "
            "the one case where the update is a combination of projected gradients.",
            "choices": list(REPROJECTION),
        },
    )
    update_check_steps: int = field(
        default=1,
        metadata={
            "help": "Measure max |delta W U| (pegp_update_overlap, the results' max_update_overlap) on every N-th "
            "optimizer step of a task, its first included. Above 1, a step whose update needs no re-projection "
            "(plain SGD) skips the snapshot and check entirely: less fixed work per step, a sampled record."
        },
    )
    projection_mode: str = field(
        default="auto",
        metadata={
            "help": "Where gradients are projected. training_step: once per optimizer step, on the synced gradients "
            "(single process, DDP, FSDP2). hooks: a tensor hook per protected parameter (DeepSpeed, which steps "
            "inside backward). auto: hooks under DeepSpeed, else training_step.",
            "choices": list(PROJECTION_MODES),
        },
    )
    loss_classes: str = field(
        default="task",
        metadata={
            "help": "Classes whose logits compete in the training loss of a class-split task. task: the task's own "
            "classes (the paper's protocol for linear heads: old head rows get no gradient). seen: every class seen "
            "so far (CLIP's protocol: the old classes' text embeddings exist without replay, so new images learn to "
            "beat them).",
            "choices": list(LOSS_CLASSES),
        },
    )
    head: str = field(
        default="masked_linear",
        metadata={
            "help": "Class-incremental head. masked_linear: the linear classifier as trained (the paper's protocol). "
            "prototype: cosine nearest class mean over the classifier's input features. aligned: the classifier's "
            "seen-class rows re-fit after each task on features sampled from per-class Gaussians (as SLCA). ranpac: a "
            "ridge classifier on a fixed random projection of those features, exact under class-incremental updates "
            "(RanPAC, McDonnell et al. 2023).",
            "choices": list(HEADS),
        },
    )
    head_module: str = field(
        default="classifier",
        metadata={"help": "Name (last component) of the classifier module; its input are the backbone features."},
    )
    head_shrinkage: float = field(
        default=0.1,
        metadata={"help": "aligned head: covariance shrinkage toward the mean per-dimension variance (times I)."},
    )
    align_samples_per_class: int = field(
        default=256, metadata={"help": "aligned head: features sampled per seen class for each re-fit."}
    )
    align_epochs: int = field(default=10, metadata={"help": "aligned head: epochs of each re-fit."})
    align_learning_rate: float = field(default=0.01, metadata={"help": "aligned head: SGD learning rate of re-fits."})
    ranpac_dim: int = field(
        default=2048,
        metadata={"help": "ranpac head: width M of the random projection (RanPAC uses 10000; its Gram matrix is M x M "
                  "float64)."},
    )  # fmt: skip
    ranpac_ridge: float | None = field(
        default=None,
        metadata={"help": "ranpac head: the ridge lambda; by default chosen after each task among 1e-8 ... 1e8 on a "
                  "held-out fifth of the task's features, as RanPAC does."},
    )  # fmt: skip
    drift_compensation: bool = field(
        default=False,
        metadata={"help": "prototype / aligned heads: move the stored means of old classes by the drift of the current "
                  "task's features, measured on the same samples before and after it trains (semantic drift "
                  "compensation, Yu et al. 2020). Costs one more feature pass per task."},
    )  # fmt: skip
    save_strategy: str = field(
        default="no",
        metadata={
            "help": "Must stay 'no': pegp_hf writes one checkpoint per finished task under output_dir/task-<k>, and "
            "resumes from those."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "A fresh train() (no resume_from_checkpoint) into an output_dir that already holds task-<k> "
            "checkpoints removes them first; by default it refuses, since the two runs' checkpoints would mix."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False so image columns reach the collator; the collator picks what the model takes."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.projection_mode not in PROJECTION_MODES:
            raise ValueError(f"projection_mode must be one of {PROJECTION_MODES}, got {self.projection_mode!r}")
        if self.loss_classes not in LOSS_CLASSES:
            raise ValueError(f"loss_classes must be one of {LOSS_CLASSES}, got {self.loss_classes!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.drift_compensation and self.head not in ("prototype", "aligned"):
            raise ValueError(f"drift_compensation moves the class means of the prototype / aligned heads; head "
                             f"{self.head!r} keeps none: choose head='prototype' or 'aligned'")  # fmt: skip
        if self.ranpac_dim < 1:
            raise ValueError(f"ranpac_dim must be at least 1, got {self.ranpac_dim}")
        if self.ranpac_ridge is not None and not self.ranpac_ridge > 0:
            raise ValueError(f"ranpac_ridge must be > 0 (or None to choose it per task), got {self.ranpac_ridge}")
        if self.head_shrinkage < 0:
            raise ValueError(f"head_shrinkage must be >= 0, got {self.head_shrinkage}")
        if self.update_reprojection not in REPROJECTION:
            raise ValueError(f"update_reprojection must be one of {REPROJECTION}, got {self.update_reprojection!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.reference_threshold <= 1.0:
            raise ValueError(f"reference_threshold must be in (0, 1], got {self.reference_threshold}")
        if self.reference_samples is not None and self.reference_samples < 1:
            raise ValueError(f"reference_samples must be at least 1, got {self.reference_samples}")
        if self.feature_capture not in FEATURE_CAPTURE:
            raise ValueError(f"feature_capture must be one of {FEATURE_CAPTURE}, got {self.feature_capture!r}")
        if self.feature_capture == "training" and str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "no":
            raise ValueError("feature_capture='training' counts every forward pass of a task's last steps, so an "
                             "evaluation inside training (eval_strategy) would enter the bases: set eval_strategy="
                             "'no' (pegp_hf evaluates after each task) or feature_capture='pass'")  # fmt: skip
        if self.feature_capture == "training" and self.gradient_checkpointing:
            raise ValueError("feature_capture='training' would count each checkpointed forward twice (it is recomputed "
                             "in backward): use feature_capture='pass' with gradient_checkpointing")  # fmt: skip
        if self.update_check_steps < 1:
            raise ValueError(f"update_check_steps must be at least 1, got {self.update_check_steps}")
        if self.feature_samples < 1:
            raise ValueError(f"feature_samples must be at least 1, got {self.feature_samples}")
        if self.feature_tokens_per_sequence is not None and self.feature_tokens_per_sequence < 1:
            raise ValueError(f"feature_tokens_per_sequence must be at least 1, got {self.feature_tokens_per_sequence}")
        try:
            re.compile(self.protect)
        except re.error as error:
            raise ValueError(f"protect is not a valid regular expression: {error}") from error
        if self.output_dir is not None and os.path.isfile(self.output_dir):
            raise ValueError(
                f"output_dir {self.output_dir} is a file; task checkpoints go into a folder: pass another path"
            )
        if self.dataloader_persistent_workers:
            raise ValueError(
                "dataloader_persistent_workers must be False: every task and evaluation set gets its own data loader"
            )
        if self.dataloader_drop_last:
            raise ValueError("dataloader_drop_last must be False: evaluation and feature capture must see every sample")
        if self.save_strategy != "no":
            raise ValueError(
                "save_strategy must be 'no': ContinualPEGPTrainer checkpoints after every task under "
                "output_dir/task-<k> (mid-task Trainer checkpoints would be overwritten by the next task)"
            )
