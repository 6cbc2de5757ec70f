"""Forward passes outside training, as the trainer's evaluators and its feature pass make them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from transformers import Trainer


@torch.no_grad()
def forward_batches(
    trainer: Trainer,
    loader: Iterable[dict[str, Any]],
    with_labels: bool = False,
    before_forward: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[tuple[dict[str, Any], Any]]:
    """Run every batch of ``loader`` through ``trainer.model`` in eval mode, without gradients, under the trainer's
    autocast; yield ``(inputs, outputs)`` with ``inputs`` on the model's device.

    A model the Trainer has not placed yet (DeepSpeed / FSDP, before ``Trainer.train``) is moved to the trainer's
    device first. ``labels`` stay in ``inputs``; the model gets them only ``with_labels`` (a seq2seq model builds its
    decoder inputs from them). ``before_forward(inputs)`` runs before each forward pass; forward hooks installed on
    the model fire as usual (feature capture).
    """
    parameter = next(trainer.model.parameters(), None)
    if parameter is not None and parameter.device != trainer.args.device and not hasattr(parameter, "to_local"):
        trainer.model.to(trainer.args.device)  # DeepSpeed / FSDP place it only in Trainer.train (e.g. on a resume)
    trainer.model.eval()
    for batch in loader:
        inputs = trainer._prepare_inputs(batch)
        if before_forward is not None:
            before_forward(inputs)
        given = inputs if with_labels else {key: value for key, value in inputs.items() if key != "labels"}
        with trainer.autocast_smart_context_manager():
            outputs = trainer.model(**given)
        yield inputs, outputs


def feature_sample_loader(trainer: Trainer, dataset: Dataset, samples: int, seed: int) -> DataLoader:
    """This process's contiguous share of ``samples`` rows of ``dataset`` (shuffled with ``seed``), in a plain loader
    with the trainer's collator: no padding, so every sample counts once across processes.

    The count is rounded down to a multiple of the process count, so every process runs the same number of forward
    passes (FSDP2 all-gathers in each one) and none is left without samples.

    Raises:
        ValueError: ``dataset`` has fewer rows than there are processes.
    """
    processes = trainer.accelerator.num_processes
    count = min(samples, len(dataset))
    count -= count % processes
    if count == 0:
        raise ValueError(f"a task has {len(dataset)} training samples, fewer than the {processes} processes")
    sample = dataset.shuffle(seed=seed).select(range(count))
    share = sample.shard(processes, trainer.accelerator.process_index, contiguous=True)
    return DataLoader(
        share,
        batch_size=trainer.args.eval_batch_size,
        collate_fn=trainer._get_collator_with_removed_columns(trainer.data_collator, "feature capture"),
        num_workers=trainer.args.dataloader_num_workers,
        pin_memory=trainer.args.dataloader_pin_memory and trainer.args.device.type != "cpu",
    )
