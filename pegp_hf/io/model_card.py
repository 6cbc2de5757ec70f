"""The model card (``README.md``) of a task checkpoint, a ``huggingface_hub.ModelCard``.

Metadata (``ModelCardData``, checked by the Hub):

- ``library_name``: ``peft`` or ``pegp_hf``, the library that loads the adapter;
- ``tags``: ``pegp``, ``pegp_hf``, ``continual-learning``, the PET methods, the scenario, and
  ``base_model:adapter:<id>`` (as PEFT tags an adapter);
- ``base_model``: a Hub id only (the Hub refuses others): a local model is named in the text instead;
- ``pipeline_tag``: what the model does (``image-classification``, ``text-generation``,
  ``zero-shot-image-classification``, ...), read off the model's class;
- ``datasets``: the tasks' data sets where ``datasets`` recorded a name for them;
- ``license`` / ``language``: when given (:func:`update_model_card`);
- ``model-index`` (``EvalResult``): the headline matrix's ACC / Forgetting / BWT after the last finished task on the
  sequence's data set (and per data set when the tasks come from several), and the last task's figures on the set
  each is measured on (zero-shot accuracy on its held-out set, hallucination on the old tasks, general ability).

Text: what the files are, a quick start, the task sequence, every matrix, the training hyperparameters, the
framework versions and the citation.

PEFT's ``save_pretrained`` writes a card first; it is merged, not replaced: its metadata keys stay (tags joined, a
``base_model`` kept only when it is a Hub id), and its framework versions and quantization config join ours.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from pegp_hf.continual.results import ContinualMatrix, ContinualResults

if TYPE_CHECKING:
    from pegp_hf.trainer import ContinualPEGPTrainer

__all__ = [
    "CardDataset",
    "CardInfo",
    "as_hub_id",
    "card_info",
    "dataset_of",
    "framework_versions",
    "model_card",
    "update_model_card",
]

CITATION = """@article{qiao2024pegp,
  title   = {Gradient Projection For Continual Parameter-Efficient Tuning},
  author  = {Qiao, Jingyang and Zhang, Zhizhong and Tan, Xin and Qu, Yanyun and Zhang, Wensheng and Han, Zhi and
             Xie, Yuan},
  journal = {arXiv preprint arXiv:2405.13383},
  year    = {2024}
}"""
FILES = {
    "adapter_model.safetensors": "the adapter",
    "pegp_subspaces.safetensors": "the subspace bases that protect the finished tasks",
    "pegp_head.safetensors": "the head's statistics: class means (and covariances) of the prototype / aligned head, "
    "or the RanPAC head's projection and Gram matrix",
    "pegp_prototypes.safetensors": "the old classes' image prototypes a continued sequence replays (class means of "
    "image embeddings, and covariances with spread='covariance')",
    "pegp_prototype_memory.safetensors": "the old classes' stored image embeddings that prototype replay with "
    "spread='stored' replays",
    "pegp_state.json": "the state of the sequence: tasks, settings, every matrix and figure",
}
LOADERS = {
    "peft": "`PeftModel.from_pretrained(base, folder)`",
    "pegp_hf": "`pegp_hf.tuners.load_pet_pretrained(base, folder)`",
}
TAGS = ("pegp", "pegp_hf", "continual-learning")
# distribution -> how the "Framework versions" list names it (PEFT's own card writes "- PEFT <version>")
FRAMEWORKS = {"pegp_hf": "pegp_hf", "transformers": "Transformers", "peft": "PEFT", "torch": "PyTorch",
              "accelerate": "Accelerate", "datasets": "Datasets"}  # fmt: skip
# the end of a transformers model class's name -> the Hub pipeline tag
PIPELINES = (
    ("ForCausalLM", "text-generation"),
    ("ForImageClassification", "image-classification"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForAudioClassification", "audio-classification"),
    ("ForVideoClassification", "video-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForSeq2SeqLM", "text2text-generation"),
)
AUTO_CLASSES = {
    "text-generation": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "audio-classification": "AutoModelForAudioClassification",
    "video-classification": "AutoModelForVideoClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "text2text-generation": "AutoModelForSeq2SeqLM",
}
# headline metrics: (metric type, metric name, key of ContinualMatrix.summary), for accuracies and for losses
HEADLINE_METRICS = {
    True: (("acc", "ACC", "average"), ("forgetting", "Forgetting", "forgetting"), ("bwt", "BWT", "bwt")),
    False: (("loss", "Average loss", "average"), ("forgetting", "Forgetting", "forgetting"), ("bwt", "BWT", "bwt")),
}
FIGURE_NAMES = {
    "zero_shot_acc": "Zero-shot accuracy",
    "zero_shot_drop": "Zero-shot drop",
    "hallucination_rate": "Hallucination rate",
    "false_match_rate": "False match rate",
    "general_perplexity": "General perplexity",
    "general_perplexity_increase": "General perplexity increase",
    "answer_agreement": "Answer agreement",
}
NOT_RESULTS = ("match_threshold",)  # figures that calibrate a measure rather than report one
QUANTIZATION = "The following `bitsandbytes` quantization config was used during training:"  # PEFT's line
FRAMEWORK_HEADING = "### Framework versions"  # PEFT's heading, which it looks for when it updates a card


@dataclass(frozen=True)
class CardDataset:
    """A data set as the model-index names it: ``type`` its Hub id (``"custom"`` when unknown), ``name`` a readable
    name, ``config`` its configuration."""

    type: str
    name: str
    config: str | None = None


CUSTOM = CardDataset("custom", "custom data")


@dataclass(frozen=True)
class CardInfo:
    """What a task checkpoint's card says beyond its ``pegp_state.json`` and results (:func:`card_info` reads it off a
    trainer).

    Attributes:
        library_name: ``"peft"`` or ``"pegp_hf"``.
        methods: the PET methods, e.g. ``("lora",)``.
        base_model: the base model's name or path as its config records it (``None`` when built from a config).
        base_class: the base model's class name (the quick start builds it).
        pipeline_tag: the Hub pipeline tag of the model, or ``None``.
        num_labels: the classifier's label count, for the quick start.
        model_name: the model-index name (the repo's name).
        repo_id: the Hub repo the run pushes to, for the quick start.
        task_datasets: per task, the data set it came from where known.
        zero_shot_dataset: the held-out set of the zero-shot figures, where known.
        hyperparameters: the training arguments that shaped the run (the state's settings are added to them).
        versions: :func:`framework_versions`.
    """

    library_name: str
    methods: tuple[str, ...]
    base_model: str | None = None
    base_class: str | None = None
    pipeline_tag: str | None = None
    num_labels: int | None = None
    model_name: str | None = None
    repo_id: str | None = None
    task_datasets: tuple[CardDataset | None, ...] = ()
    zero_shot_dataset: CardDataset | None = None
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=lambda: framework_versions())


def framework_versions() -> dict[str, str]:
    """Installed versions of pegp_hf, transformers, peft, torch, accelerate and datasets (those installed)."""
    found = {}
    for name in FRAMEWORKS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def as_hub_id(name: str | None) -> str | None:
    """``name`` when it can be a Hub repo id (not an existing local path, and of the form ``name`` or
    ``owner/name``), else ``None``."""
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def dataset_of(dataset: Any) -> CardDataset | None:
    """The data set ``datasets`` recorded that ``dataset`` was loaded from (``DatasetInfo.dataset_name`` and
    ``config_name``), or ``None`` for one built in memory or read by a packaged loader (json, csv, parquet files, a
    generator: its ``dataset_name`` is the loader's)."""
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None)
    if not name or name == getattr(info, "builder_name", None) or as_hub_id(name) is None:
        return None
    config = info.config_name if info.config_name not in (None, "default") else None
    return CardDataset(name, name if config is None else f"{name} ({config})", config)


def _pipeline_tag(model: Any) -> str | None:
    """The Hub pipeline tag of ``model`` (the base model under any PEFT wrapper): a dual encoder (alone or in the
    class-name classifier, ``.clip``) classifies images zero-shot; others by the end of their class name."""
    encoder = getattr(model, "clip", model)
    if hasattr(encoder, "get_image_features") and hasattr(encoder, "get_text_features"):
        return "zero-shot-image-classification"
    name = type(model).__name__
    return next((tag for suffix, tag in PIPELINES if name.endswith(suffix)), None)


def _value(setting: Any) -> Any:
    return getattr(setting, "value", setting)  # enums (optimizer, scheduler) by their value


def _training_hyperparameters(args: Any) -> dict[str, Any]:
    """The ``TrainingArguments`` that shaped each task's training."""
    found = {
        "learning_rate": args.learning_rate,
        "optimizer": str(_value(args.optim)) + (f" ({args.optim_args})" if args.optim_args else ""),
        "lr_scheduler_type": str(_value(args.lr_scheduler_type)),
        "num_epochs_per_task": args.num_train_epochs,
        "train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
        * args.world_size,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
    }  # fmt: skip
    if args.max_steps > 0:
        found["max_steps_per_task"] = args.max_steps
    if args.bf16 or args.fp16:
        found["mixed_precision"] = "bf16" if args.bf16 else "fp16"
    return found


def card_info(trainer: ContinualPEGPTrainer) -> CardInfo:
    """The :class:`CardInfo` of ``trainer``'s run: its PET, base model, pipeline, data sets and arguments."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    repo_id = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id
    zero_shot = None
    for evaluator in trainer.evaluators:
        zero_shot = zero_shot or dataset_of(getattr(getattr(evaluator, "zero_shot", None), "dataset", None))
    return CardInfo(
        library_name=trainer.pet.library_name,
        methods=tuple(trainer.pet.methods),
        base_model=getattr(config, "_name_or_path", None) or None,
        base_class=type(base).__name__,
        pipeline_tag=_pipeline_tag(base),
        num_labels=getattr(config, "num_labels", None),
        model_name=(repo_id or os.path.basename(os.path.normpath(trainer.args.output_dir))).split("/")[-1],
        repo_id=repo_id,
        task_datasets=tuple(dataset_of(task.test) or dataset_of(task.train) for task in trainer.tasks),
        zero_shot_dataset=zero_shot,
        hyperparameters=_training_hyperparameters(trainer.args),
    )


# ---- metadata ----------------------------------------------------------------------------------------------------


def _union(*lists: Iterable[str] | None) -> list[str]:
    return list(dict.fromkeys(item for items in lists for item in (items or ())))


def _listify(value: str | Sequence[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _sequence_dataset(info: CardInfo) -> CardDataset:
    """The data set the whole sequence is measured on: the tasks' one data set, the known ones joined, or custom."""
    known = list(dict.fromkeys(ref for ref in info.task_datasets if ref is not None))
    if len(known) == 1 and all(ref is not None for ref in info.task_datasets):
        return known[0]
    if known:
        return CardDataset("custom", " + ".join(ref.name for ref in known))
    return CUSTOM


def _headline_results(matrix: ContinualMatrix, rows: Sequence[int], done: int) -> list[tuple[str, str, float]]:
    """``(type, name, value)`` of ACC / Forgetting / BWT over the tasks ``rows`` (those of one data set) after ``done``
    tasks: the definitions of :mod:`pegp_hf.continual.metrics` restricted to those rows; Forgetting and BWT only when
    one of them is not the last task."""
    sign = 1.0 if matrix.higher_is_better else -1.0
    values, last = sign * matrix.values, done - 1
    names = {key: (kind, name) for kind, name, key in HEADLINE_METRICS[matrix.higher_is_better]}
    found = [(*names["average"], float(sum(matrix.values[i, last] for i in rows) / len(rows)))]
    old = [i for i in rows if i < last]
    if old:
        drops = [values[i, i:last].max() - values[i, last] for i in old]
        transfers = [values[i, last] - values[i, i] for i in old]
        found.append((*names["forgetting"], float(sum(drops) / len(old))))
        found.append((*names["bwt"], float(sum(transfers) / len(old))))
    return found


def _eval_results(results: ContinualResults, info: CardInfo, scenario: str) -> list[EvalResult]:
    """The model-index: the headline's ACC / Forgetting / BWT on the sequence's data set, the same per data set when
    the tasks come from several, and the last finished task's figures."""
    done = results.finished_tasks
    task_type = info.pipeline_tag or "other"
    task_name = f"{scenario.replace('_', '-').capitalize()} continual learning"
    headline = results.matrices[results.headline]

    def result(
        dataset: CardDataset, kind: str, name: str, value: float, task: str = task_type, split: str = "test"
    ) -> EvalResult:
        """One metric; the Hub groups metrics by task, data set type, config and split (not by data set name), so a
        held-out set's figures (split ``held-out``) never join the sequence's."""
        return EvalResult(task_type=task, task_name=task_name if split == "test" else None, dataset_type=dataset.type,
                          dataset_name=dataset.name, dataset_config=dataset.config, dataset_split=split,
                          metric_type=kind, metric_name=name, metric_value=float(value))  # fmt: skip

    sequence = _sequence_dataset(info)
    summary = results.summary()
    metrics = HEADLINE_METRICS[headline.higher_is_better]
    found = [result(sequence, kind, name, summary[key]) for kind, name, key in metrics]
    known = list(dict.fromkeys(ref for ref in info.task_datasets[:done] if ref is not None))
    if len(known) > 1:
        for dataset in known:
            rows = [i for i, ref in enumerate(info.task_datasets[:done]) if ref == dataset]
            found += [result(dataset, *metric) for metric in _headline_results(headline, rows, done)]
    figures = results.task_metrics[done - 1] if done else {}
    for key, value in figures.items():
        if value is None or key in NOT_RESULTS:
            continue
        name = FIGURE_NAMES.get(key, key.replace("_", " ").capitalize())
        if key.startswith("zero_shot"):
            held_out = info.zero_shot_dataset or CardDataset("custom", "held-out zero-shot set")
            found.append(result(held_out, key, name, value, "zero-shot-image-classification", "held-out"))
        elif key.startswith("general_") or key == "answer_agreement":
            general = CardDataset("custom", "held-out general text")
            found.append(result(general, key, name, value, "text-generation", "held-out"))
        else:
            found.append(result(sequence, key, name, value))
    return found


def _adapter_tag(base_model: str) -> str:
    return f"base_model:adapter:{base_model}"


def _card_data(state: Mapping[str, Any], results: ContinualResults, info: CardInfo) -> ModelCardData:
    base = as_hub_id(info.base_model)
    tags = _union(TAGS, info.methods, [state["scenario"].replace("_", "-")], [_adapter_tag(base)] if base else [])
    datasets = _union(ref.type for ref in info.task_datasets if ref is not None)
    return ModelCardData(
        library_name=info.library_name,
        base_model=base,
        pipeline_tag=info.pipeline_tag,
        tags=tags,
        datasets=datasets or None,
        model_name=info.model_name or "pegp-adapter",
        eval_results=_eval_results(results, info, state["scenario"]) if results.finished_tasks else None,
    )


def _merge_peft_metadata(data: ModelCardData, peft: ModelCardData) -> None:
    """Keep every metadata key of PEFT's card that ours leaves unset; join the tags. PEFT writes the base model's
    ``_name_or_path`` whatever it is: kept (and its ``base_model:adapter:`` tag) only when it is a Hub id."""
    ours = data.to_dict()
    for key, value in peft.to_dict().items():
        if key in ("tags", "base_model", "model-index") or ours.get(key) is not None:
            continue
        data[key] = value
    if data.base_model is None and isinstance(peft.base_model, str) and as_hub_id(peft.base_model):
        data.base_model = peft.base_model
    kept = [tag for tag in peft.tags or () if not tag.startswith("base_model:") or as_hub_id(tag.split(":", 2)[2])]
    data.tags = _union(data.tags, kept)


def _peft_text(text: str) -> tuple[list[str], list[str]]:
    """PEFT's framework version lines (``- PEFT 0.x``) and its quantization block, from its card's text."""
    lines = text.splitlines()

    def items_after(heading: str) -> list[str]:
        if heading not in lines:
            return []
        found = []
        for line in lines[lines.index(heading) + 1 :]:
            if line.startswith("- "):
                found.append(line)
            elif line.strip() or found:
                break
        return found

    quantization = items_after(QUANTIZATION)
    return items_after(FRAMEWORK_HEADING), [QUANTIZATION, *quantization] if quantization else []


# ---- text --------------------------------------------------------------------------------------------------------


def _matrix_table(matrix: ContinualMatrix, done: int) -> str:
    lines = ["| task | " + " | ".join(f"after {t + 1}" for t in range(done)) + " |", "|---" * (done + 1) + "|"]
    for i in range(done):
        cells = ("-" if t < i else f"{matrix.values[i, t]:.4g}" for t in range(done))
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _measures(results: ContinualResults) -> str:
    """The other matrices (average / Forgetting / BWT) and the per-task figures, if any."""
    done = results.finished_tasks
    others = [name for name in results.matrices if name != results.headline]
    figures = results.task_metrics[:done]
    if not others and not any(figures):
        return ""
    lines = ["", "## Further measures", ""]
    if others:
        lines += ["| matrix | average | Forgetting | BWT | better |", "|---|---|---|---|---|"]
        for name in others:
            summary = results.summary(name)
            better = "higher" if results.matrices[name].higher_is_better else "lower"
            lines.append(f"| {name} | {summary['average']:.2f} | {summary['forgetting']:.2f} | "
                         f"{summary['bwt']:.2f} | {better} |")  # fmt: skip
        lines.append("")
    keys = list(dict.fromkeys(key for row in figures for key in row))
    if keys:
        lines += ["| after task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        if results.initial_metrics:
            lines.append("| before | " + " | ".join(_cell(results.initial_metrics.get(k)) for k in keys) + " |")
        lines += [f"| {t + 1} | " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for t, row in enumerate(figures)]
        lines.append("")
    return "\n".join(lines)


def _base_line(info: CardInfo) -> str:
    """The card's line on the base model: a Hub link, a local path (kept out of the metadata), or unknown."""
    if as_hub_id(info.base_model):
        return f"- Base model: [{info.base_model}](https://huggingface.co/{info.base_model})"
    if info.base_model:
        return f"- Base model: the local model `{info.base_model}` (not a Hub id, so not in the metadata)"
    return "- Base model: unknown (built from a config)"


def _quick_start(info: CardInfo, done: int, head: str | None = None) -> str:
    """Python that loads the adapter onto its base model; for a statistics head (``prototype``, ``ranpac``), whose
    scores are not the model's logits, through ``pegp_hf.ContinualModel``, which also loads the head."""
    base = info.base_model or "<base model>"
    repo = info.repo_id or f"<this repo id, or the task-{done} folder>"
    if info.base_class == "CLIPForClassNameClassification":
        imports = ["from transformers import AutoModel, AutoTokenizer",
                   "from pegp_hf.multimodal.clip import CLIPForClassNameClassification"]  # fmt: skip
        build = [f'encoder = AutoModel.from_pretrained("{base}")',
                 f'base = CLIPForClassNameClassification(encoder, AutoTokenizer.from_pretrained("{base}"), '
                 "class_names)  # one name per label id"]  # fmt: skip
    else:
        auto = AUTO_CLASSES.get(info.pipeline_tag or "", "AutoModel")
        options = ""
        if info.pipeline_tag in ("image-classification", "text-classification", "audio-classification"):
            options = f", num_labels={info.num_labels}, ignore_mismatched_sizes=True" if info.num_labels else ""
        imports = [f"from transformers import {auto}"]
        build = [f'base = {auto}.from_pretrained("{base}"{options})']
    if head in ("prototype", "ranpac"):
        imports.append("from pegp_hf import ContinualModel")
        load = [f'model = ContinualModel.from_pretrained("{repo}", base)  # the {head} head\'s scores, as measured',
                "labels = model.predict(batch)  # the arg-max over the seen classes"]  # fmt: skip
    elif info.library_name == "peft":
        imports.insert(0, "from peft import PeftModel")
        load = [f'model = PeftModel.from_pretrained(base, "{repo}")']
    else:
        imports = ["from huggingface_hub import snapshot_download", *imports,
                   "from pegp_hf.tuners import load_pet_pretrained"]  # fmt: skip
        load = [f'model = load_pet_pretrained(base, snapshot_download("{repo}"))  # or a local task-<k> folder']
    return "\n".join(["```python", *imports, "", *build, *load, "```"])


def _hyperparameters(state: Mapping[str, Any], info: CardInfo) -> str:
    settings = {**state["config"], **info.hyperparameters}
    return "\n".join(f"- {key}: {value}" for key, value in settings.items())


def _framework_lines(info: CardInfo, peft_lines: Sequence[str]) -> str:
    return "\n".join(_union([f"- {FRAMEWORKS[name]} {v}" for name, v in info.versions.items()], peft_lines))


def _body(
    state: Mapping[str, Any], results: ContinualResults, info: CardInfo, files: Sequence[str],
    peft_lines: Sequence[str], quantization: Sequence[str],
) -> str:  # fmt: skip
    config, done, methods = state["config"], results.finished_tasks, "/".join(info.methods)
    kind = f"{'PEFT' if info.library_name == 'peft' else 'pegp_hf'} {methods} adapter"
    tasks = "\n".join(
        f"| {i + 1} | {name} | {classes} |{' (not yet trained)' if i >= done else ''}"
        for i, (name, classes) in enumerate(zip(state["task_names"], state["task_classes"], strict=True))
    )
    headline = results.matrices[results.headline]
    summary = results.summary()
    held = "\n".join(f"- {FILES[name]} (`{name}`);" for name in FILES if name in files)
    repo = info.repo_id or "<this repo id>"
    quantized = "\n" + "\n".join(quantization) + "\n" if quantization else ""
    return f"""
# Continual {methods} adapter trained with PEGP ({done} of {len(state["task_names"])} tasks)

A {kind} trained through a sequence of tasks by pegp_hf with PEGP, gradient projection for continual
parameter-efficient tuning ([Qiao et al., 2024](https://arxiv.org/abs/2405.13383)). PEGP projects every later
gradient off the feature subspace of earlier tasks, so that their outputs stay put. This repository holds:

{held}

Load it with {LOADERS[info.library_name]}; continue the sequence with
`ContinualPEGPTrainer(...).train(resume_from_checkpoint="{repo}")`.

{_base_line(info)}
- Scenario: {state["scenario"]}; method: {config["method"]}; every setting under "Training hyperparameters"
- Threshold (eps): {config["threshold"]}

## Quick start

{_quick_start(info, done, config.get("head"))}

## Task sequence

| # | task | classes |
|---|---|---|
{tasks}

## {results.headline.replace("_", "-")} after each task ({"higher" if headline.higher_is_better else "lower"} is better)

Rows are tasks, columns are "after training task t".

{_matrix_table(headline, done)}

Average {summary["average"]:.2f} | Forgetting {summary["forgetting"]:.2f} | BWT {summary["bwt"]:.2f}
{_measures(results)}
## Training procedure

Each task trains with a fresh optimizer and scheduler, seeded with seed + task index.

### Training hyperparameters

{_hyperparameters(state, info)}
{quantized}
{FRAMEWORK_HEADING}

{_framework_lines(info, peft_lines)}

## Citation

```bibtex
{CITATION}
```
"""


def model_card(
    state: Mapping[str, Any],
    results: ContinualResults,
    info: CardInfo,
    files: Sequence[str],
    peft_card: str | None = None,
) -> str:
    """The ``README.md`` of the task checkpoint whose ``pegp_state.json`` is ``state``: a ``ModelCard`` (metadata in
    the module docstring) as text. ``files`` are the names in the checkpoint folder, ``peft_card`` the card PEFT's
    ``save_pretrained`` wrote there, merged in."""
    data = _card_data(state, results, info)
    peft_lines: list[str] = []
    quantization: list[str] = []
    if peft_card is not None:
        peft = ModelCard(peft_card, ignore_metadata_errors=True)
        _merge_peft_metadata(data, peft.data)
        peft_lines, quantization = _peft_text(peft.text)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n" + _body(state, results, info, files, peft_lines, quantization))
    return str(card)


def update_model_card(
    card: ModelCard,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
) -> ModelCard:
    """``card`` with the arguments of ``Trainer.create_model_card`` applied to its metadata (each only when given):
    ``language``, ``license``; ``tags`` joined to its tags; ``model_name`` names the model-index; ``finetuned_from``
    becomes ``base_model`` (with its ``base_model:adapter:`` tag) when it is a Hub id; the first of ``tasks`` the
    ``pipeline_tag``; ``dataset_tags`` (Hub ids) join ``datasets``, and when the card could not tell the sequence's
    data set (``custom``), a single one names it in the model-index, with ``dataset`` (its readable name) and
    ``dataset_args`` (its config)."""
    data = card.data
    if language is not None:
        data.language = _listify(language)
    if license is not None:
        data.license = license
    if tags is not None:
        data.tags = _union(data.tags, _listify(tags))
    if model_name is not None and data.eval_results:
        data.model_name = model_name
    base = as_hub_id(finetuned_from)
    if base is not None:
        data.base_model = base
        data.tags = _union(data.tags, [_adapter_tag(base)])
    if tasks is not None and _listify(tasks):
        data.pipeline_tag = _listify(tasks)[0]
    ids = [name for name in _listify(dataset_tags) if as_hub_id(name)]
    if ids:
        data.datasets = _union(_listify(data.datasets), ids)
    names, configs = _listify(dataset), _listify(dataset_args)
    if len(ids) == 1 and data.eval_results and data.eval_results[0].dataset_type == CUSTOM.type:
        first = (data.eval_results[0].dataset_type, data.eval_results[0].dataset_name)
        for result in data.eval_results:
            if (result.dataset_type, result.dataset_name) == first and result.dataset_split == "test":
                result.dataset_type, result.dataset_name = ids[0], names[0] if names else ids[0]
                result.dataset_config = configs[0] if configs else None
    return card
