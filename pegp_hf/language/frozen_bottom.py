"""Train only the top layers of a decoder on the hidden states of its frozen bottom, computed once per example.

When every trainable weight (the PET) sits in layers ``start ..`` of a decoder, layers ``0 .. start - 1`` compute
the same hidden states for an example in every step, epoch, task and method. :func:`encode_bottom` runs them once
and stores, per row, the hidden states entering layer ``start`` (``inputs_embeds``, ``(T, d)``) with the row's
``position_ids``; :class:`TopLayers` then makes the decoder run from layer ``start`` on them (its ``layers`` list cut
to the top, its embedding skipped because the rows hold ``inputs_embeds``). Rotary positions come from the stored
``position_ids``, so each top layer sees what it would see in the whole model: the logits are the same (tested to
float32 precision), and the top layers' inputs, the features PEGP protects, are the same.

:class:`AnswerOnlyCollator` pads such rows on the left and asks the model for the logits of the last positions
only (``logits_to_keep``), where the answers are: the language-model head, a large share of a small model's cost,
then runs on a few positions instead of all.

The whole model is back in place outside :meth:`TopLayers.active`: evaluation, generation and checkpoints see it as
it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from pegp_hf.tuners.discovery import find_block_stacks


class TopLayers:
    """Switches a causal LM between its whole decoder and its layers ``start ..`` (see the module docstring).

    Raises:
        ValueError: a weight below layer ``start`` (or in the input embeddings) would be trained, or the top layers
            would read another layer's attention type (``config.layer_types``, e.g. Qwen2 / Gemma 2 sliding windows).
    """

    def __init__(self, model: nn.Module, start: int) -> None:
        (stack_name, layers), *others = find_block_stacks(model)
        if others:
            raise ValueError(f"expected one decoder layer stack, found {[stack_name, *(n for n, _ in others)]}")
        if not 0 < start < len(layers):
            raise ValueError(f"start must be between 1 and {len(layers) - 1}, got {start}")
        types = getattr(getattr(model, "config", None), "layer_types", None)
        if types is not None and list(types[start:]) != list(types[: len(layers) - start]):
            raise ValueError(
                f"the decoder picks each layer's attention (full or sliding window) from config.layer_types by its "
                f"place in the stack, and layers {start}.. would read the types of layers 0..: choose a start where "
                f"the pattern repeats ({list(types)})"
            )
        below = {id(p) for p in model.get_input_embeddings().parameters()}
        below |= {id(p) for layer in list(layers)[:start] for p in layer.parameters()}
        trained = [name for name, p in model.named_parameters() if p.requires_grad and id(p) in below]
        if trained:
            raise ValueError(f"only layers {start}.. may train on cached hidden states, but {trained[:3]} would train")
        owner_name, _, self.attribute = stack_name.rpartition(".")
        self.owner, self.start = model.get_submodule(owner_name), start
        self.whole, self.top = layers, nn.ModuleList(list(layers)[start:])

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within: the decoder runs layers ``start ..`` only, on ``inputs_embeds`` rows."""
        setattr(self.owner, self.attribute, self.top)
        try:
            yield
        finally:
            setattr(self.owner, self.attribute, self.whole)


@torch.no_grad()
def encode_bottom(model: nn.Module, dataset: Dataset, start: int, batch_size: int = 16) -> Dataset:
    """``dataset`` (rows with ``input_ids``, ``attention_mask``, ``labels``) with ``input_ids`` replaced by
    ``inputs_embeds``: each row's hidden states entering layer ``start`` of ``model`` ``(T, d)``, float32, and its
    ``position_ids``. Rows are padded on the right: a causal model's real tokens never see the padding after them."""
    model.eval()
    device = next(model.parameters()).device
    sequences = dataset["input_ids"]
    lengths = [len(ids) for ids in sequences]
    states: list[np.ndarray] = []
    for chunk in range(0, len(sequences), batch_size):
        part = sequences[chunk : chunk + batch_size]
        longest = max(len(ids) for ids in part)
        ids = torch.tensor([list(s) + [0] * (longest - len(s)) for s in part], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in part], device=device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[start]
        states += [values[: len(s)] for values, s in zip(hidden.float().cpu().numpy(), part, strict=True)]
    columns = {name: dataset[name] for name in dataset.column_names if name != "input_ids"}
    columns.update(inputs_embeds=states, position_ids=[np.arange(n) for n in lengths])
    return Dataset.from_dict(columns).with_format("torch")


class AnswerOnlyCollator:
    """Pads ``inputs_embeds`` rows on the left (``position_ids`` keep each token's place) and keeps the logits of
    the last ``k`` positions only, ``k`` one more than the longest answer of the batch; ``labels`` are cut to those
    positions, where the model's own loss shifts them as usual. Rows without answers (no label but ``-100``) give
    ``k = 1``."""

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(row["attention_mask"]) for row in rows)
        width = len(rows[0]["inputs_embeds"][0])
        embeds = torch.zeros(len(rows), longest, width)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        positions = torch.zeros(len(rows), longest, dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        answer = 0
        for i, row in enumerate(rows):
            n = len(row["attention_mask"])
            embeds[i, longest - n :] = torch.as_tensor(row["inputs_embeds"], dtype=torch.float32)
            mask[i, longest - n :] = torch.as_tensor(row["attention_mask"])
            positions[i, longest - n :] = torch.as_tensor(row["position_ids"])
            labels[i, longest - n :] = torch.as_tensor(row["labels"])
            kept = torch.nonzero(torch.as_tensor(row["labels"]) != -100)
            answer = max(answer, n - int(kept[0]) if len(kept) else 0)
        keep = answer + 1
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                "labels": labels[:, longest - keep :], "logits_to_keep": keep}  # fmt: skip
