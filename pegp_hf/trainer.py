"""``ContinualPEGPTrainer``: a ``transformers.Trainer`` that learns a task sequence with one shared PET adapter.

Per task ``t`` (Qiao et al., PEGP, arXiv 2405.13383; ``docs/method.md``):

1. **begin**: fresh optimizer and scheduler, the RNG seeded with ``seed + t``, then ``on_task_begin`` (the objective
   masks the classes outside the task, CLIP reveals the seen class names, ...);
2. **train**: ``Trainer.train`` on the task's data with the objective's loss. Every protected PET gradient is
   projected once per optimizer step, in ``training_step`` of the micro-batch where ``accelerator.sync_gradients``
   is True: after gradient accumulation and the all-reduce, before clipping (under DeepSpeed, which steps inside
   backward, by tensor hooks instead; see ``backends.py``). The update is re-projected after the step when the
   optimizer needs it;
3. **end**: ``feature_samples`` training samples run through the model (eval mode, no grad); the feature covariance
   of every protected tensor grows its basis by the GPM rule, and the objective takes what it needs from the same
   pass. Every evaluator fills its column of its matrices, ``on_task_end`` fires, and ``output_dir/task-<t>/`` is
   written atomically (``on_task_save``: the Hub push). ``train(resume_from_checkpoint=...)`` continues after it.

With a ``reference_dataset`` ("task 0": what the pre-trained model already does, e.g. general text), the bases of
the tensors it protects grow from its features before task 1 with ``reference_threshold``, and LoRA ``A`` / adapter
``W_down`` start in the null space of those features, so the adapter outputs next to nothing on them throughout.

Everything but the projection, the optimizer-step bracket and this loop is a collaborator: the PET handle
(``pegp_hf.tuners``), the objective and evaluators (``pegp_hf.continual``), checkpoints and the Hub (``pegp_hf.io``).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from accelerate.utils import reduce as reduce_across_processes
from datasets import Dataset
from transformers import Trainer, enable_full_determinism, set_seed
from transformers.trainer_utils import TrainOutput
from transformers.utils import ModelOutput

from pegp_hf.backends import check_frozen_after_first_task, grow_bases_on_every_rank, resolve_projection_mode
from pegp_hf.bracket import UpdateBracket
from pegp_hf.config import PEGPTrainingArguments
from pegp_hf.continual.callbacks import call_task_event
from pegp_hf.continual.classification import ClassificationObjective
from pegp_hf.continual.evaluators import ContinualEvaluator, merge_evaluations
from pegp_hf.continual.inference import feature_sample_loader, forward_batches
from pegp_hf.continual.objectives import BatchObserver, ContinualObjective, ModelLossObjective
from pegp_hf.continual.results import ContinualResults
from pegp_hf.continual.tasks import TaskSequence
from pegp_hf.core.capture import FeatureCovariances
from pegp_hf.core.finite import HINT, NonFiniteError, all_finite, check_figures, check_tensors
from pegp_hf.core.projector import GradientProjector
from pegp_hf.core.protected import ProtectedTensor
from pegp_hf.io.checkpoint import (
    CheckpointError,
    StoredTask,
    checkpoint_run_id,
    latest_task_checkpoint,
    read_task_checkpoint,
    remove_staging,
    restore_retired,
    task_checkpoints,
    task_dir_name,
    task_state,
    write_task_checkpoint,
)
from pegp_hf.io.hub import PushTaskToHubCallback, create_task_model_card, push_latest_task_to_hub, resolve_checkpoint
from pegp_hf.io.model_card import card_info, model_card
from pegp_hf.training_capture import TrainingFeatureCapture
from pegp_hf.tuners.handle import pet_handle

# the methods under which a PET's frozen_after_first_task() applies (first_session freezes the whole PET after task 1,
# head_only never trains it)
TRAIN_THE_PET_ON_EVERY_TASK = ("pegp", "sequential")

logger = logging.getLogger(__name__)

CONFIG_KEYS = (
    "method",
    "feature_capture",
    "update_check_steps",
    "threshold",
    "feature_samples",
    "protect",
    "update_reprojection",
    "seed",
    "reference_threshold",
)


class ContinualPEGPTrainer(Trainer):
    """Train one PET adapter through a :class:`~pegp_hf.continual.tasks.TaskSequence` with PEGP gradient projection.

    Args:
        model: a model carrying a PEFT adapter (``peft.PeftModel``: LoRA and IA3 are protected) or pegp_hf tuners
            (:func:`pegp_hf.tuners.inject_pet`). For the classification objective, a classifier whose head covers
            every label id (keep it trainable with ``modules_to_save``); for the model-loss objective, any model that
            returns a loss for batches with ``labels`` (e.g. ``AutoModelForCausalLM``).
        args: :class:`~pegp_hf.config.PEGPTrainingArguments`.
        tasks: the task sequence.
        objective: how tasks are trained and judged (:mod:`pegp_hf.continual.objectives`); default:
            :class:`~pegp_hf.continual.classification.ClassificationObjective` when the tasks own classes,
            :class:`~pegp_hf.continual.objectives.ModelLossObjective` (the model's own loss) when none does.
        evaluators: measurements after each task beyond the objective's
            (:class:`~pegp_hf.continual.evaluators.ContinualEvaluator`, e.g.
            :class:`~pegp_hf.multimodal.crossmodal.CrossModalEvaluator`).
        reference_dataset: ``method="pegp"`` only: rows in the tasks' training format (what the collator and the
            model take; labels are not used) whose outputs the adapter must leave as the pre-trained model gives
            them. Before the first task, ``reference_samples`` of them grow the bases of the tensors a reference
            protects (LoRA ``A``, adapter ``W_down``, IA3) with ``reference_threshold``, and LoRA ``A`` / ``W_down``
            are moved into the null space of those features (``docs/method.md``, "Reference protection"). A list
            of data sets is run one after the other, ``reference_samples`` rows each, into the same sums and one
            threshold: for inputs that cannot share a batch, such as a dual encoder's images and its captions
            (rows of model inputs, e.g. ``input_ids`` / ``attention_mask`` only). Each set must reach some
            protected tensor; where several reach one tensor, the set with more energy weighs more.
        **kwargs: any other ``Trainer`` argument (``data_collator``, ``processing_class``, ``callbacks`` with
            :class:`~pegp_hf.continual.callbacks.ContinualCallback` task events, ...), except ``train_dataset`` /
            ``eval_dataset`` (set per task), ``compute_loss_func`` (the objective's), ``model_init`` and
            ``optimizers`` (each task needs a fresh optimizer: use ``args.optim`` or ``optimizer_cls_and_kwargs``).

    Runs on one process and DDP; FSDP2 and DeepSpeed ZeRO-1/2 are experimental (see ``docs/distributed.md``).

    After :meth:`train`, :attr:`results` holds every matrix and figure and :meth:`continual_results` their JSON form.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: PEGPTrainingArguments,
        tasks: TaskSequence,
        objective: ContinualObjective | None = None,
        evaluators: Sequence[ContinualEvaluator] = (),
        reference_dataset: Dataset | Sequence[Dataset] | None = None,
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
        if not isinstance(tasks, TaskSequence):
            raise TypeError(
                f"tasks must be a TaskSequence, got {type(tasks).__name__}: build one with class_incremental_tasks, "
                "dataset_tasks, make_tasks ..., or TaskSequence(tuple(tasks), scenario=...)"
            )
        # Every check that needs no Trainer runs first: a refused model is left as it was.
        self.pet = pet_handle(model)
        self.tasks = tasks
        self.objective = _default_objective(tasks) if objective is None else objective
        self.objective.setup(model, args)
        head = {id(p) for p in self.objective.head_parameters()}
        if args.method in ("head_only", "first_session") and not head:
            raise ValueError(f"method={args.method!r} trains an objective's head, and {self.objective.config()} has "
                             "none")  # fmt: skip
        pattern = re.compile(args.protect)
        listed = [] if args.method == "head_only" else self.pet.protected_tensors(strict=args.method == "pegp")
        protected = [tensor for tensor in listed if pattern.search(tensor.name)]
        if args.method == "pegp" and not protected:
            found = ", ".join(tensor.name for tensor in listed[:3]) or "none: is the adapter frozen?"
            raise ValueError(
                f"no trainable PET tensor of the {'/'.join(self.pet.methods)} adapter matches protect={args.protect!r},"
                f" so nothing would be protected; its protectable tensors are {found}. Widen protect (default '.*')"
            )
        self.reference_datasets = _reference_datasets(reference_dataset)
        if self.reference_datasets:
            _check_reference(self.reference_datasets, args.method, protected, self.pet.methods)
        self.evaluators = [*self.objective.evaluators(), *evaluators]
        specs = [spec for evaluator in self.evaluators for spec in evaluator.matrix_specs()]
        self.results = ContinualResults.empty(tasks.scenario, self.objective.headline(tasks), specs, len(tasks))
        super().__init__(model=model, args=args, compute_loss_func=self.objective.compute_loss, **kwargs)
        # as Trainer sets transformers' verbosity: --log_level / --log_level_replica, or transformers' own when passive
        # (a level the user set on pegp_hf's logger is kept then)
        package_logger = logging.getLogger("pegp_hf")
        if args.log_level != "passive" or package_logger.level == logging.NOTSET:
            package_logger.setLevel(args.get_process_log_level())
        self.projector = GradientProjector(protected)  # bases on the parameters' devices, where the Trainer put them
        self.projection_mode = resolve_projection_mode(self, self.projector)
        if args.method in TRAIN_THE_PET_ON_EVERY_TASK:
            check_frozen_after_first_task(self, self.pet.frozen_after_first_task())
        # The model changes from here on.
        self._head = head
        if args.method == "head_only":
            self._train_only_head()
        if self.projection_mode == "hooks":  # before accelerator.prepare, which happens in Trainer.train
            for name, tensor in self.projector.tensors.items():
                tensor.parameter.register_hook(functools.partial(self.projector.project_gradient, name))
        self._finite_losses: torch.Tensor | None = None  # the losses' finiteness since the last optimizer step
        self._task_index = 0
        self._steps_before_task = 0  # optimizer steps of the finished tasks: the logs' step axis runs on from there
        self._training_capture: TrainingFeatureCapture | None = None
        if args.method == "pegp" and args.feature_capture == "training":
            per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            self._training_capture = TrainingFeatureCapture(
                lambda: self._capturing(self.projector.tensors.values()),
                args.feature_samples,
                per_step,
                self.projector.tensors,
            )
            self.add_callback(self._training_capture)
        self._bracket = UpdateBracket(lambda: self.projector, args.update_reprojection,
                                      skipped=lambda: self.is_deepspeed_enabled,
                                      check_every=args.update_check_steps)  # fmt: skip
        self.add_callback(self._bracket)
        self.add_callback(self.objective)
        if args.push_to_hub:
            self.add_callback(PushTaskToHubCallback(self.hub_model_id, args.hub_token, args.hub_revision))
        exempt = head | {id(p) for p in self.pet.frozen_after_first_task()}  # (trained on the first task only)
        unprotected = [n for n, p in self.model.named_parameters()
                       if p.requires_grad and n not in self.projector.tensors and id(p) not in exempt]  # fmt: skip
        if unprotected and args.method == "pegp":
            logger.warning("trainable but not protected, so old tasks' outputs can drift through them: %s",
                           ", ".join(unprotected))  # fmt: skip

    def _train_only_head(self) -> None:
        """Freeze every parameter but the objective's head (``head_only`` from the start, ``first_session`` from
        task 2 on); the head's own flags are kept."""
        for parameter in self.model.parameters():
            parameter.requires_grad_(id(parameter) in self._head and parameter.requires_grad)

    # ---- the per-step projection ----------------------------------------------------------------------------------

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """``Trainer.training_step``, then, on the micro-batch that ends an accumulation window, the projection of
        every protected gradient against the old-task bases (before the Trainer clips and steps)."""
        if self._training_capture is not None:
            self._training_capture.select_tokens(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss.detach()).all()
        self._finite_losses = finite if self._finite_losses is None else self._finite_losses & finite
        if self.accelerator.sync_gradients:
            self._check_finite_step()
            if self.projection_mode == "training_step" and self.projector.active:
                self.projector.project_gradients()
        return loss

    def _check_finite_step(self) -> None:
        """Stop at the first optimizer step whose losses or gradients hold a NaN / inf on any process (the flag is
        summed over processes, so every rank stops at the same step). Under an fp16 grad scaler, inf gradients are
        the scaler's business (it skips the step): only the losses are checked. One host sync per optimizer step,
        as ``logging_nan_inf_filter`` already makes."""
        losses, self._finite_losses = self._finite_losses, None
        gradients = {}
        if self.accelerator.scaler is None:
            gradients = {n: p.grad for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None}
        local = losses & all_finite(gradients.values())
        processes = self.accelerator.num_processes
        agreed = local if processes == 1 else reduce_across_processes(local.float(), "sum") == processes
        if bool(agreed):  # every process stops together: one alone would leave the others waiting in a collective
            return
        where = f"{self._where()}, optimizer step {self.state.global_step + 1}"
        if not bool(losses):
            raise NonFiniteError(f"{where}: the training loss is not finite; {HINT}")
        check_tensors(gradients, "the gradients", where)
        raise NonFiniteError(f"{where}: the loss or gradients of another process are not finite; {HINT}")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log`` on one step axis for the whole sequence (each task's optimizer steps follow those of the
        tasks before it, in ``log_history`` and every ``report_to`` tracker), with ``pegp_update_overlap`` = max
        ``|delta W U|`` over the steps since the last training log (~0 when old outputs are protected) and
        ``pegp_update_max`` = max ``|delta W|`` for scale."""
        record = self._bracket.take_log_record() if "loss" in logs else None
        if record is not None:
            logs["pegp_update_overlap"], logs["pegp_update_max"] = record
        offset = self._steps_before_task  # Trainer.train counts from 0 in every task
        self.state.global_step += offset
        try:
            super().log(logs, start_time)
        finally:
            self.state.global_step -= offset

    # ---- the task loop --------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> TrainOutput:
        """Train every task of the sequence in order.

        Args:
            resume_from_checkpoint: ``True`` for the newest ``output_dir/task-<k>``, the path of one, or a Hub repo id
                pushed by a run with ``push_to_hub``; training continues at task ``k + 1`` with the stored adapter,
                bases, objective state and results.
            **kwargs: passed to ``Trainer.train`` for each task (``trial``, ``ignore_keys_for_eval``).

        Returns:
            ``TrainOutput`` whose metrics hold the headline matrix's ``average`` after the last task, ``forgetting``
            and ``bwt`` (and ``acc`` = ``average`` for an accuracy headline).
        """
        if self.results.finished_tasks:
            raise RuntimeError(
                f"this trainer has already trained {self.results.finished_tasks} tasks; make a new "
                "ContinualPEGPTrainer (and pass resume_from_checkpoint to continue a sequence)"
            )
        self.objective.validate(self.tasks)
        if self.tasks.scenario == "online" and (self.args.num_train_epochs != 1 or self.args.max_steps > 0):
            raise ValueError("the online scenario makes a single pass over each task: set num_train_epochs=1")
        if self.args.should_save:
            for name in restore_retired(self.args.output_dir):
                logger.warning("put %s back in %s after an interrupted checkpoint write", name, self.args.output_dir)
        self.accelerator.wait_for_everyone()
        stored = self._read_resumed(resume_from_checkpoint) if resume_from_checkpoint else None
        self._claim_output_dir(stored)  # refuses before anything else in output_dir changes
        if self.args.should_save:
            for name in remove_staging(self.args.output_dir):
                logger.warning("removed %s, left in %s by an interrupted checkpoint write", name, self.args.output_dir)
        self.accelerator.wait_for_everyone()
        run_id = uuid.uuid4().hex if stored is None or stored.run_id is None else stored.run_id
        self.run_id = broadcast_object_list([run_id])[0] if self.accelerator.num_processes > 1 else run_id
        first = 0
        if stored is not None:
            stored.load_into(self.pet, self.projector, self.objective)
            self.results, first = stored.results, stored.finished_tasks
        if first == 0:
            reference = self._protect_reference() if self.reference_datasets else {}
            measured = {k: v for e in self.evaluators for k, v in e.before_sequence(self).items()}
            self.results.initial_metrics = {**reference, **measured}
        steps, losses = 0, []
        for index in range(first, len(self.tasks)):
            self._begin_task(index)
            start = time.perf_counter()
            with self.objective.training_view():
                try:
                    output = super().train(**kwargs)
                finally:
                    if self._training_capture is not None:
                        self._training_capture.close()
                trained = time.perf_counter()
                trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
                check_tensors(trainable, "the weights after training", self._where())
                self._feature_pass(index)
            self._end_task(index, trained - start, time.perf_counter() - trained, output.global_step)
            steps += output.global_step
            losses.append(output.training_loss)
        metrics = {key: value for key, value in self.results.headline_figures().items() if key != "accuracy_matrix"}
        return TrainOutput(steps, float(np.mean(losses)) if losses else math.nan, metrics)

    def _task_event(self, event: str, index: int, **kwargs: Any) -> None:
        self.control = call_task_event(self.callback_handler, event, self.args, self.state, self.control,
                                       tasks=self.tasks, task_index=index, **kwargs)  # fmt: skip

    def _where(self) -> str:
        return f"task {self._task_index + 1}/{len(self.tasks)} ({self.tasks[self._task_index].name})"

    def _begin_task(self, index: int) -> None:
        task = self.tasks[index]
        self._task_index, self._finite_losses = index, None
        self._steps_before_task = sum(timing.get("optimizer_steps", 0) for timing in self.results.timings)
        self.train_dataset, self.eval_dataset = task.train, task.test
        self.optimizer = self.lr_scheduler = None
        if self.is_deepspeed_enabled:  # Trainer.train destroys the last engine; Accelerate builds one per task
            self.model_wrapped, self.deepspeed = self.model, None
        self._bracket.new_task()
        if index > 0 and self.args.method in TRAIN_THE_PET_ON_EVERY_TASK:  # the PET's own rule
            for parameter in self.pet.frozen_after_first_task():
                parameter.requires_grad_(False)
        if index > 0 and self.args.method == "first_session":
            self._train_only_head()
        self.objective.before_task(self, index)  # before seeding: what it draws from the RNG changes no training
        # Seed per task: a resumed run enters task k with the same RNG state as an uninterrupted one.
        seed = self.args.seed + index
        enable_full_determinism(seed) if self.args.full_determinism else set_seed(seed)
        logger.info("task %d/%d (%s): %d train samples, classes %s", index + 1, len(self.tasks), task.name,
                    len(task.train), list(task.classes))  # fmt: skip
        self._task_event("on_task_begin", index)

    def _end_task(self, index: int, train_seconds: float, capture_seconds: float, optimizer_steps: int) -> None:
        # None while no basis exists (the first task): there is nothing to be orthogonal to
        record = self._bracket.over_task
        overlap, largest = record.tolist() if record is not None else (None, None)
        captured = time.perf_counter()
        columns, scalars = merge_evaluations(self.evaluators, [e.after_task(self, index) for e in self.evaluators])
        check_figures({**columns, **scalars}, self._where())
        evaluated = time.perf_counter()
        self.results.record_task(
            index,
            columns=columns,
            scalars=scalars,
            timing={"train_seconds": train_seconds, "capture_seconds": capture_seconds,
                    "eval_seconds": evaluated - captured, "optimizer_steps": optimizer_steps},
            update={"max_update_overlap": overlap, "max_update": largest},
        )  # fmt: skip
        self._log_task(index)
        self._task_event("on_task_end", index, results=self.results)
        target = Path(self.args.output_dir) / task_dir_name(index + 1)
        # FSDP2 ranks hold shards: every rank takes part in gathering the whole weights for the main process
        gathered = self.accelerator.get_state_dict(self.model) if self.is_fsdp_enabled else None
        if self.args.should_save:  # the main process writes; every process waits for it, so any rank can resume
            state = task_state(self.tasks, self.results.finished_tasks, self.continual_results(), self._config(),
                               self.run_id)  # fmt: skip
            card = functools.partial(model_card, state, self.results, card_info(self))
            write_task_checkpoint(target, self.pet, self.projector, self.objective, state, card, gathered)
        self.accelerator.wait_for_everyone()
        self._task_event("on_task_save", index, checkpoint_dir=target)

    def _feature_pass(self, index: int) -> None:
        """One eval pass over ``feature_samples`` training samples of the finished task, split across processes:
        the protected tensors' ``x x^T`` over the batch's real tokens (its ``attention_mask``, at most
        ``feature_tokens_per_sequence`` each) grow the PEGP bases, and the objective observes the same batches.
        With ``feature_capture="training"`` the bases grow from the sums of the task's last training steps instead,
        and the pass runs only if the objective observes (a statistics head). Skipped when neither needs it."""
        pegp = self.args.method == "pegp"
        in_pass = pegp and self._training_capture is None  # else the sums come from the last training steps
        tensors = self.projector.tensors.values() if in_pass else []
        with self._capturing(tensors) as capture, self.objective.observing() as observe:
            if in_pass or observe is not None:
                self._capture(capture, self.tasks[index].train, self.args.feature_samples, observe)
        if pegp:
            covariances = capture.covariances if in_pass else self._training_capture.covariances
            if covariances is None:
                raise RuntimeError(f"{self._where()}: feature_capture='training' saw no training step to capture")
            grow_bases_on_every_rank(self.projector, covariances, self.args.threshold, self._where())
        self.objective.after_feature_pass(self, index)

    def _capturing(self, tensors: Iterable[ProtectedTensor]) -> FeatureCovariances:
        return FeatureCovariances(tensors, self.args.feature_tokens_per_sequence, self.args.covariances_on_cpu)

    def _capture(
        self, capture: FeatureCovariances, dataset: Dataset, samples: int, observe: BatchObserver | None = None
    ) -> None:
        """Run ``samples`` rows of ``dataset`` (this process's share) through the model, ``capture`` counting the
        real tokens of each batch and ``observe`` (the objective's) seeing every batch."""
        loader = feature_sample_loader(self, dataset, samples, self.args.seed)
        select = lambda inputs: capture.select_tokens(inputs.get("attention_mask"))  # noqa: E731
        for inputs, outputs in forward_batches(self, loader, self.objective.model_takes_labels, select):
            if observe is not None:
                observe(inputs, outputs)

    def _protect_reference(self) -> dict[str, float]:
        """Task 0: grow the reference tensors' bases from ``reference_samples`` rows of each reference set with
        ``reference_threshold``, then move the ``"null"`` ones into the null space of those features. That changes
        no output while the branch's other factor is zero (a fresh LoRA's ``B``, an adapter's ``up``): checked on
        the first batch of each reference set, and refused (weights and bases put back) otherwise. Returns figures
        for ``initial_metrics``: the rows used and the protected share of each tensor kind."""
        tensors = self.projector.reference_tensors()
        samples = self.args.reference_samples or self.args.feature_samples
        probes: list[tuple[dict[str, Any], torch.Tensor]] = []
        with self.objective.training_view(), self._capturing(tensors) as capture:
            for index, dataset in enumerate(self.reference_datasets):  # one sum per tensor over every set
                before = capture.passes.total()
                self._capture(capture, dataset, samples, functools.partial(_keep_first, probes, index))
                if capture.passes.total() == before:
                    which = _reference_name(index, len(self.reference_datasets), "the reference set")
                    raise ValueError(
                        f"{which} reached none of the tensors it would protect: its rows must be model inputs that "
                        "run through the adapted layers (e.g. pixel_values for the vision tower)"
                    )
        tensors = self._reached_by_reference(tensors, capture.covariances)
        bases, nulled = dict(self.projector.bases), [t for t in tensors if t.reference == "null"]
        weights = {t.name: t.parameter.detach().clone() for t in nulled}
        grow_bases_on_every_rank(self.projector, capture.covariances, self.args.reference_threshold,
                                 "the reference set", [t.name for t in tensors], reference=True)  # fmt: skip
        self.projector.null_reference_weights()
        with self.objective.training_view():
            outputs = forward_batches(self, [inputs for inputs, _ in probes], self.objective.model_takes_labels)
            changed = [not torch.allclose(_main_output(now), before, rtol=1e-5, atol=1e-6)
                       for (_, now), (_, before) in zip(outputs, probes, strict=True)]  # fmt: skip
        if any(changed):
            with torch.no_grad():
                for tensor in nulled:
                    tensor.parameter.copy_(weights[tensor.name])
            self.projector.bases, self.projector.reference_dims = bases, {}
            raise ValueError(
                "the adapter's output is not zero at the start (LoRA B or adapter up is not zero: a trained adapter, "
                "or init_lora_weights other than the default), so starting LoRA A / adapter down in the null space of "
                "the reference would change the model: start from a fresh adapter, or leave reference_dataset out"
            )
        full = [t.name for t in nulled if self.projector.bases[t.name].shape[1] == t.feature_dim]
        if full:
            logger.warning("the reference set fills the whole input space of %s: they are now zero and their branch "
                           "cannot learn; lower reference_threshold", ", ".join(full))  # fmt: skip
        kinds = {tensor.kind for tensor in tensors}
        shares = {f"reference_protected_share/{kind}": k / d
                  for kind, (k, d, _) in self.projector.dims_by_kind().items() if kind in kinds}  # fmt: skip
        logger.info("reference set: %s", self.projector.describe())
        processes = self.accelerator.num_processes
        rows = sum(min(samples, len(dataset)) // processes * processes for dataset in self.reference_datasets)
        return {"reference_rows": float(rows), **shares}

    @staticmethod
    def _reached_by_reference(
        tensors: list[ProtectedTensor], covariances: Mapping[str, torch.Tensor]
    ) -> list[ProtectedTensor]:
        """The tensors the reference pass reached. Others (a dual encoder's text tower under a reference of images)
        are left unprotected by it, with a warning."""
        reached = [tensor for tensor in tensors if tensor.name in covariances]
        if len(reached) < len(tensors):
            missed = [tensor.name for tensor in tensors if tensor.name not in covariances]
            logger.warning("the reference set does not reach %d tensors (e.g. %s): they are protected by the tasks "
                           "only", len(missed), missed[0])  # fmt: skip
        return reached

    def _log_task(self, index: int) -> None:
        self.log(self.results.task_log(index))
        if self.is_world_process_zero():
            dims = self.projector.describe() if self.args.method == "pegp" else f"none ({self.args.method})"
            logger.info("after task %d/%d: %s | protected dims %s", index + 1, len(self.tasks),
                        self.results.describe(index), dims)  # fmt: skip

    # ---- results and checkpoints ----------------------------------------------------------------------------------

    def continual_results(self) -> dict[str, Any]:
        """The JSON form of :attr:`results` (:meth:`~pegp_hf.continual.results.ContinualResults.to_dict`: a block per
        matrix, the headline's ``accuracy_matrix`` / ``acc`` / ``forgetting`` / ``bwt``, figures, timings and
        updates), the objective's settings, and the bases: ``subspace_dims`` (``k`` per tensor), ``saturated``
        (tensors whose basis is full) and ``protected_share`` (protected over feature dims per tensor kind)."""
        return {
            **self.results.to_dict(),
            **self.objective.config(),
            "subspace_dims": self.projector.dims(),
            "saturated": self.projector.saturated(),
            "protected_share": {kind: k / d for kind, (k, d, _) in self.projector.dims_by_kind().items()},
        }

    def create_model_card(
        self, language: str | None = None, license: str | None = None, tags: str | list[str] | None = None,
        model_name: str | None = None, finetuned_from: str | None = None, tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:  # fmt: skip
        """The card of the newest ``task-<k>`` with these metadata, written to it and to ``output_dir/README.md``
        (:func:`~pegp_hf.io.hub.create_task_model_card`), instead of the Trainer's generic card."""
        create_task_model_card(self, language=language, license=license, tags=tags, model_name=model_name,
                               finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
                               dataset_args=dataset_args)  # fmt: skip

    def push_to_hub(
        self, commit_message: str | None = "End of training", blocking: bool = True, token: str | None = None,
        revision: str | None = None, private: bool | None = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """Upload the newest ``task-<k>`` folder with its card (``kwargs`` go to :meth:`create_model_card`), not the
        whole ``output_dir`` (:func:`~pegp_hf.io.hub.push_latest_task_to_hub`)."""
        return push_latest_task_to_hub(self, commit_message, blocking, token, revision, private, **kwargs)

    def _config(self) -> dict[str, Any]:
        """The settings a checkpoint records; ``method`` and the objective's ``must_match`` ones must match on
        resume."""
        return {**{key: getattr(self.args, key) for key in CONFIG_KEYS}, **self.objective.config()}

    def _read_resumed(self, checkpoint: str | bool) -> StoredTask:
        """Read and check a task checkpoint to continue from; nothing of the trainer or the model changes yet."""
        if checkpoint is True:
            path = latest_task_checkpoint(self.args.output_dir)
        else:
            path = resolve_checkpoint(checkpoint, token=self.args.hub_token, revision=self.args.hub_revision)
        if path is None:
            raise CheckpointError(
                f"resume_from_checkpoint=True but {self.args.output_dir} holds no task-<k> checkpoint"
            )
        strict = ("method", *self.objective.must_match)
        stored = read_task_checkpoint(path, self.tasks, self._config(), strict, self.pet, self.projector,
                                      self.objective, self.results)  # fmt: skip
        logger.info("resuming from %s after %d finished tasks", path, stored.finished_tasks)
        return stored

    def _claim_output_dir(self, stored: StoredTask | None) -> None:
        """Refuse an ``output_dir`` holding ``task-<k>`` folders of another run (any, for a fresh run; those whose
        ``run_id`` is not the resumed one's, for a resume): the runs' checkpoints would mix, and a later
        ``resume_from_checkpoint=True`` would pick the newest of either. ``overwrite_output_dir`` removes them."""
        folders = task_checkpoints(self.args.output_dir)
        # a folder without run_id was written before run ids existed: it belongs to the run resumed from it
        foreign = (
            folders if stored is None else [p for p in folders if checkpoint_run_id(p) not in (None, stored.run_id)]
        )
        self.accelerator.wait_for_everyone()  # every rank has looked before the main process removes anything
        if not foreign:
            return
        names = [path.name for path in foreign]
        if not self.args.overwrite_output_dir:
            whose = "an earlier run" if stored is None else "another run than the one resumed"
            raise CheckpointError(
                f"{self.args.output_dir} holds {names} of {whose}; this run's checkpoints would mix with them. "
                "Continue that run with train(resume_from_checkpoint=True), choose another output_dir, or set "
                "overwrite_output_dir=True to remove them"
            )
        if self.args.should_save:
            logger.warning("overwrite_output_dir: removing %s from %s", names, self.args.output_dir)
            for path in foreign:
                shutil.rmtree(path)
        self.accelerator.wait_for_everyone()


def _main_output(outputs: Any) -> torch.Tensor:
    """The model output a check compares: ``logits`` where there are any, else every tensor output flattened and
    joined (a dual encoder's image and text embeddings), else the first output."""
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, ModelOutput):
        logits = torch.cat([value.flatten() for value in outputs.to_tuple() if isinstance(value, torch.Tensor)])
    return (logits if logits is not None else outputs[0]).detach().float().clone()


def _keep_first(probes: list[tuple[dict[str, Any], torch.Tensor]], index: int, inputs: dict, outputs: Any) -> None:
    """Keep the inputs and main output of reference set ``index``'s first batch as ``probes[index]``."""
    if len(probes) == index:
        probes.append((inputs, _main_output(outputs)))


def _reference_name(index: int, count: int, single: str) -> str:
    """How errors name reference set ``index`` of ``count``: ``single`` when it is the only one."""
    return single if count == 1 else f"reference_dataset[{index}]"


def _reference_datasets(reference: Dataset | Sequence[Dataset] | None) -> tuple[Dataset, ...]:
    """``reference_dataset`` as a tuple of data sets (empty for ``None``); a list or tuple is several sets."""
    if reference is None:
        return ()
    if isinstance(reference, (list, tuple)):
        if not reference:
            raise ValueError("reference_dataset is an empty list: pass None for no reference set")
        return tuple(reference)
    return (reference,)


def _check_reference(
    references: Sequence[Dataset], method: str, protected: Sequence[ProtectedTensor], pet_methods: Sequence[str]
) -> None:
    """Refuse reference sets that would protect nothing: another method than pegp, a set with no rows, or a PET
    none of whose protected tensors a reference can protect (prompts and prefixes act on every token's attention)."""
    if method != "pegp":
        raise ValueError(f"reference_dataset protects the pre-trained model's outputs with pegp; method is {method!r}")
    empty = [index for index, reference in enumerate(references) if len(reference) == 0]
    if empty:
        which = _reference_name(empty[0], len(references), "reference_dataset")
        raise ValueError(f"{which} is empty: it needs rows of the tasks' training format")
    if not any(tensor.reference is not None for tensor in protected):
        raise ValueError(
            f"a reference set protects LoRA A, bottleneck adapters (activation with act(0) = 0) and IA3; the "
            f"{'/'.join(pet_methods)} adapter has none of these among its protected tensors: leave reference_dataset "
            "out, or use one of those PETs"
        )


def _default_objective(tasks: TaskSequence) -> ContinualObjective:
    return ClassificationObjective() if any(task.classes for task in tasks) else ModelLossObjective()
