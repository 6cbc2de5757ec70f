"""Instruction tasks for a chat language model, built from labelled text sets.

Each example is rendered with the tokenizer's chat template: a short system message, a user turn holding the
instruction, the task's options and the (truncated) text, and an assistant turn holding the label word::

    <system> Answer with one of the options.
    <user>   Which topic is this news story about?
             Options: earnings, acquisition, oil, ...
             Text: champion products approves stock split ...
    <assistant> earnings<end of turn>

Training rows hold ``input_ids``, ``attention_mask`` and ``labels`` with ``-100`` on the prompt: the loss is on the
answer only (label tokens and the end-of-turn token). Test rows also hold ``prompt_ids``, the ``candidate_ids`` of
every option (its tokens as the assistant turn renders them) and the index ``label`` of the right one, which
:class:`~pegp_hf.language.evaluators.InstructionEvaluator` scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset

from pegp_hf.continual.tasks import ContinualTask, TaskSequence

SYSTEM_MESSAGE = "Answer with one of the options."


@dataclass(frozen=True)
class LabelledText:
    """A labelled text set: ``label_words[y]`` names label ``y``; ``instruction`` asks for one of them.

    Attributes:
        name: the set's name.
        train_texts, train_labels, test_texts, test_labels: the splits (labels index ``label_words``).
        label_words: one answer word per label.
        instruction: what the model is asked, before the options and the text.
    """

    name: str
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_words: list[str]
    instruction: str


def class_subsets(labelled: LabelledText, groups: Sequence[Sequence[int]]) -> list[LabelledText]:
    """``labelled`` cut into one set per group of labels (the class-incremental split of one labelled set); each keeps
    the label words of its group, indexed from 0."""
    subsets = []
    for index, group in enumerate(groups):
        mapping = {label: position for position, label in enumerate(group)}

        def keep(texts: list[str], labels: list[int], mapping: dict[int, int] = mapping) -> tuple[list, list]:
            kept = [(t, mapping[y]) for t, y in zip(texts, labels, strict=True) if y in mapping]
            return [t for t, _ in kept], [y for _, y in kept]

        subsets.append(
            LabelledText(
                f"{labelled.name}-{index + 1}",
                *keep(labelled.train_texts, labelled.train_labels),
                *keep(labelled.test_texts, labelled.test_labels),
                [labelled.label_words[label] for label in group],
                labelled.instruction,
            )
        )
    return subsets


class InstructionRenderer:
    """Renders (instruction, options, text, answer) with a tokenizer's chat template into token ids.

    Args:
        tokenizer: a tokenizer with a chat template.
        max_text_tokens: the text is cut to this many tokens (a long document must not crowd out the rest).
        system_message: the system turn.
    """

    def __init__(self, tokenizer: Any, max_text_tokens: int = 32, system_message: str = SYSTEM_MESSAGE) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: instruction tasks are rendered with it")
        if max_text_tokens < 1:
            raise ValueError(f"max_text_tokens must be at least 1, got {max_text_tokens}")
        self.tokenizer, self.max_text_tokens, self.system_message = tokenizer, max_text_tokens, system_message
        self.trailing = self._trailing_tokens()

    def _trailing_tokens(self) -> int:
        """How many tokens the template puts after an answer's end of turn (ChatML's newline after ``<|im_end|>``,
        Gemma's after ``<end_of_turn>``): the tokens that follow any answer, past the last special token among them
        (the last, as an unknown word may also be a special token). They are neither learned nor scored."""
        tails = []
        for word in ("yes", "no"):
            messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": word}]
            prompt = self._ids(messages[:1], generation_prompt=True)
            tails.append(self._ids(messages, generation_prompt=False)[len(prompt) :])
        common = 0
        while common < min(map(len, tails)) and tails[0][-1 - common] == tails[1][-1 - common]:
            common += 1
        suffix = tails[0][len(tails[0]) - common :]
        special = set(self.tokenizer.all_special_ids)
        end = next((i for i in reversed(range(len(suffix))) if suffix[i] in special), None)
        return 0 if end is None else len(suffix) - end - 1

    def _messages(self, instruction: str, options: Sequence[str], text: str) -> list[dict[str, str]]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_text_tokens]
        short = self.tokenizer.decode(ids).strip()
        user = f"{instruction}\nOptions: {', '.join(options)}.\nText: {short}"
        return [{"role": "system", "content": self.system_message}, {"role": "user", "content": user}]

    def _ids(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def prompt(self, instruction: str, options: Sequence[str], text: str) -> list[int]:
        """The prompt's ids, ending where the assistant's answer starts."""
        return self._ids(self._messages(instruction, options, text), generation_prompt=True)

    def answer(self, prompt_ids: list[int], messages: list[dict[str, str]], answer: str) -> list[int]:
        """The ids of ``answer`` as the assistant turn after ``prompt_ids`` renders it, up to and including the
        template's end-of-turn token (what follows it, such as a newline, is left out)."""
        full = self._ids([*messages, {"role": "assistant", "content": answer}], generation_prompt=False)
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError("the chat template renders the prompt differently once an answer follows it")
        ids = full[len(prompt_ids) :]
        return ids[: len(ids) - self.trailing]

    def example(self, instruction: str, options: Sequence[str], text: str, label: int) -> dict[str, Any]:
        """A test row (see the module docstring); training rows keep its first three columns."""
        messages = self._messages(instruction, options, text)
        prompt = self._ids(messages, generation_prompt=True)
        candidates = [self.answer(prompt, messages, option) for option in options]
        answer = candidates[label]
        return {
            "input_ids": prompt + answer,
            "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [-100] * len(prompt) + answer,
            "prompt_ids": prompt,
            "candidate_ids": candidates,
            "label": label,
        }


def _sample(count: int, size: int, rng: np.random.Generator) -> list[int]:
    return sorted(rng.permutation(count)[: min(size, count)].tolist())


def instruction_tasks(
    sets: Sequence[LabelledText],
    tokenizer: Any,
    train_size: int,
    test_size: int,
    max_text_tokens: int = 32,
    seed: int = 0,
    system_message: str = SYSTEM_MESSAGE,
) -> TaskSequence:
    """One instruction task per labelled set, in order: ``train_size`` / ``test_size`` examples of each drawn with
    ``seed``, rendered with ``tokenizer``'s chat template (see the module docstring).

    The tasks own no classes (their labels are words the model writes), so the trainer trains them with the model's
    own loss; the scenario is domain-incremental (one output space, the vocabulary).

    Raises:
        ValueError: an empty set, a set with fewer than two label words, or a tokenizer without a chat template.
    """
    renderer = InstructionRenderer(tokenizer, max_text_tokens, system_message)
    rng = np.random.default_rng(seed)
    tasks = []
    for labelled in sets:
        if len(labelled.label_words) < 2:
            raise ValueError(f"{labelled.name} has {len(labelled.label_words)} label words: a task needs two or more")
        if not labelled.train_texts or not labelled.test_texts:
            raise ValueError(f"{labelled.name} has an empty train or test split")
        splits = {}
        for split, texts, labels, size in (
            ("train", labelled.train_texts, labelled.train_labels, train_size),
            ("test", labelled.test_texts, labelled.test_labels, test_size),
        ):
            rows = [renderer.example(labelled.instruction, labelled.label_words, texts[i], labels[i])
                    for i in _sample(len(texts), size, rng)]  # fmt: skip
            columns = ["input_ids", "attention_mask", "labels"] if split == "train" else list(rows[0])
            splits[split] = Dataset.from_list([{key: row[key] for key in columns} for row in rows])
        tasks.append(ContinualTask(labelled.name, splits["train"], splits["test"]))
    return TaskSequence(tuple(tasks), scenario="domain_incremental", label_column=None)
