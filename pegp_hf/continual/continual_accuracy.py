"""``continual_accuracy``: the continual-learning metrics as an ``evaluate`` metric, loaded from the package with no
download.

    import evaluate
    from pegp_hf.continual import CONTINUAL_ACCURACY

    metric = evaluate.load(CONTINUAL_ACCURACY)
    for t in range(T):  # after training task t, every task i <= t is scored
        for i in range(t + 1):
            metric.add_batch(predictions=..., references=..., task=[i] * n, after_task=[t] * n)
    metric.compute()  # {"accuracy_matrix", "acc", "forgetting", "bwt"}, + "fwt" / "intransigence" with references

The same numbers as :mod:`pegp_hf.continual.metrics` on the matrix the predictions make (accuracy in percent).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from pegp_hf.continual.metrics import forward_transfer, intransigence, summarize

_DESCRIPTION = "Accuracy matrix A[i, t] (task i's test set after training task t) and ACC, Forgetting, BWT, FWT, I."
_CITATION = """@inproceedings{lopezpaz2017gem, title={Gradient Episodic Memory for Continual Learning},
  author={Lopez-Paz, David and Ranzato, Marc'Aurelio}, booktitle={NeurIPS}, year={2017}}
@inproceedings{chaudhry2018riemannian, title={Riemannian Walk for Incremental Learning: Understanding Forgetting and
  Intransigence}, author={Chaudhry, Arslan and Dokania, Puneet K. and Ajanthan, Thalaiyasingam and Torr, Philip H. S.},
  booktitle={ECCV}, year={2018}}"""
_KWARGS = """
Args:
    predictions: predicted label ids.
    references: true label ids.
    task: the task ``i`` whose test set each sample belongs to (0-based).
    after_task: the task ``t`` after whose training it was scored (``t >= i``).
    single_task (compute): optional accuracy (percent) of tuning each task alone: adds ``fwt``.
    joint (compute): optional accuracy (percent) of joint training on each task: adds ``intransigence``.
Returns:
    accuracy_matrix: T x T list (None below the diagonal), acc, forgetting, bwt[, fwt][, intransigence].
"""


class ContinualAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        ids = datasets.Value("int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": ids, "references": ids, "task": ids, "after_task": ids}),
        )

    def _compute(self, predictions, references, task, after_task, single_task=None, joint=None) -> dict:
        predictions, references = np.asarray(predictions), np.asarray(references)
        task, after_task = np.asarray(task), np.asarray(after_task)
        if (task > after_task).any() or (task < 0).any():
            raise ValueError("every sample needs 0 <= task <= after_task (a task is scored once it has been trained)")
        size = int(after_task.max()) + 1
        matrix = np.full((size, size), np.nan)
        for i, t in {(int(i), int(t)) for i, t in zip(task, after_task, strict=True)}:
            cell = (task == i) & (after_task == t)
            matrix[i, t] = 100.0 * float(np.mean(predictions[cell] == references[cell]))
        figures = summarize(matrix)  # raises for a cell A[i, t], t >= i, with no sample
        if single_task is not None:
            figures["fwt"] = forward_transfer(matrix, single_task)
        if joint is not None:
            figures["intransigence"] = intransigence(matrix, joint)
        listed = [[None if np.isnan(v) else float(v) for v in row] for row in matrix]
        return {"accuracy_matrix": listed, **figures}
