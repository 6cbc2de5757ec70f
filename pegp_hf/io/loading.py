"""Load a continual adapter for inference in one call: :meth:`ContinualModel.from_pretrained`.

A task checkpoint (``output_dir/task-<k>/``, or the Hub repo a run pushed to) holds the adapter, the head statistics
and the run's state, but not the base model. :meth:`ContinualModel.from_pretrained` takes the base model (an
instance built as for training, or a Hub id / local folder), attaches the adapter with the library that wrote it
(PEFT's ``PeftModel.from_pretrained`` or pegp_hf's :func:`~pegp_hf.tuners.load_pet_pretrained`; head,
``modules_to_save`` and CLIP projections included), and rebuilds the head the run was judged with: a
:class:`~pegp_hf.continual.classification.ClassificationObjective` set up with the stored ``head`` and loaded with
``pegp_head.safetensors``. Its logits are the ones the run's accuracy matrices were computed from:

- ``masked_linear`` and ``aligned``: the model's own logits (the aligned head's re-fit rows are in the adapter);
- ``prototype``: cosine similarity of the head inputs to the seen classes' means;
- ``ranpac``: the ridge scores on the random projection of the head inputs.

Classes of tasks not finished at the checkpoint score the lowest logit in the statistics heads; :meth:`predict`
takes the arg-max over the seen classes (class-incremental), or over the classes given (e.g. one task's).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from huggingface_hub.repocard import metadata_load
from peft.utils import CONFIG_NAME
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator
from transformers.utils import ModelOutput

from pegp_hf.continual.classification import HEAD_NAME, ClassificationObjective
from pegp_hf.continual.results import ContinualResults, MatrixSpec
from pegp_hf.io.checkpoint import STATE_NAME, latest_task_checkpoint, read_state, task_dir_name
from pegp_hf.io.hub import resolve_checkpoint
from pegp_hf.tuners.handle import pet_handle
from pegp_hf.tuners.model import load_pet_pretrained
from pegp_hf.utils import CheckpointError

__all__ = ["ContinualModel", "ContinualModelOutput", "resolve_task_checkpoint"]

LABEL_KEYS = ("labels", "label", "label_ids")  # the objective scores the logits; the model never gets labels
STATISTICS_SCORED = ("prototype", "ranpac")  # heads whose scores are not the model's logits


@dataclass
class ContinualModelOutput(ModelOutput):
    """``logits`` ``(B, num_labels)`` as the checkpoint's head scores them; ``features`` ``(B, dim)`` the head
    module's inputs (``None`` when the model has no head module)."""

    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None


def resolve_task_checkpoint(
    checkpoint: str | os.PathLike, task: int | None = None, token: str | None = None, revision: str | None = None
) -> Path:
    """The task folder ``checkpoint`` names: a ``task-<k>`` folder as it is, an ``output_dir``'s newest ``task-<k>``
    (or ``task-<task>``), or a Hub repo id downloaded at ``revision``.

    Raises:
        CheckpointError: the folder is not a pegp_hf task checkpoint and holds none.
    """
    root = resolve_checkpoint(checkpoint, token=token, revision=revision)
    if task is not None:
        folder = root / task_dir_name(task)
        if not (folder / STATE_NAME).is_file():
            raise CheckpointError(f"{root} holds no task checkpoint {folder.name} (with a {STATE_NAME})")
        return folder
    if (root / STATE_NAME).is_file():
        return root
    latest = latest_task_checkpoint(root)
    if latest is None:
        raise CheckpointError(
            f"{root} is not a pegp_hf task checkpoint: it holds no {STATE_NAME} and no task-<k> folder with one; "
            "pass a ContinualPEGPTrainer output_dir, one of its task-<k> folders, or the Hub repo a run pushed to"
        )
    return latest


class ContinualModel(nn.Module):
    """A model with its continual adapter and head, for inference (see the module docstring).

    Build it with :meth:`from_pretrained`. ``forward(**inputs)`` returns :class:`ContinualModelOutput` for a
    classification run, the model's own outputs otherwise.

    Attributes:
        model: the base model with the adapter attached (a ``PeftModel``, or the base model with pegp_hf tuners).
        state: the checkpoint's ``pegp_state.json``.
        objective: the classification objective holding the head, or ``None`` for another objective.
        checkpoint: the task folder it was loaded from.
    """

    def __init__(
        self,
        model: nn.Module,
        state: Mapping[str, Any],
        objective: ClassificationObjective | None = None,
        checkpoint: Path | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.state = dict(state)
        self.objective = objective
        self.checkpoint = checkpoint
        self.results = _stored_results(self.state, checkpoint)

    # ---- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike,
        base_model: nn.Module | str | None = None,
        *,
        task: int | None = None,
        head_module: str = "classifier",
        auto_class: type | str | None = None,
        token: str | None = None,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> ContinualModel:
        """Load a task checkpoint onto its base model, in eval mode with every weight frozen.

        Args:
            checkpoint: a ``task-<k>`` folder, a ``ContinualPEGPTrainer`` ``output_dir`` (its newest ``task-<k>``,
                or ``task-<task>``), or a Hub repo id (downloaded at ``revision`` with ``token``).
            base_model: the model the adapter was trained on, without the adapter, built as for training (same
                class, weights and ``num_labels``; a CLIP ``CLIPForClassNameClassification`` with its class names
                and templates); or its Hub id / local folder, loaded with ``auto_class``; ``None``: the
                ``base_model_name_or_path`` the adapter config records.
            head_module: the name (last component) of the classifier module whose inputs the head statistics
                describe, as ``PEGPTrainingArguments.head_module`` was in training.
            auto_class: the ``transformers`` class that loads a base model given by name (a class, or its name);
                default: from the model card's ``pipeline_tag``, else the ``architectures`` of the base's config.
            **model_kwargs: passed to ``auto_class.from_pretrained`` (``torch_dtype``, ...); for a classifier,
                ``num_labels`` defaults to the checkpoint's class count.

        Raises:
            CheckpointError: the folder is not a pegp_hf task checkpoint, or one of its files is missing or broken.
            ValueError: the base model is not given and not recorded, or does not fit the adapter or the head.
        """
        folder = resolve_task_checkpoint(checkpoint, task, token, revision)
        state = read_state(folder)
        classification = state["config"].get("objective") == "classification"
        if isinstance(base_model, nn.Module):
            if model_kwargs:
                raise TypeError(f"{sorted(model_kwargs)} load a base model by name; base_model is already a model")
            model = base_model
        else:
            model = _load_base_model(folder, state, base_model, auto_class, model_kwargs)
        model = _attach_adapter(model, folder)
        objective = None
        if classification:
            objective = _classification_objective(model, folder, state, head_module)
            for module in model.modules():  # a CLIP class-name classifier encodes only the classes it knows
                if callable(getattr(module, "reveal_classes", None)):
                    module.reveal_classes(_seen_classes(state))
        model.requires_grad_(False)
        return cls(model, state, objective, folder).eval()

    # ---- what the checkpoint records ------------------------------------------------------------------------------

    @property
    def config(self) -> Any:
        """The base model's ``transformers`` config (``id2label``, ``num_labels``, ...)."""
        return getattr(self.model, "config", None)

    @property
    def training_config(self) -> dict[str, Any]:
        """The run's stored settings: ``method``, ``threshold``, ..., ``objective``, ``head``, ``loss_classes``."""
        return dict(self.state["config"])

    @property
    def head(self) -> str | None:
        """The class-incremental head the logits come from (``None`` for an objective without classes)."""
        return None if self.objective is None else self.objective.args.head

    @property
    def finished_tasks(self) -> int:
        return int(self.state["finished_tasks"])

    @property
    def task_names(self) -> list[str]:
        """Names of the finished tasks."""
        return list(self.state.get("task_names", []))[: self.finished_tasks]

    @property
    def task_classes(self) -> list[list[int]]:
        """Label ids of each finished task."""
        return [list(classes) for classes in self.state["task_classes"][: self.finished_tasks]]

    @property
    def seen_classes(self) -> list[int]:
        """Every label id of the finished tasks, sorted."""
        return _seen_classes(self.state)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- inference ------------------------------------------------------------------------------------------------

    def forward(self, **inputs: Any) -> ContinualModelOutput | Any:
        """The model on ``inputs`` (``pixel_values``, ``input_ids``, ...; labels are dropped for a classifier), with
        the logits of the checkpoint's head."""
        if self.objective is None:
            return self.model(**inputs)
        inputs = {key: value for key, value in inputs.items() if key not in LABEL_KEYS}
        captured: list[torch.Tensor] = []
        head = self.objective.head_module
        hook = None if head is None else head.register_forward_hook(lambda m, args, out: captured.append(args[0]))
        try:
            outputs = self.model(**inputs)
        finally:
            if hook is not None:
                hook.remove()
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        features = captured[-1] if captured else None
        if self.head in STATISTICS_SCORED:
            logits = self.objective.head_logits(features).to(logits.device)
        return ContinualModelOutput(logits=logits, features=features)

    @torch.no_grad()
    def predict(
        self,
        data: Mapping[str, Any] | Iterable[Mapping[str, Any]],
        batch_size: int = 64,
        classes: Iterable[int] | None = None,
        collate_fn: Any = None,
    ) -> torch.Tensor:
        """Predicted label ids ``(N,)`` (CPU): the arg-max of the head's logits over ``classes`` (default: the seen
        classes, the class-incremental prediction; pass a task's classes for the task-incremental one).

        Args:
            data: one batch (a mapping of tensors), or rows (a ``datasets.Dataset`` in torch format, a list of
                dicts) batched with ``collate_fn`` (default ``transformers.default_data_collator``). Columns the
                model's ``forward`` does not take (labels, captions, ...) are left out.
        """
        if self.objective is None:
            raise ValueError(f"predict returns label ids of a classifier; this checkpoint's objective is "
                             f"{self.state['config'].get('objective')!r}: call the model instead")  # fmt: skip
        allowed = torch.tensor(sorted(set(self.seen_classes if classes is None else classes)), dtype=torch.long)
        if len(allowed) == 0 or int(allowed.max()) >= self.objective.num_labels or int(allowed.min()) < 0:
            raise ValueError(f"classes must be label ids in [0, {self.objective.num_labels}), got {allowed.tolist()}")
        self.eval()
        predicted = []
        for batch in _batches(data, batch_size, collate_fn):
            logits = self(**self._model_inputs(batch)).logits
            predicted.append(allowed[logits[:, allowed.to(logits.device)].argmax(1).cpu()])
        return torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.long)

    def _model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``batch`` that the base model's ``forward`` takes, on the model's device."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        parameters = inspect.signature(base.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        return {
            key: value.to(self.device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
            if key not in LABEL_KEYS and (takes_any or key in parameters)
        }


def _batches(data: Any, batch_size: int, collate_fn: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(data, Mapping):
        return [data]
    return DataLoader(data, batch_size=batch_size, collate_fn=collate_fn or default_data_collator)


def _seen_classes(state: Mapping[str, Any]) -> list[int]:
    return sorted({int(c) for classes in state["task_classes"][: state["finished_tasks"]] for c in classes})


def _stored_results(state: Mapping[str, Any], folder: Path | None) -> ContinualResults:
    """The stored ``results`` as :class:`ContinualResults` (every matrix, figures, timings)."""
    stored = state["results"]
    blocks = {name: block for name, block in stored.items() if isinstance(block, dict) and "matrix" in block}
    try:
        specs = [MatrixSpec(name, bool(block.get("higher_is_better", True))) for name, block in blocks.items()]
        size = max((len(block["matrix"]) for block in blocks.values()), default=0)
        headline = stored.get("headline") or next(iter(blocks))
        empty = ContinualResults.empty(state["scenario"], headline, specs, size)
        return empty.restore(stored, int(state["finished_tasks"]))
    except (KeyError, TypeError, ValueError, StopIteration) as error:
        raise CheckpointError(f"{folder}/{STATE_NAME}: the stored results are unreadable: {error!r}") from error


# ---- the base model and the adapter ---------------------------------------------------------------------------------


def _adapter_document(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is missing or not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise CheckpointError(f"{path} holds a JSON {type(document).__name__}, not an adapter config")
    return document


def _load_base_model(
    folder: Path, state: Mapping[str, Any], name: str | None, auto_class: type | str | None, kwargs: dict[str, Any]
) -> nn.Module:
    """The base model ``name`` (default: the one the adapter config records) loaded with ``auto_class``."""
    import transformers

    name = name or _adapter_document(folder).get("base_model_name_or_path")
    if not name:
        raise ValueError(
            f"{folder} does not record its base model (it was built from a config): pass base_model=<the model "
            "the adapter was trained on, built as for training, without the adapter>, or its Hub id / local folder"
        )
    tag = _card_pipeline_tag(folder)
    if auto_class is None and tag == "zero-shot-image-classification":
        raise ValueError(
            f"{folder} holds a CLIP class-name classifier, which needs its tokenizer, class names and templates: "
            "pass base_model=CLIPForClassNameClassification(CLIPModel.from_pretrained(...), tokenizer, class_names, "
            "templates)"
        )
    if isinstance(auto_class, str):
        if not hasattr(transformers, auto_class):
            raise ValueError(
                f"auto_class={auto_class!r} names no transformers class (AutoModelForImageClassification, ...)"
            )
        auto_class = getattr(transformers, auto_class)
    if auto_class is None and tag is not None:
        from transformers.pipelines import SUPPORTED_TASKS

        auto_class = SUPPORTED_TASKS.get(tag, {}).get("pt", (None,))[0]
    if auto_class is None:
        architectures = transformers.AutoConfig.from_pretrained(name).architectures or []
        auto_class = getattr(transformers, architectures[0], None) if architectures else None
    if auto_class is None:
        raise ValueError(
            f"cannot tell which transformers class loads {name!r} (no pipeline_tag in the model card, no "
            "architectures in its config): pass auto_class=AutoModelForImageClassification (or the class that "
            "built the training model), or base_model=<the model instance>"
        )
    if state["config"].get("objective") == "classification" and auto_class.__name__.endswith("Classification"):
        kwargs.setdefault("num_labels", 1 + max(max(classes) for classes in state["task_classes"]))
        kwargs.setdefault("ignore_mismatched_sizes", True)  # the head comes from the adapter
    return auto_class.from_pretrained(name, **kwargs)


def _card_pipeline_tag(folder: Path) -> str | None:
    try:
        return (metadata_load(folder / "README.md") or {}).get("pipeline_tag")
    except (OSError, ValueError):
        return None


def _attach_adapter(model: nn.Module, folder: Path) -> nn.Module:
    """``model`` with the adapter of ``folder``, loaded by the library that wrote it; every stored key and shape is
    checked against the model's adapter (PEFT alone would skip unknown keys)."""
    from peft import PeftModel

    document = _adapter_document(folder)
    library = document.get("library_name")
    init = str(document.get("init_lora_weights"))
    if init.startswith(("corda", "pissa", "olora")):
        raise CheckpointError(
            f"{folder}: this LoRA was initialised with init_lora_weights={init!r}, which also rewrote the base "
            "weights during training; a plain base model does not fit it. Build the model as the run did (the same "
            "initialisation on the same data) and load the adapter weights onto it"
        )
    if isinstance(model, PeftModel):
        raise ValueError(
            "base_model already carries a PEFT adapter: pass the model without it (a freshly built one, or "
            "peft_model.unload())"
        )
    fix = "pass the base model the adapter was trained on, built as for training"
    try:
        if library == "pegp_hf":
            model = load_pet_pretrained(model, folder)
        else:  # trainable while the head is found (ClassificationObjective.setup); frozen afterwards
            model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"the adapter in {folder} does not fit the base model {type(model).__name__}: {error}; "
                         f"{fix}") from error  # fmt: skip
    try:
        pet_handle(model).read_pretrained(folder)
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {fix}") from error
    return model


def _classification_objective(
    model: nn.Module, folder: Path, state: Mapping[str, Any], head_module: str
) -> ClassificationObjective:
    """The run's objective with the stored head and its statistics (``pegp_head.safetensors``) loaded."""
    config = state["config"]
    head = config.get("head", "masked_linear")
    path = folder / HEAD_NAME
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    seen = _seen_classes(state)
    if num_labels is None or (seen and max(seen) >= num_labels):
        raise ValueError(f"the base model has num_labels={num_labels}, but the checkpoint's tasks use label ids up "
                         f"to {max(seen)}: build it with num_labels={1 + max(seen)} or more")  # fmt: skip
    args = SimpleNamespace(head=head, head_module=head_module, method=config.get("method", "pegp"),
                           seed=config.get("seed", 0), ranpac_dim=_projection_width(path) if head == "ranpac" else 1,
                           device=torch.device("cpu"))  # fmt: skip
    objective = ClassificationObjective()
    objective.setup(model, args)
    if objective.statistics is not None:
        if not path.is_file():
            raise CheckpointError(f"{folder} was trained with head={head!r} but holds no {HEAD_NAME}")
        objective.load_checkpoint(objective.read_checkpoint(folder))
    return objective


def _projection_width(path: Path) -> int:
    """The width ``M`` of the RanPAC projection stored in ``path``."""
    try:
        with safe_open(str(path), "pt") as stored:
            return int(stored.get_slice("projection").get_shape()[1])
    except Exception as error:  # safetensors raises its own error types for missing / corrupt files
        raise CheckpointError(f"{path} holds no readable RanPAC projection (missing or corrupt?): {error}") from error
