"""``ContinualPEGPTrainer``: a ``transformers.Trainer`` that learns a task sequence with one shared PET adapter.

Per task ``t`` (Qiao et al., PEGP, arXiv 2405.13383, section 4 of ``docs/method.md``):

1. fresh optimizer and scheduler, then ``Trainer.train`` on the task's data. Logits of classes outside the task are
   masked in the loss (class- / task-incremental, online; ``loss_classes="seen"`` keeps every seen class), so the
   head's old rows get no gradient; the head itself is trained but **not projected**. Every protected PET gradient
   is projected once per optimizer step, in ``training_step`` of the micro-batch where
   ``accelerator.sync_gradients`` is True: after gradient accumulation and the all-reduce, before clipping (under
   DeepSpeed, which steps inside backward, by tensor hooks instead; see ``backends.py``). The update is re-projected
   after the step when the optimizer needs it.
2. ``feature_samples`` training samples run through the model (eval mode, no grad); the feature covariance of every
   protected tensor grows its basis by the GPM rule.
3. every seen task's test set is predicted: the class-incremental accuracy (logits of all seen classes compete) and
   the task-incremental one (logits restricted to the task's classes) fill ``A[i, t]``; each
   :class:`~pegp_hf.evaluation.ContinualEvaluator` adds its own matrices and per-task figures.
4. ``output_dir/task-<t>/`` is written atomically; ``train(resume_from_checkpoint=...)`` continues after it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, enable_full_determinism, set_seed
from transformers.trainer_utils import TrainOutput

from pegp_hf.backends import check_update_reprojection, effective_optimizer, select_projection_mode
from pegp_hf.checkpoint import (
    HEAD_NAME,
    SUBSPACES_NAME,
    CheckpointError,
    atomic_directory,
    is_peft_model,
    latest_task_checkpoint,
    library_versions,
    load_adapter_weights,
    load_head_statistics,
    load_subspaces,
    read_adapter_weights,
    read_state,
    save_adapter,
    save_head_statistics,
    save_subspaces,
    task_dir_name,
    write_state,
)
from pegp_hf.config import PEGPTrainingArguments
from pegp_hf.data import TaskSequence
from pegp_hf.evaluation import ContinualEvaluator
from pegp_hf.features import FeatureCovariances
from pegp_hf.heads import ClassStatistics, align_linear_head, prototype_logits
from pegp_hf.hub import model_card, push_task_checkpoint, resolve_checkpoint
from pegp_hf.metrics import summarize
from pegp_hf.projection import GradientProjector
from pegp_hf.tuners import find_protected_tensors, frozen_after_first_task, pet_configs, read_pet_configs

logger = logging.getLogger(__name__)

MATRICES = ("class_incremental", "task_incremental")


class _ProjectedUpdateCallback(TrainerCallback):
    """Brackets ``optimizer.step()``: snapshot before, re-project and measure ``max |delta W U|`` after."""

    def __init__(self, trainer: ContinualPEGPTrainer) -> None:
        self.trainer = trainer

    def _applies(self) -> bool:
        # Under DeepSpeed the step happens inside backward: there is no update to bracket here.
        return self.trainer.projector.active and not self.trainer.is_deepspeed_enabled

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        if self._applies():
            self.trainer.projector.snapshot()

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        if self._applies():
            self.trainer._record_update(self.trainer.projector.finish_update(self.trainer._reprojects_updates()))


class ContinualPEGPTrainer(Trainer):
    """Train one PET adapter through a :class:`~pegp_hf.data.TaskSequence` with PEGP gradient projection.

    Args:
        model: a classifier (``outputs.logits`` of shape ``(batch, num_labels)``) whose head covers every label id of
            the sequence, carrying either a PEFT LoRA adapter (``peft.PeftModel``) or pegp_hf tuners (prompts,
            prefixes, bottleneck adapters: :func:`pegp_hf.tuners.inject_pet`); keep the head trainable with
            ``modules_to_save``. A model that builds its classifier from class names (CLIP:
            :class:`~pegp_hf.clip.CLIPForClassNameClassification`) defines ``reveal_classes(classes)``: the trainer
            calls it at the start of each task with every class seen so far, so future classes never enter a
            forward pass, a gradient or a feature subspace.
        args: :class:`~pegp_hf.config.PEGPTrainingArguments`.
        tasks: the task sequence (its scenario decides the loss masks and the headline accuracy matrix).
        evaluators: extra measurements after each task (:class:`~pegp_hf.evaluation.ContinualEvaluator`, e.g.
            :class:`~pegp_hf.crossmodal.CrossModalEvaluator`), kept with the accuracy matrices.
        **kwargs: any other ``Trainer`` argument (``data_collator``, ``processing_class``, ``callbacks``, ...), except
            ``train_dataset`` / ``eval_dataset`` (set per task), ``compute_loss_func`` (the masked loss) and
            ``optimizers`` (each task needs a fresh optimizer: use ``args.optim`` or ``optimizer_cls_and_kwargs``).

    Runs on one process and DDP; FSDP2 and DeepSpeed ZeRO-1/2 are experimental (see ``docs/distributed.md``).

    After :meth:`train`, ``accuracy[name]`` holds the ``T x T`` matrices (percent; NaN where not yet measured) for
    ``name`` in ``("class_incremental", "task_incremental")`` and the evaluators' matrices, ``task_metrics`` the
    evaluators' figures per task, and :meth:`continual_results` sums them up.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: PEGPTrainingArguments,
        tasks: TaskSequence,
        evaluators: Sequence[ContinualEvaluator] = (),
        **kwargs: Any,
    ):
        if not isinstance(args, PEGPTrainingArguments):
            raise TypeError(f"args must be PEGPTrainingArguments, got {type(args).__name__}")
        for key in ("train_dataset", "eval_dataset", "compute_loss_func", "model_init"):
            if kwargs.get(key) is not None:
                raise ValueError(f"ContinualPEGPTrainer sets {key} itself (per task); pass tasks=... instead")
        if any(item is not None for item in kwargs.get("optimizers", (None, None))):
            raise ValueError(
                "every task needs a fresh optimizer, so optimizers=(...) cannot be reused: choose it with "
                "args.optim / args.optim_args, or pass optimizer_cls_and_kwargs=(cls, kwargs)"
            )
        if not is_peft_model(model) and not pet_configs(model):
            raise TypeError(
                "model must carry a PET adapter: a PEFT LoRA model (peft.get_peft_model(model, LoraConfig(...))) or a "
                "model with pegp_hf tuners (pegp_hf.tuners.inject_pet(model, PromptConfig(...)))"
            )
        super().__init__(model=model, args=args, compute_loss_func=self._masked_cross_entropy, **kwargs)
        fsdp_version = self.accelerator.state.fsdp_plugin.fsdp_version if self.is_fsdp_enabled else None
        zero_stage = self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None
        self.projection_mode = select_projection_mode(
            args.projection_mode, self.is_deepspeed_enabled, fsdp_version, zero_stage
        )
        deepspeed_config = (
            self.accelerator.state.deepspeed_plugin.deepspeed_config if self.is_deepspeed_enabled else None
        )
        optim, decay = effective_optimizer(
            getattr(args.optim, "value", args.optim), args.weight_decay, deepspeed_config
        )
        check_update_reprojection(args.update_reprojection, optim, decay, self.is_deepspeed_enabled)
        self.tasks = tasks
        self.adapter_name: str | None = self.model.active_adapter if is_peft_model(self.model) else None
        # The masked linear head is judged by the model's own logits; the other heads read the classifier's inputs.
        needs_head = args.head != "masked_linear" or args.method == "head_only"
        self.head_module = _find_module(self.model, args.head_module, required=needs_head)
        head_parameters = {id(p) for p in self.head_module.parameters()} if self.head_module is not None else set()
        if args.method == "head_only":
            for parameter in self.model.parameters():
                if id(parameter) not in head_parameters:
                    parameter.requires_grad_(False)
        self.head_statistics: ClassStatistics | None = None
        if args.head != "masked_linear":
            dim = _trainable_linear(self.head_module).in_features
            self.head_statistics = ClassStatistics.empty(self.num_labels, dim, with_covariances=args.head == "aligned")
        pattern = re.compile(args.protect)
        protected = [tensor for tensor in find_protected_tensors(self.model) if pattern.search(tensor.name)]
        if args.method == "pegp" and not protected:
            raise ValueError(f"no trainable PET tensor matches protect={args.protect!r}: nothing would be protected")
        self.projector = GradientProjector(protected)
        if args.method == "pegp" and frozen_after_first_task(self.model) and args.world_size > 1:
            checkpointing = args.activation_checkpointing or args.gradient_checkpointing
            checkpointing = checkpointing or getattr(self.model, "is_activation_checkpointing", False)
            if args.ddp_find_unused_parameters is False or (args.ddp_find_unused_parameters is None and checkpointing):
                raise ValueError(
                    "value prefixes frozen after the first task stop receiving gradients inside the DDP wrapper built "
                    "for task 1: set ddp_find_unused_parameters=True (or use value_prefix='free')"
                )
        if self.projection_mode == "hooks":  # before accelerator.prepare, which happens in Trainer.train
            for name, tensor in self.projector.tensors.items():
                tensor.parameter.register_hook(functools.partial(self.projector.project_gradient, name))
        size = len(tasks)
        self.evaluators = list(evaluators)
        names = [*MATRICES, *(name for evaluator in self.evaluators for name in evaluator.matrices)]
        if len(set(names)) != len(names):
            raise ValueError(f"two accuracy matrices share a name: {names}")
        self.accuracy: dict[str, np.ndarray] = {name: np.full((size, size), np.nan) for name in names}
        self.initial_metrics: dict[str, float] = {}
        self.task_metrics: list[dict[str, float | None]] = []
        self.task_timings: list[dict[str, float]] = []
        self.task_updates: list[dict[str, float]] = []
        self._train_classes: torch.Tensor | None = None
        self._reproject: bool | None = None
        self._update_record: torch.Tensor | None = None
        self._task_update_record: torch.Tensor | None = None
        self.add_callback(_ProjectedUpdateCallback(self))
        unprotected = [
            name
            for name, p in self.model.named_parameters()
            if p.requires_grad and name not in self.projector.tensors and id(p) not in head_parameters
        ]
        if unprotected and args.method == "pegp":
            logger.warning(
                "trainable but not protected, so old tasks' outputs can drift through them: %s", ", ".join(unprotected)
            )

    # ---- loss and projection -------------------------------------------------------------------------------------

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def _class_mask(self, classes: Sequence[int]) -> torch.Tensor:
        """``(num_labels,)`` bool on the training device, True for ``classes``."""
        mask = torch.zeros(self.num_labels, dtype=torch.bool, device=self.args.device)
        mask[list(classes)] = True
        return mask

    def _masked_cross_entropy(
        self, outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Cross-entropy over the current task's classes while training (all classes at evaluation), summed and
        divided by the items of the whole accumulated batch, so accumulation is exact."""
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if self._train_classes is not None and self.model.training:
            logits = logits.masked_fill(~self._train_classes, torch.finfo(logits.dtype).min)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum().clamp_min(1)
        return loss / count

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """``Trainer.training_step``, then, on the micro-batch that ends an accumulation window, the projection of
        every protected gradient against the old-task bases (before the Trainer clips and steps)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.projection_mode == "training_step" and self.accelerator.sync_gradients and self.projector.active:
            self.projector.project_gradients()
        return loss

    def _reprojects_updates(self) -> bool:
        """Whether ``W_after - W_before`` must be projected after the step (decided once per task's optimizer)."""
        if self._reproject is None:
            if self.args.update_reprojection != "auto":
                self._reproject = self.args.update_reprojection == "on"
            else:
                optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap AcceleratedOptimizer
                protected = {id(t.parameter) for t in self.projector.tensors.values()}
                decays = any(
                    group.get("weight_decay", 0.0) != 0.0 and any(id(p) in protected for p in group["params"])
                    for group in optimizer.param_groups
                )
                self._reproject = type(optimizer) is not torch.optim.SGD or decays
            logger.info("update re-projection %s", "on" if self._reproject else "off")
        return self._reproject

    def _record_update(self, measured: torch.Tensor) -> None:
        """Keep the largest ``[max |delta W U|, max |delta W|]`` since the last log line (on device, no sync)."""
        for attribute in ("_update_record", "_task_update_record"):
            record = getattr(self, attribute)
            setattr(self, attribute, measured if record is None else torch.maximum(record, measured))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log``, with ``pegp_update_overlap`` = max ``|delta W U|`` over the steps since the last training
        log (~0 when old outputs are protected) and ``pegp_update_max`` = max ``|delta W|`` for scale."""
        if "loss" in logs and self._update_record is not None:
            logs["pegp_update_overlap"], logs["pegp_update_max"] = self._update_record.tolist()
            self._update_record = None
        super().log(logs, start_time)

    # ---- the continual loop --------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """Train every task of the sequence in order.

        Args:
            resume_from_checkpoint: ``True`` for the newest ``output_dir/task-<k>``, the path of one, or a Hub repo id
                pushed by a run with ``push_to_hub``; training continues at task ``k + 1`` with the stored adapter,
                head, bases and accuracy matrices.
            **kwargs: passed to ``Trainer.train`` for each task (``trial``, ``ignore_keys_for_eval``).

        Returns:
            ``TrainOutput`` whose metrics hold ``acc``, ``forgetting``, ``bwt`` of the headline accuracy matrix.
        """
        if self._finished():
            raise RuntimeError(
                f"this trainer has already trained {self._finished()} tasks; make a new ContinualPEGPTrainer "
                "(and pass resume_from_checkpoint to continue a sequence)"
            )
        self.tasks.validate(self.num_labels)
        if self.tasks.scenario == "online" and (self.args.num_train_epochs != 1 or self.args.max_steps > 0):
            raise ValueError("the online scenario makes a single pass over each task: set num_train_epochs=1")
        first = self._resume(resume_from_checkpoint) if resume_from_checkpoint else 0
        if first == 0 and self.evaluators:
            self.initial_metrics = {k: v for e in self.evaluators for k, v in e.before_sequence(self).items()}
        steps, losses = 0, []
        for index in range(first, len(self.tasks)):
            output = self._train_task(index, **kwargs)
            steps += output.global_step
            losses.append(output.training_loss)
        results = self.continual_results()
        metrics = {key: results[key] for key in ("acc", "forgetting", "bwt")}
        return TrainOutput(steps, float(np.mean(losses)) if losses else math.nan, metrics)

    def _train_task(self, index: int, **kwargs: Any) -> TrainOutput:
        task = self.tasks[index]
        self.train_dataset, self.eval_dataset = task.train, task.test
        self.optimizer = self.lr_scheduler = None
        self._reproject, self._update_record, self._task_update_record = None, None, None
        seen = sorted(set().union(*(t.classes for t in self.tasks[: index + 1])))
        competing = task.classes if self.args.loss_classes == "task" else seen
        self._train_classes = self._class_mask(competing) if self.tasks.disjoint else None
        self._reveal_classes(seen)
        if index > 0 and self.args.method == "pegp":
            for parameter in frozen_after_first_task(self.model):
                parameter.requires_grad_(False)
        # Seed per task: a resumed run enters task k with the same RNG state as an uninterrupted one.
        seed = self.args.seed + index
        enable_full_determinism(seed) if self.args.full_determinism else set_seed(seed)
        logger.info(
            "task %d/%d (%s): %d train samples, classes %s",
            index + 1,
            len(self.tasks),
            task.name,
            len(task.train),
            list(task.classes),
        )
        start = time.perf_counter()
        output = super().train(**kwargs)
        trained = time.perf_counter()
        # None while no basis exists (the first task): there is nothing to be orthogonal to
        overlap, largest = self._task_update_record.tolist() if self._task_update_record is not None else (None, None)
        self.task_updates.append({"max_update_overlap": overlap, "max_update": largest})
        self._capture_task(task.train)
        captured = time.perf_counter()
        self._evaluate_seen(index)
        self._run_evaluators(index)
        evaluated = time.perf_counter()
        self.task_timings.append(
            {
                "train_seconds": trained - start,
                "capture_seconds": captured - trained,
                "eval_seconds": evaluated - captured,
            }
        )
        self._log_task(index)
        self._save_task_checkpoint(index)
        return output

    def _capture_task(self, train_split: Any) -> None:
        """One eval pass over ``feature_samples`` training samples of the finished task, split across processes
        (``n`` in total): grow the PEGP bases from the protected tensors' ``x x^T`` summed over processes (grown on
        the main process and broadcast, so every rank holds the same bits), update the head's class statistics
        from the classifier's inputs of all processes, and re-fit the aligned head."""
        if self.args.method != "pegp" and self.head_statistics is None:
            return  # nothing uses features
        tensors = self.projector.tensors.values() if self.args.method == "pegp" else []
        with FeatureCovariances(tensors) as capture:
            features, _, labels = self._predict(self._feature_sample_loader(train_split), gather=False)
        if self.args.method == "pegp":
            covariances = {name: self.accelerator.reduce(cov, "sum") for name, cov in capture.covariances.items()}
            if self.accelerator.is_main_process:
                for name in self.projector.grow(covariances, self.args.threshold):
                    logger.warning("basis of %s is full: its gradient is now projected to zero (frozen)", name)
            if self.accelerator.num_processes > 1:
                cpu_bases = {name: basis.cpu() for name, basis in self.projector.bases.items()}
                self.projector.load_bases(broadcast_object_list([cpu_bases])[0])
        if self.head_statistics is not None:
            parts = gather_object([(features, labels)])  # every process's samples, in process order
            self.head_statistics.update(torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts]))
        if self.args.head == "aligned":
            align_linear_head(
                _trainable_linear(self.head_module), self.head_statistics, self.args.head_shrinkage,
                self.args.align_samples_per_class, self.args.align_epochs, self.args.align_learning_rate,
                seed=self.args.seed + self._finished(),
            )  # fmt: skip

    def _feature_sample_loader(self, train_split: Any) -> DataLoader:
        """This process's contiguous share of ``feature_samples`` training samples (shuffled with ``args.seed``), in
        a plain loader: no padding, so every sample counts once across processes. The count is rounded down to a
        multiple of the process count, so every process runs the same number of forward passes (FSDP2 all-gathers
        in each one) and none is left without samples."""
        processes = self.accelerator.num_processes
        count = min(self.args.feature_samples, len(train_split))
        count -= count % processes
        if count == 0:
            raise ValueError(f"a task has {len(train_split)} training samples, fewer than the {processes} processes")
        sample = train_split.shuffle(seed=self.args.seed).select(range(count))
        share = sample.shard(self.accelerator.num_processes, self.accelerator.process_index, contiguous=True)
        return DataLoader(
            share,
            batch_size=self.args.eval_batch_size,
            collate_fn=self._get_collator_with_removed_columns(self.data_collator, "feature capture"),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    @torch.no_grad()
    def _predict(self, loader: Any, gather: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Run ``loader`` through the model (eval mode, no grad; any forward hooks installed fire) and return, on CPU,
        the classifier's inputs ``(N, dim)`` (only for the heads that read them, else ``None``), the logits
        ``(N, num_labels)`` and the labels ``(N,)``. With ``gather``, batches are gathered over processes
        (``gather_for_metrics``: dataset order, padding dropped)."""
        reads_features = self.head_statistics is not None
        batch_features: list[torch.Tensor] = []
        handle = None
        if reads_features:
            handle = self.head_module.register_forward_hook(lambda m, args, out: batch_features.append(args[0]))
        features, logits, labels = [], [], []
        self.model.eval()
        try:
            for inputs in loader:
                inputs = self._prepare_inputs(inputs)
                batch_labels = inputs.pop("labels")
                with self.autocast_smart_context_manager():
                    outputs = self.model(**inputs)
                batch = (outputs["logits"] if isinstance(outputs, Mapping) else outputs[0], batch_labels)
                if reads_features:
                    batch = (*batch, batch_features.pop())
                if gather:
                    batch = self.accelerator.gather_for_metrics(batch)
                logits.append(batch[0].float().cpu())
                labels.append(batch[1].cpu())
                if reads_features:
                    features.append(batch[2].float().cpu())
        finally:
            if handle is not None:
                handle.remove()
        if not labels:  # this process got no batch: empty tensors of the right widths
            if reads_features:
                features.append(torch.zeros(0, _trainable_linear(self.head_module).in_features))
            logits.append(torch.zeros(0, self.num_labels))
            labels.append(torch.zeros(0, dtype=torch.long))
        return (torch.cat(features) if reads_features else None), torch.cat(logits), torch.cat(labels)

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, num_labels)`` logits of the chosen head for classifier inputs ``features`` ``(N, dim)``."""
        if self.args.head == "prototype":
            return prototype_logits(features, self.head_statistics)
        head = self.head_module
        with torch.no_grad():
            return head(features.to(self.args.device, next(head.parameters()).dtype)).float().cpu()

    def _evaluate_seen(self, index: int) -> None:
        seen = sorted(set().union(*(task.classes for task in self.tasks[: index + 1])))
        for i, task in enumerate(self.tasks[: index + 1]):
            features, logits, labels = self._predict(self.get_eval_dataloader(task.test), gather=True)
            if self.args.head != "masked_linear":
                logits = self.head_logits(features)
            logits, labels = logits.numpy(), labels.numpy()
            self.accuracy["class_incremental"][i, index] = _restricted_accuracy(logits, labels, seen)
            self.accuracy["task_incremental"][i, index] = _restricted_accuracy(logits, labels, task.classes)

    def _run_evaluators(self, index: int) -> None:
        """Fill column ``index`` of the evaluators' matrices and append their figures to ``task_metrics``."""
        scalars: dict[str, float | None] = {}
        for evaluator in self.evaluators:
            evaluation = evaluator.after_task(self, index)
            for name in evaluator.matrices:
                self.accuracy[name][: index + 1, index] = evaluation.columns[name]
            scalars.update(evaluation.scalars)
        self.task_metrics.append(scalars)

    def _reveal_classes(self, classes: Sequence[int]) -> None:
        """Tell a model that builds its classifier from class names which classes exist so far (see ``model``)."""
        reveal = getattr(self.model, "reveal_classes", None)
        if reveal is not None:
            reveal(list(classes))

    @property
    def headline_matrix(self) -> str:
        """The accuracy matrix the scenario is judged by."""
        return "task_incremental" if self.tasks.scenario == "task_incremental" else "class_incremental"

    def _finished(self) -> int:
        return len(self.task_timings)

    def continual_results(self) -> dict[str, Any]:
        """Accuracy matrices (lists, ``None`` where not measured) and their ACC / Forgetting / BWT over the tasks
        finished so far; ``acc`` / ``forgetting`` / ``bwt`` are those of the headline matrix."""
        done = self._finished()
        results: dict[str, Any] = {"scenario": self.tasks.scenario, "head": self.args.head, "finished_tasks": done}
        for name, matrix in self.accuracy.items():
            results[name] = {
                "accuracy_matrix": _to_json_matrix(matrix),
                **(summarize(matrix[:done, :done]) if done else {}),
            }
        results["accuracy_matrix"] = results[self.headline_matrix]["accuracy_matrix"]
        for key in ("acc", "forgetting", "bwt"):
            results[key] = results[self.headline_matrix].get(key, math.nan)
        results["subspace_dims"] = self.projector.dims()
        results["saturated"] = self.projector.saturated()
        results["protected_share"] = {kind: k / d for kind, (k, d, _) in self._dims_by_kind().items()}
        results["timings"] = self.task_timings
        results["updates"] = self.task_updates
        results["initial_metrics"] = self.initial_metrics
        results["task_metrics"] = self.task_metrics[:done]
        return results

    def _dims_summary(self) -> str:
        """``kind k/d`` summed over the tensors of each kind, e.g. ``lora_A 410/1536 (x16)``."""
        if self.args.method != "pegp":
            return f"none ({self.args.method})"
        return ", ".join(f"{kind} {k}/{d} (x{n})" for kind, (k, d, n) in self._dims_by_kind().items())

    def _dims_by_kind(self) -> dict[str, tuple[int, int, int]]:
        """Per tensor kind: protected dims ``k`` and feature dims ``d`` summed over its tensors, and their count."""
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for name, k in self.projector.dims().items():
            tensor = self.projector.tensors[name]
            totals[tensor.kind][0] += k
            totals[tensor.kind][1] += tensor.feature_dim
            totals[tensor.kind][2] += 1
        return {kind: tuple(values) for kind, values in sorted(totals.items())}

    def _log_task(self, index: int) -> None:
        results = self.continual_results()
        til = results["task_incremental"]
        extra = {f"{name}_acc": results[name]["acc"] for e in self.evaluators for name in e.matrices}
        figures = {name: value for name, value in self.task_metrics[index].items() if value is not None}
        self.log(
            {
                "task": index + 1,
                "continual_acc": results["acc"],
                "continual_forgetting": results["forgetting"],
                "continual_bwt": results["bwt"],
                "task_incremental_acc": til["acc"],
                "task_incremental_forgetting": til["forgetting"],
                **extra,
                **figures,
            }
        )
        if not self.is_world_process_zero():
            return
        logger.info(
            "after task %d/%d: %s ACC %.2f, Forgetting %.2f, BWT %.2f | task-incremental ACC %.2f | protected dims %s",
            index + 1,
            len(self.tasks),
            self.headline_matrix,
            results["acc"],
            results["forgetting"],
            results["bwt"],
            til["acc"],
            self._dims_summary(),
        )
        if extra or figures:
            logger.info(
                "after task %d: %s", index + 1, ", ".join(f"{k} {v:.2f}" for k, v in {**extra, **figures}.items())
            )

    # ---- checkpoints ---------------------------------------------------------------------------------------------

    def _save_task_checkpoint(self, index: int) -> None:
        """The main process writes ``task-<index + 1>``; every process waits for it, so any rank can resume."""
        if self.args.should_save:
            target = Path(self.args.output_dir) / task_dir_name(index + 1)
            self._write_task_checkpoint(target)
            if self.args.push_to_hub and self.is_world_process_zero():  # the process that created the repo
                push_task_checkpoint(
                    target, self.hub_model_id, f"task {index + 1}/{len(self.tasks)}", self.args.hub_token,
                    self.args.hub_revision,
                )  # fmt: skip
        self.accelerator.wait_for_everyone()

    def _write_task_checkpoint(self, target: Path) -> None:
        with atomic_directory(target) as staging:
            save_adapter(self.model, staging)
            save_subspaces(staging / SUBSPACES_NAME, self.projector.bases, self.adapter_name, self.args.threshold)
            if self.head_statistics is not None:
                save_head_statistics(staging / HEAD_NAME, self.head_statistics, self.args.head)
            state = self._checkpoint_state()
            write_state(staging, state)
            (staging / "README.md").write_text(model_card(state, self._base_model_name(), self._tuner_names()))

    def _base_model_name(self) -> str | None:
        """The base model's Hub id, or ``None`` for a local folder or a model built from a config."""
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        name = getattr(base.config, "_name_or_path", None)
        return name if name and not os.path.isdir(name) else None

    def _tuner_names(self) -> list[str]:
        """``["lora"]`` for PEFT LoRA, else the pegp_hf tuner types (``prompt``, ``prefix``, ``adapter``)."""
        return ["lora"] if is_peft_model(self.model) else sorted({c.pet_type for c in pet_configs(self.model)})

    def _checkpoint_state(self) -> dict[str, Any]:
        results = self.continual_results()
        return {
            "finished_tasks": self._finished(),
            "scenario": self.tasks.scenario,
            "label_column": self.tasks.label_column,
            "task_names": [task.name for task in self.tasks],
            "task_classes": self.tasks.task_classes,
            "results": results,
            "config": {
                key: getattr(self.args, key)
                for key in (
                    "method",
                    "head",
                    "threshold",
                    "feature_samples",
                    "protect",
                    "update_reprojection",
                    "loss_classes",
                    "seed",
                )
            },
            "versions": library_versions(),
        }

    def _resume(self, checkpoint: str | bool) -> int:
        """Load a task checkpoint; return how many tasks it finished. Every file is read and checked before any
        state of the trainer or the model changes."""
        if checkpoint is True:
            path = latest_task_checkpoint(self.args.output_dir)
        else:
            path = resolve_checkpoint(checkpoint, token=self.args.hub_token)
        if path is None:
            raise CheckpointError(
                f"resume_from_checkpoint=True but {self.args.output_dir} holds no task-<k> checkpoint"
            )
        state = read_state(path)
        done = int(state["finished_tasks"])
        finished_classes = state["task_classes"][:done]
        if state["scenario"] != self.tasks.scenario or finished_classes != self.tasks.task_classes[:done]:
            raise CheckpointError(
                f"{path} was made for a different task sequence: its {done} finished {state['scenario']} tasks have "
                f"classes {finished_classes}, this {self.tasks.scenario} sequence starts with "
                f"{self.tasks.task_classes[:done]}"
            )
        for key in ("method", "head"):
            if state["config"][key] != getattr(self.args, key):
                raise CheckpointError(
                    f"{path} was trained with {key}={state['config'][key]!r}, not {getattr(self.args, key)!r}"
                )
        missing = [name for name in self.accuracy if name not in state["results"]]
        if missing:
            raise CheckpointError(f"{path} has no {missing} matrices: it was made without the same evaluators")
        changed = {
            k: v for k, v in state["config"].items() if k not in ("method", "head") and getattr(self.args, k) != v
        }
        if changed:
            logger.warning("continuing %s with settings that differ from the checkpoint's %s", path, changed)
        if not is_peft_model(self.model):
            stored, current = (
                [c.to_dict() for c in read_pet_configs(path)],
                [c.to_dict() for c in pet_configs(self.model)],
            )
            if stored != current:
                raise CheckpointError(f"{path} holds tuners {stored}, the model has {current}")
        bases = None
        if self.args.method == "pegp":
            bases = load_subspaces(path / SUBSPACES_NAME, list(self.projector.tensors), self.adapter_name)
            self.projector.check_bases(bases)
        statistics = None
        if self.head_statistics is not None:
            statistics = load_head_statistics(path / HEAD_NAME, like=self.head_statistics)
        adapter = read_adapter_weights(self.model, path, self.adapter_name)

        load_adapter_weights(self.model, adapter, self.adapter_name)
        if bases is not None:
            self.projector.load_bases(bases)
        if statistics is not None:
            self.head_statistics = statistics
        for name in self.accuracy:
            stored = np.array(state["results"][name]["accuracy_matrix"], dtype=np.float64)
            self.accuracy[name][:done, :done] = stored[:done, :done]
        self.initial_metrics = dict(state["results"].get("initial_metrics", {}))
        self.task_metrics = list(state["results"].get("task_metrics", []))[:done]
        self.task_timings = list(state["results"]["timings"])[:done]
        self.task_updates = list(state["results"].get("updates", []))[:done]
        logger.info("resumed from %s after %d finished tasks", path, done)
        return done


def _restricted_accuracy(logits: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> float:
    """Percent of samples whose arg-max over the logits of ``classes`` is their label."""
    classes = np.asarray(sorted(classes))
    predicted = classes[np.argmax(logits[:, classes], axis=1)]
    return float(100.0 * np.mean(predicted == labels))


def _to_json_matrix(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def _find_module(model: torch.nn.Module, name: str, required: bool) -> torch.nn.Module | None:
    """The shallowest module whose dotted name is ``name`` or ends with ``.name`` (``None`` if absent and not
    ``required``)."""
    found = [
        (path.count("."), path, m) for path, m in model.named_modules() if path == name or path.endswith(f".{name}")
    ]
    if not found and not required:
        return None
    if not found:
        raise ValueError(f"the model has no module named {name!r} (set head_module to the classifier's name)")
    return min(found, key=lambda item: item[0])[2]


def _trainable_linear(head: torch.nn.Module) -> torch.nn.Linear:
    """The linear layer that computes the logits inside ``head`` (for PEFT, the ``modules_to_save`` copy)."""
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
    if len(linears) != 1:
        raise ValueError(f"the head must hold exactly one trainable nn.Linear (found {len(linears)})")
    return linears[0]
