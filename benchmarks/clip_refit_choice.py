"""Choosing the text projection re-fit's reference term and weight on validation data, not on the test figures, for
the finished ``stored_reference_text_free`` runs of ``benchmarks/clip_reference.py`` (docs/clip.md).

The re-fit (:mod:`pegp_hf.multimodal.refit`) trades hallucination against zero-shot retention through its reference
weight. Here that weight is chosen without a test image. For each run (the settings of the re-fit runs, without the
re-fit), the final checkpoint is loaded and its text projection re-fitted once, as the last task's re-fit would, on
data that is not the test data:

- **fit:** three quarters of each class's stored embeddings (``pegp_prototype_memory.safetensors``), and the base
  split's images as the reference set, with the aligned model (no adapter) as the teacher, as in the runs;
- **validation hallucination:** the other quarter of the old classes' stored embeddings (every task but the
  last). The figure is the share whose most similar prompt, among every prompt of every seen class, is of another
  class. The captions of the recipe are those prompts.
- **validation zero-shot:** the held-out digits that the zero-shot set leaves unused
  (:func:`~pegp_hf.experiments.crossmodal.zero_shot_rows`; about 900 images, never trained on, never tested). The
  figure is their accuracy among every class, prompt-ensembled, against the aligned model's on the same images.

The rule follows the goals the re-fit is measured against: for each term (``kl``, ``margin`` at
``--refit_margin 0.05``), the weight with the lowest mean validation hallucination among those whose validation
zero-shot keeps at least ``RETENTION`` of the aligned model's, in the mean over the orders. The chosen weights'
test figures are then those of ``clip_reference.py``'s in-training runs (``refit_w3`` / ``refit`` / ``refit_w10``,
``refit_margin_w1`` / ``refit_margin`` / ``refit_margin_w3``; margin weight 5 has none); the re-fit here is the last
task's only, on the final checkpoint of a run trained without it.

Writes ``<output_dir>/results.json`` (every re-fit's figures and the choice) and ``<output_dir>/table.md``::

    python -m benchmarks.clip_refit_choice --runs outputs/clip_refit --output_dir outputs/clip_refit_choice

Flags after ``--`` go to the recipe's parser, as in ``benchmarks/clip_separability.py`` (``--smoke`` adds those of
``clip_reference.py --smoke``). Run it as a module.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.clip_reference import SMOKE
from benchmarks.clip_separability import check_the_run, finished_runs, pixel_batches, runs_parser
from pegp_hf import ContinualModel
from pegp_hf.experiments import crossmodal
from pegp_hf.experiments.grid import save_grid, split_flags
from pegp_hf.io.checkpoint import latest_task_checkpoint
from pegp_hf.multimodal.clip import CLIPForClassNameClassification, ensemble_prompts
from pegp_hf.multimodal.prototypes import MEMORY_NAME
from pegp_hf.multimodal.refit import (
    DecisionMargin,
    Distillation,
    projected,
    projection_weights,
    prompt_features,
    refit_text_projection,
    text_projection,
)
from pegp_hf.utils import read_safetensors

SETTING = "stored_reference_text_free"  # the re-fit settings without the re-fit
WEIGHTS = {"kl": (3.0, 5.0, 10.0), "margin": (1.0, 2.0, 3.0, 5.0)}
SCALE, MARGIN, RETENTION = 100.0, 0.05, 0.9


def split_per_class(labels: torch.Tensor, every: int, seed: int) -> torch.Tensor:
    """``(N,)`` bool: one row in ``every`` of each class (after a seeded shuffle) is ``True``, held out."""
    held = torch.zeros(len(labels), dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    for label in labels.unique():
        rows = torch.nonzero(labels == label).squeeze(1)
        held[rows[torch.randperm(len(rows), generator=generator)[::every]]] = True
    return held


@torch.no_grad()
def validation_figures(
    classifier: CLIPForClassNameClassification,
    zero_shot: tuple[torch.Tensor, torch.Tensor],
    old: tuple[torch.Tensor, torch.Tensor],
    seen: torch.Tensor,
) -> dict[str, float]:
    """``zero_shot``: percent of the image embeddings ``(N, D)`` put on their label ``(N,)`` among every class,
    prompt-ensembled; ``hallucination``: percent of the ``old`` embeddings whose most similar prompt among every
    prompt of the ``seen`` classes (label ids) is of another class."""
    every = torch.arange(len(classifier.known))
    prompts = projected(prompt_features(classifier, every), *projection_weights(classifier))  # (C, K, D)
    images, labels = zero_shot
    accuracy = ((images @ ensemble_prompts(prompts).T).argmax(1) == labels).double().mean()
    embeds, old_labels = old
    best = (embeds @ prompts[seen].flatten(0, 1).T).argmax(1) // prompts.shape[1]
    wrong = (seen[best] != old_labels).double().mean()
    return {"zero_shot": 100 * float(accuracy), "hallucination": 100 * float(wrong)}


def choose(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per term, the weight with the lowest mean validation hallucination among those whose mean ``retention`` is
    at least ``RETENTION`` (means over the rows' orders); ``None`` if no weight keeps enough."""
    chosen: dict[str, float | None] = {}
    for term in dict.fromkeys(row["term"] for row in rows):
        means = {}
        for weight in dict.fromkeys(row["weight"] for row in rows if row["term"] == term):
            mine = [row for row in rows if (row["term"], row["weight"]) == (term, weight)]
            means[weight] = tuple(float(np.mean([row[key] for row in mine])) for key in ("retention", "hallucination"))
        kept = {weight: hallucination for weight, (retention, hallucination) in means.items() if retention >= RETENTION}
        chosen[term] = min(kept, key=kept.get) if kept else None
    return chosen


@torch.no_grad()
def embed(classifier: CLIPForClassNameClassification, split: Any) -> torch.Tensor:
    """``(N, D)`` normalised image embeddings of ``split``'s rows, float64."""
    classifier.eval()
    return torch.cat([classifier.encode_image(x) for x in pixel_batches(split)]).double()


def validation_digits(script: crossmodal.CrossModalArguments, prepared: crossmodal.Prepared) -> Any:
    """The held-out digits the zero-shot set leaves unused, with its image transform."""
    if script.dataset_name is not None or prepared.zero_shot is None:
        raise ValueError("the validation zero-shot set is the embedded digits: run this on the recipe's embedded data")
    if len(prepared.tasks) < 2:
        raise ValueError("the old embeddings are those of every task but the last: leave --num_tasks 1 out")
    _, held_out = crossmodal.digits_splits(script)
    if script.zero_shot_samples >= len(held_out):
        raise ValueError(f"--zero_shot_samples {script.zero_shot_samples} leaves none of the {len(held_out)} held-out "
                         "digits for validation")  # fmt: skip
    transform = prepared.zero_shot.dataset.format["format_kwargs"]["transform"]
    return held_out.select(crossmodal.zero_shot_rows(script, len(held_out), unused=True)).with_transform(transform)


def order_rows(prepared: crossmodal.Prepared, classifier: CLIPForClassNameClassification, checkpoint: Path,
               validation: Any, order: int) -> list[dict[str, Any]]:  # fmt: skip
    """Every term and weight's re-fit of ``classifier`` (a run's final model) and its figures on the stored
    embeddings held out and the ``validation`` digits."""
    aligned = prepared.classifier
    memory = read_safetensors(checkpoint / MEMORY_NAME)
    stored, stored_labels = memory["features"].double(), memory["labels"]
    held = split_per_class(stored_labels, 4, order)
    old_classes = [c for task in prepared.tasks[:-1] for c in task.classes]
    old = held & torch.isin(stored_labels, torch.tensor(old_classes))
    seen = torch.tensor(sorted(c for task in prepared.tasks for c in task.classes))
    classifier.reveal_classes(seen.tolist())
    scale = float(classifier.clip.logit_scale.detach().exp())
    teacher_images = embed(aligned, prepared.base)
    every = torch.arange(len(aligned.known))
    teacher_prompts = projected(prompt_features(aligned, every), *projection_weights(aligned))
    probabilities = torch.softmax(scale * teacher_images @ teacher_prompts.flatten(0, 1).T, dim=1)
    decisions = (teacher_images @ ensemble_prompts(teacher_prompts).T).argmax(1)
    base_now = embed(classifier, prepared.base)
    labels = torch.as_tensor(validation["label"])
    zero_shot = embed(classifier, validation), labels
    before = validation_figures(aligned, (embed(aligned, validation), labels), (stored[old], stored_labels[old]),
                                seen)["zero_shot"]  # fmt: skip
    weight = text_projection(classifier).weight
    start = weight.detach().clone()
    rows = []
    for term, weights in WEIGHTS.items():
        for factor in weights:
            with torch.no_grad():
                weight.copy_(start)
            if term == "kl":
                reference = Distillation(base_now, probabilities, scale, factor)
            else:
                reference = DecisionMargin(base_now, decisions, scale, MARGIN, factor)
            refit_text_projection(classifier, stored[~held], stored_labels[~held], SCALE, reference)
            figures = validation_figures(classifier, zero_shot, (stored[old], stored_labels[old]), seen)
            rows.append({"seed": order, "term": term, "weight": factor, "zero_shot_before": before, **figures,
                         "retention": figures["zero_shot"] / before})  # fmt: skip
    with torch.no_grad():
        weight.copy_(start)
    return rows


def table(rows: list[dict[str, Any]], chosen: dict[str, float | None]) -> str:
    """Mean +- std over the orders of each term and weight's validation figures, the chosen weights marked."""
    columns = ["reference term", "weight", "validation zero-shot (before)", "retention", "validation hallucination"]
    lines = ["| " + " | ".join(columns) + " | orders |", "|---|---|---|---|---|---|"]
    for term, weight in dict.fromkeys((row["term"], row["weight"]) for row in rows):
        mine = [row for row in rows if (row["term"], row["weight"]) == (term, weight)]

        def cell(key: str, digits: int = 1, mine: list[dict[str, Any]] = mine) -> str:
            values = [row[key] for row in mine]
            return f"{np.mean(values):.{digits}f} +- {np.std(values):.{digits}f}"

        mark = " (chosen)" if chosen.get(term) == weight else ""
        lines.append(f"| {term} | {weight:g}{mark} | {cell('zero_shot')} ({cell('zero_shot_before')}) | "
                     f"{cell('retention', 2)} | {cell('hallucination')} | {len(mine)} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_flags(argv)
    options = runs_parser(__doc__, "outputs/clip_refit_choice").parse_args(own)
    found = [run for run in finished_runs([Path(root) for root in options.runs]) if run[0] == SETTING]
    if not found:
        raise ValueError(f"no finished {SETTING} run under {options.runs}: run benchmarks/clip_reference.py "
                         f"--settings {SETTING} first")  # fmt: skip
    rows = []
    for _, order, _, folder in found:
        flags = ["--class_order_seed", str(order), "--output_dir", options.output_dir,
                 *(SMOKE if options.smoke else []), *passthrough]  # fmt: skip
        script, args = crossmodal.parse_args(flags)
        prepared = crossmodal.prepare(script, args.seed)
        checkpoint = latest_task_checkpoint(folder)
        loaded = ContinualModel.from_pretrained(checkpoint, copy.deepcopy(prepared.classifier))
        check_the_run(json.loads((folder / "results.json").read_text()), loaded, prepared.tasks, folder)
        classifier = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        rows.extend(order_rows(prepared, classifier, checkpoint, validation_digits(script, prepared), order))
    chosen = choose(rows)
    text = table(rows, chosen)
    save_grid(options.output_dir, [*rows, {"chosen": chosen, "retention_floor": RETENTION}], text)
    print(f"\nThe re-fit's reference weight chosen on validation data\n\n{text}\n\nchosen: {chosen}")
    return {"rows": rows, "chosen": chosen}


if __name__ == "__main__":
    main()
