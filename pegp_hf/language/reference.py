"""A reference set for a chat model: its own conversations before the sequence, for ``reference_dataset``.

What a chat model must keep through continual instruction tuning is what it does when it chats: how it reads a
user's turn and how it writes its answer. :func:`own_conversations` renders general user turns (e.g. chitchat) with
the chat template and lets the pre-trained model answer each one greedily; the rows hold both, so the reference
bases hold the features of the prompts and of the model's own answers. Nothing is trained on them: they only tell
PEGP which features the adapter must leave alone (``docs/method.md``, "Reference protection").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset

from pegp_hf.language.evaluators import greedy_answers


@torch.no_grad()
def own_conversations(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    answer_tokens: int = 16,
    max_text_tokens: int = 32,
    batch_size: int = 16,
) -> Dataset:
    """One row per text: the text (cut to ``max_text_tokens``) as a user turn, then ``model``'s greedy answer of at
    most ``answer_tokens`` tokens, cut after its first special token (the end of turn).

    Returns:
        A data set of ``input_ids``, ``attention_mask`` and ``labels`` (all ``-100``: nothing is learned from it), in
        the layout of :func:`~pegp_hf.language.tasks.instruction_tasks`' training rows.

    Raises:
        ValueError: no text, or a tokenizer without a chat template.
    """
    if not texts:
        raise ValueError("own_conversations needs at least one text")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: the conversations are rendered with it")
    prompts = []
    for text in texts:
        short = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:max_text_tokens]).strip()
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": short}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
        prompts.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    stops = set(tokenizer.all_special_ids)
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        for prompt, answer in zip(batch, greedy_answers(model, batch, answer_tokens), strict=True):
            end = next((i + 1 for i, token in enumerate(answer) if token in stops), len(answer))
            ids = prompt + answer[:end]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(ids)})
    model.train(was_training)
    return Dataset.from_list(rows)
