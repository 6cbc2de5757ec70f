"""How low could cross-modal hallucination go if only the class names' side changed? A bound from the old images'
embeddings, for the finished runs of ``benchmarks/clip_reference.py`` (docs/clip.md).

A method that keeps the old images' outputs in place (``pegp``, with or without replay of their prototypes) can
lower the hallucination rate only through the class embeddings it scores them against. So, for each run, the images
of the five tasks are embedded with the run's final checkpoint, and the question is how well *any* unit vector per
class (what a class-name embedding is: the score is the cosine) could put the old tasks' test images (every task but
the last) on their own class, among all ten. The vectors minimise the cross-entropy of ``scale * cos(x, w_c)``
(L-BFGS from the class means), the loss CLIP trains with:

- ``trained``: fitted on the training images of every class, at the scale of ``SCALES`` (``scale``) that does
  best on the old classes of a quarter of the training images held out for it: what a text side trained on all
  the data reaches, with the images' embeddings as the run left them.
- ``model_scale``: the same at the model's own logit scale (``exp(logit_scale)``, frozen in these runs: 1 / 0.07,
  ``VisionTextDualEncoderConfig``'s initial value, for the offline dual encoder): what the cross-entropy the runs
  train with aims at.
- ``fitted``: fitted on every test image (all classes) and scored on the old ones, at the best of ``SCALES`` on
  those very images: optimistic by construction.
- ``nearest_mean``: the vectors are the training images' class means (what replay of class means pulls towards).

Each figure is the percent of old test images put on another class, as the hallucination rate counts them (the run's
own rate is computed with its caption embeddings, a few captions per class). ``aligned`` is the aligned model without
any adapter. Before it measures anything, the benchmark checks that every checkpoint, loaded onto the rebuilt model,
gives the run's recorded class-incremental accuracy of every task, so a checkpoint from another install, alignment
or class order is refused, not measured. Writes ``<output_dir>/results.json`` and ``<output_dir>/table.md``::

    python -m benchmarks.clip_separability --runs outputs/clip_prototypes outputs/clip_prototypes_stored \\
        outputs/clip_text_free --output_dir outputs/clip_separability

``--runs`` are output folders of ``benchmarks/clip_reference.py`` (``<runs>/<setting>/order<k>/<method>/task-<t>``);
every run there is measured, with the label ``clip_reference.SETTINGS`` gives it (a CorDA run, whose base weights
the initialisation rewrote, is refused by the loader). The model and data are rebuilt
with the recipe's defaults, ``--smoke`` adds those of ``clip_reference.py --smoke``, and flags after ``--`` go to
the recipe's parser as they went to the runs'. Run it as a module (it imports ``benchmarks.clip_reference``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.clip_reference import SETTINGS, SMOKE
from pegp_hf import ContinualModel
from pegp_hf.continual.tasks import TaskSequence
from pegp_hf.experiments import crossmodal
from pegp_hf.experiments.grid import labelled_table, save_grid, split_flags
from pegp_hf.io.checkpoint import latest_task_checkpoint
from pegp_hf.multimodal.clip import CLIPForClassNameClassification

SCALES = (10.0, 30.0, 100.0, 300.0, 1000.0)  # of the cosine, for the best-of figures
COLUMNS = {"hallucination": "the run's hallucination", "trained": "class vectors trained on every class",
           "model_scale": "the same at the model's logit scale", "fitted": "class vectors fitted on the scored images",
           "nearest_mean": "class means"}  # fmt: skip
ALIGNED = "the aligned model (no adapter)"


def embed_tasks(
    classifier: CLIPForClassNameClassification, tasks: TaskSequence, split: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised image embeddings ``(N, D)``, labels ``(N,)`` and task index ``(N,)`` of every task's ``split``
    (``train`` or ``test``)."""
    classifier.eval()
    with torch.no_grad():
        embeds = [torch.cat([classifier.encode_image(x) for x in pixel_batches(getattr(task, split))])
                  for task in tasks]  # fmt: skip
    labels = [torch.as_tensor(getattr(task, split)["label"]) for task in tasks]
    return torch.cat(embeds), torch.cat(labels), torch.cat([torch.full_like(y, k) for k, y in enumerate(labels)])


def class_means(embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(C, D)``: the mean of each class's rows of ``embeds`` ``(N, D)``, ``C = labels.max() + 1``."""
    return torch.stack([embeds[labels == c].mean(0) for c in range(int(labels.max()) + 1)])


def fit_class_vectors(embeds: torch.Tensor, labels: torch.Tensor, scale: float, steps: int = 300) -> torch.Tensor:
    """Unit class vectors ``(C, D)`` (``C = labels.max() + 1``) minimising the cross-entropy of
    ``scale * embeds @ W^T`` over the normalised ``embeds`` ``(N, D)``; L-BFGS from the class means."""
    weights = class_means(embeds, labels).double().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weights], max_iter=steps, line_search_fn="strong_wolfe")
    x = embeds.double()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(scale * x @ F.normalize(weights, dim=1).T, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return F.normalize(weights.detach(), dim=1).to(embeds.dtype)


def wrong(vectors: torch.Tensor, embeds: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of the rows ``(N, D)`` whose most similar class vector ``(C, D)`` is not their label's."""
    return 100 * ((embeds @ vectors.T).argmax(1) != labels).double().mean().item()


def choose_scale(embeds: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor) -> float:
    """The scale of ``SCALES`` whose class vectors, fitted on three quarters of the training rows ``(N, D)`` of each
    class, put the fewest of the other quarter's ``scored`` ``(N,)`` rows on another class (the first on a tie):
    chosen on training images only."""
    quarter = torch.zeros(len(labels), dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    for label in labels.unique():
        rows = torch.nonzero(labels == label).squeeze(1)
        quarter[rows[torch.randperm(len(rows), generator=generator)[::4]]] = True
    check = quarter & scored
    errors = [wrong(fit_class_vectors(embeds[~quarter], labels[~quarter], scale), embeds[check], labels[check])
              for scale in SCALES]  # fmt: skip
    return SCALES[errors.index(min(errors))]


def class_vector_bounds(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], old: torch.Tensor,
    logit_scale: float,
) -> dict[str, float]:  # fmt: skip
    """``trained`` (with its ``scale``), ``model_scale``, ``fitted`` and ``nearest_mean`` (module docstring) in
    percent of the ``old`` ``(N,)`` rows of ``test``, from the normalised embeddings ``(N, D)`` and labels ``(N,)``
    of every class's training and test images."""
    (train_x, train_y), (test_x, test_y) = train, test
    if not old.any() or old.all():
        raise ValueError("the scored (old) rows must be some, not none or all, of the test images")
    if set(train_y.tolist()) != set(range(int(train_y.max()) + 1)):
        raise ValueError("every class from 0 to the largest label needs training images")
    scored = test_x[old], test_y[old]
    scale = choose_scale(train_x, train_y, torch.isin(train_y, test_y[old].unique()))
    return {
        "trained": wrong(fit_class_vectors(train_x, train_y, scale), *scored),
        "scale": scale,
        "model_scale": wrong(fit_class_vectors(train_x, train_y, logit_scale), *scored),
        "fitted": min(wrong(fit_class_vectors(test_x, test_y, scale), *scored) for scale in SCALES),
        "nearest_mean": wrong(class_means(train_x, train_y), *scored),
    }


def check_the_run(results: dict[str, Any], loaded: ContinualModel, tasks: TaskSequence, where: Path) -> None:
    """Refuse a checkpoint that does not reproduce its run: its tasks must be those rebuilt here (or all their
    classes in one task, a joint run), and the loaded model's class-incremental accuracy on each of its tasks' test
    sets must be the one ``results.json`` recorded after the last task (to 0.01)."""
    recorded = [sorted(classes) for classes in results["task_classes"]]
    groups = [[task] for task in tasks]
    if recorded == [sorted(c for task in tasks for c in task.classes)]:
        groups = [list(tasks)]  # a joint run: one task of every class
    if recorded != [sorted(c for task in group for c in task.classes) for group in groups]:
        raise ValueError(f"{where}: the run's classes {recorded} are not the tasks rebuilt here "
                         f"{[list(task.classes) for task in tasks]}: pass runs of benchmarks/clip_reference.py made "
                         "with its default data")  # fmt: skip
    last = [row[-1] for row in results["class_incremental"]["matrix"]]
    for index, group in enumerate(groups):
        predicted = torch.cat([loaded.predict({"pixel_values": x}) for task in group for x in pixel_batches(task.test)])
        truth = torch.tensor([label for task in group for label in task.test["label"]])
        accuracy = 100 * (predicted == truth).float().mean().item()
        if abs(accuracy - last[index]) > 0.01:
            raise ValueError(f"{where}: the checkpoint gives {accuracy:.2f}% on task {index + 1} where the run "
                             f"recorded {last[index]:.2f}%: it was made by another install, alignment or seed; rerun "
                             "it here")  # fmt: skip


def pixel_batches(split: Any, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The ``(B, 3, H, W)`` pixel values of ``split``'s rows (a data set with its image transform), batch by
    batch."""
    for start in range(0, len(split), batch_size):
        rows = split[start : start + batch_size]["pixel_values"]
        yield torch.as_tensor(np.stack([np.asarray(p) for p in rows]), dtype=torch.float32)


def runs_parser(description: str | None, output_dir: str) -> argparse.ArgumentParser:
    """The flags of a benchmark that reads finished runs of ``benchmarks/clip_reference.py``: ``--runs``,
    ``--output_dir`` (default ``output_dir``) and ``--smoke``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="output folders of benchmarks/clip_reference.py")
    parser.add_argument("--output_dir", default=output_dir)
    parser.add_argument("--smoke", action="store_true", help="the runs of clip_reference.py --smoke")
    return parser


def finished_runs(roots: list[Path]) -> list[tuple[str, int, str, Path]]:
    """``(setting, order, method, run folder)`` of every finished run under ``roots``, sorted."""
    found = []
    for root in roots:
        for results in sorted(root.glob("*/order*/*/results.json")):
            folder = results.parent
            setting, order = folder.parent.parent.name, int(folder.parent.name.removeprefix("order"))
            if setting not in SETTINGS:
                raise ValueError(f"{folder}: {setting!r} is not a setting of benchmarks/clip_reference.py")
            if folder.name not in SETTINGS[setting][1]:
                raise ValueError(f"{folder}: setting {setting!r} of benchmarks/clip_reference.py has no method "
                                 f"{folder.name!r}")  # fmt: skip
            if any(run[:3] == (setting, order, folder.name) for run in found):
                raise ValueError(f"{folder}: run {setting}/order{order}/{folder.name} is in two of --runs")
            found.append((setting, order, folder.name, folder))
    if not found:
        raise ValueError(f"no finished run (<runs>/<setting>/order<k>/<method>/results.json) under {roots}")
    return found


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = split_flags(argv)
    options = runs_parser(__doc__, "outputs/clip_separability").parse_args(own)
    found = finished_runs([Path(root) for root in options.runs])
    rows = []
    for order in sorted({order for _, order, _, _ in found}):
        flags = ["--class_order_seed", str(order), "--output_dir", options.output_dir,
                 *(SMOKE if options.smoke else []), *passthrough]  # fmt: skip
        script, args = crossmodal.parse_args(flags)
        prepared = crossmodal.prepare(script, args.seed)
        if len(prepared.tasks) < 2:
            raise ValueError("the old images are those of every rebuilt task but the last: the rebuilt sequence needs "
                             "at least 2 tasks (leave --num_tasks 1 out of the flags)")  # fmt: skip
        models: list[tuple[dict[str, Any], CLIPForClassNameClassification]] = []
        for setting, _, method, folder in (run for run in found if run[1] == order):  # every run checked first
            results = json.loads((folder / "results.json").read_text())
            loaded = ContinualModel.from_pretrained(latest_task_checkpoint(folder), copy.deepcopy(prepared.classifier))
            check_the_run(results, loaded, prepared.tasks, folder)
            row = {"label": SETTINGS[setting][1][method], "setting": setting, "method": method, "seed": order,
                   "hallucination": results["task_metrics"][-1].get("hallucination_rate")}  # fmt: skip
            model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
            models.append((row, model))
        aligned = {"label": ALIGNED, "setting": None, "method": None, "seed": order, "hallucination": None}
        for row, classifier in [(aligned, prepared.classifier), *models]:
            train = embed_tasks(classifier, prepared.tasks, "train")[:2]
            test_x, test_y, task_of = embed_tasks(classifier, prepared.tasks, "test")
            scale = classifier.clip.logit_scale.exp().item()
            bounds = class_vector_bounds(train, (test_x, test_y), task_of < len(prepared.tasks) - 1, scale)
            rows.append({**row, "logit_scale": scale, **bounds})
    text = labelled_table(rows, COLUMNS, "model")
    save_grid(options.output_dir, rows, text)
    print(f"\nOld test images put on another class, {len(rows)} models\n\n{text}")
    return rows


if __name__ == "__main__":
    main()
