"""Measures of a causal language model after each task: per-task answers, and what it still knows in general.

:class:`InstructionEvaluator`, on the test rows of every seen task (:mod:`pegp_hf.language.tasks`):

- ``accuracy``: the option whose tokens (up to the end of the turn) get the highest summed log-probability after the
  prompt is the right one (the model chooses among the task's options: no sampling, no parsing);
- ``exact_match``: greedy decoding writes exactly the right option and ends the turn;
- ``answer_loss``: the mean negative log-likelihood per token of the right answer (lower is better).

:class:`GeneralAbilityEvaluator`, the counterpart of CLIP's zero-shot collapse: on held-out general text and a fixed
set of general instructions, before the sequence and after each task,

- ``general_perplexity`` (and ``general_perplexity_increase`` over its value before the sequence): each text alone,
  without a chat template or a BOS token, every token after the first predicted;
- ``answer_agreement``: how much of each greedy answer (at most ``answer_tokens`` tokens, up to the end of the turn)
  agrees with the model's answer before the sequence, as the share of the common prefix, averaged (%).

Prompts are run in left-padded batches (each token keeps its position through ``position_ids``); the options of a
prompt reuse its key / value cache. Every process runs every pass: the inputs are few, and the figures are then the
same on every rank.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset

from pegp_hf.continual.evaluators import ContinualEvaluator, Evaluation
from pegp_hf.continual.results import MatrixSpec

if TYPE_CHECKING:
    from pegp_hf.trainer import ContinualPEGPTrainer

GENERAL_INSTRUCTIONS = (
    "What is the capital of France?",
    "Name three colors.",
    "Write one sentence about the sea.",
    "How many days are in a week?",
    "What do bees make?",
    "Give a synonym for happy.",
    "What is two plus three?",
    "Describe a cat in five words.",
)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _keeps_last_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def left_padded(sequences: Sequence[Sequence[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` ``(B, T)`` of ``sequences`` padded on the left (with
    token 0, masked), so that every sequence ends at the last column and its tokens keep positions ``0 .. n - 1``."""
    longest = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, longest - len(sequence) :] = torch.tensor(list(sequence), device=device)
        mask[row, longest - len(sequence) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp_min(0)}


@torch.no_grad()
def _prompt_pass(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Any, dict]:
    """One forward pass of the left-padded prompts: the last position's logits ``(B, V)``, the cache and the
    inputs."""
    inputs = left_padded(prompts, _device(model))
    extra = {"logits_to_keep": 1} if _keeps_last_logits(model) else {}
    output = model(**inputs, use_cache=True, **extra)
    return output.logits[:, -1].float(), output.cache, inputs


@torch.no_grad()
def score_options(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], options: Sequence[Sequence[int]], labels: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``B`` prompts sharing ``C`` options: the summed log-probability ``(B, C)`` of each option's tokens after
    each prompt, and whether greedy decoding writes exactly option ``labels[b]`` ``(B,)`` (bool).

    One pass of the prompts; their cache, repeated ``C`` times, serves one pass of the options. Greedy decoding is
    right exactly when every token of the right option is the arg-max after the tokens before it, which the same
    logits tell.
    """
    first, cache, inputs = _prompt_pass(model, prompts)
    count, longest, device = len(options), max(len(o) for o in options), first.device
    tokens = torch.zeros(count, longest, dtype=torch.long, device=device)
    mask = torch.zeros(count, longest, dtype=torch.bool, device=device)
    for row, option in enumerate(options):
        tokens[row, : len(option)] = torch.tensor(list(option), device=device)
        mask[row, : len(option)] = True
    batch = len(prompts)
    log_first = first.log_softmax(-1)
    scores = log_first[:, tokens[:, 0]]  # (B, C)
    greedy = first.argmax(-1)[:, None] == tokens[None, :, 0]  # (B, C): the first token is the arg-max
    if longest > 1:
        cache.batch_repeat_interleave(count)  # rows b0c0, b0c1, ..., b1c0, ...
        fed = tokens[:, :-1].repeat(batch, 1)
        attention = torch.cat(
            [inputs["attention_mask"].repeat_interleave(count, 0), mask[:, :-1].long().repeat(batch, 1)], 1
        )
        start = inputs["position_ids"][:, -1:].repeat_interleave(count, 0) + 1
        positions = start + torch.arange(longest - 1, device=device)
        logits = model(input_ids=fed, attention_mask=attention, position_ids=positions, cache=cache).logits.float()
        logits = logits.view(batch, count, longest - 1, -1)
        following = tokens[None, :, 1:].expand(batch, -1, -1)
        picked = logits.log_softmax(-1).gather(-1, following[..., None]).squeeze(-1)
        scores = scores + (picked * mask[None, :, 1:]).sum(-1)
        agrees = (logits.argmax(-1) == following) | ~mask[None, :, 1:]
        greedy = greedy & agrees.all(-1)
    right = torch.tensor(list(labels), device=device)
    return scores.cpu(), greedy[torch.arange(batch, device=device), right].cpu()


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, prompts: Sequence[Sequence[int]], steps: int) -> list[list[int]]:
    """``steps`` greedy tokens after each prompt, in one batch."""
    logits, cache, inputs = _prompt_pass(model, prompts)
    mask, positions = inputs["attention_mask"], inputs["position_ids"][:, -1:]
    written = []
    for step in range(steps):
        token = logits.argmax(-1, keepdim=True)
        written.append(token)
        if step + 1 == steps:
            break
        mask, positions = torch.cat([mask, torch.ones_like(token)], 1), positions + 1
        logits = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]
    return torch.cat(written, 1).tolist()


def _eval_model(trainer: ContinualPEGPTrainer) -> torch.nn.Module:
    trainer.model.eval()
    return trainer.model


class InstructionEvaluator(ContinualEvaluator):
    """``accuracy``, ``exact_match`` (percent) and ``answer_loss`` (nats per answer token) on the test rows of every
    seen task (see the module docstring). In a trainer, prompts run ``per_device_eval_batch_size`` at a time.

    Args:
        max_examples: score at most this many test rows of each task (the first ones); ``None``: all.
    """

    matrices = (MatrixSpec("accuracy"), MatrixSpec("exact_match"), MatrixSpec("answer_loss", higher_is_better=False))

    def __init__(self, max_examples: int | None = None) -> None:
        self.max_examples = max_examples

    def evaluate(self, model: torch.nn.Module, test: Dataset, batch_size: int = 16) -> tuple[float, float, float]:
        """``(accuracy, exact match, answer loss)`` of ``model`` on ``test`` rows (``prompt_ids``, ``candidate_ids``,
        ``label``; rows with the same options are scored together)."""
        missing = {"prompt_ids", "candidate_ids", "label"} - set(test.column_names)
        if missing:
            raise ValueError(f"instruction test rows need {sorted(missing)}: build the tasks with instruction_tasks")
        rows = test if self.max_examples is None else test.select(range(min(self.max_examples, len(test))))
        rows = list(rows.with_format(None))
        right = exact = 0
        loss = 0.0
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(repr(row["candidate_ids"]), []).append(row)
        for group in groups.values():
            options = group[0]["candidate_ids"]
            for start in range(0, len(group), batch_size):
                part = group[start : start + batch_size]
                labels = [row["label"] for row in part]
                scores, written = score_options(model, [row["prompt_ids"] for row in part], options, labels)
                right += int((scores.argmax(1) == torch.tensor(labels)).sum())
                exact += int(written.sum())
                loss -= sum(float(scores[b, y]) / len(options[y]) for b, y in enumerate(labels))
        return 100.0 * right / len(rows), 100.0 * exact / len(rows), loss / len(rows)

    def after_task(self, trainer: ContinualPEGPTrainer, index: int) -> Evaluation:
        model = _eval_model(trainer)
        columns: dict[str, list[float]] = {"accuracy": [], "exact_match": [], "answer_loss": []}
        batch = trainer.args.per_device_eval_batch_size
        with trainer.autocast_smart_context_manager():
            for task in trainer.tasks[: index + 1]:
                for name, value in zip(columns, self.evaluate(model, task.test, batch), strict=True):
                    columns[name].append(value)
        return Evaluation(columns)


class GeneralAbilityEvaluator(ContinualEvaluator):
    """Perplexity on ``texts`` and agreement of greedy answers to ``instructions`` with those before the sequence
    (see the module docstring). Fills no matrix: its figures go with each task.

    Args:
        tokenizer: the model's tokenizer (with a chat template for the instructions).
        texts: held-out general text, e.g. :func:`pegp_hf.offline.text.load_chitchat`.
        instructions: general questions, answered greedily.
        answer_tokens: the length of each greedy answer compared.
        max_text_tokens: each text is cut to this many tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        texts: Sequence[str],
        instructions: Sequence[str] = GENERAL_INSTRUCTIONS,
        answer_tokens: int = 16,
        max_text_tokens: int = 64,
    ) -> None:
        if not texts and not instructions:
            raise ValueError("GeneralAbilityEvaluator needs general texts, instructions, or both")
        self.answer_tokens = answer_tokens
        self.text_ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_text_tokens] for t in texts]
        self.text_ids = [ids for ids in self.text_ids if len(ids) > 1]  # a single token predicts nothing
        self.prompts = [
            tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for question in instructions
        ]  # fmt: skip
        self.stops = set(tokenizer.all_special_ids)  # an answer ends at its first special token (end of turn)
        self.reference: list[list[int]] | None = None

    @torch.no_grad()
    def perplexity(self, model: torch.nn.Module, batch_size: int = 16) -> float:
        """``exp`` of the mean negative log-likelihood per predicted token over the texts."""
        total, count = 0.0, 0
        for start in range(0, len(self.text_ids), batch_size):
            inputs = left_padded(self.text_ids[start : start + batch_size], _device(model))
            logits = model(**inputs).logits[:, :-1].float()
            following, real = inputs["input_ids"][:, 1:], inputs["attention_mask"][:, :-1].bool()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), following, reduction="none")
            total += float(losses[real].sum())
            count += int(real.sum())
        return math.exp(total / count) if count else math.nan

    def answers(self, model: torch.nn.Module) -> list[list[int]]:
        """The greedy answer of ``model`` to each instruction, cut after its first special token."""
        answers = greedy_answers(model, self.prompts, self.answer_tokens) if self.prompts else []
        return [answer[: next((i + 1 for i, t in enumerate(answer) if t in self.stops), len(answer))]
                for answer in answers]  # fmt: skip

    def _base_answers(self, trainer: ContinualPEGPTrainer) -> list[list[int]]:
        disable = getattr(trainer.model, "disable_adapter", None)
        if disable is None:
            raise ValueError(
                "the answers before the sequence are not stored in checkpoints: on resume they are the base model's, "
                "which only a PEFT model can give (disable_adapter)"
            )
        with disable():
            return self.answers(trainer.model)

    def before_sequence(self, trainer: ContinualPEGPTrainer) -> dict[str, float]:
        model = _eval_model(trainer)
        with trainer.autocast_smart_context_manager():
            self.reference = self.answers(model)
            return {"general_perplexity": self.perplexity(model)} if self.text_ids else {}

    def after_task(self, trainer: ContinualPEGPTrainer, index: int) -> Evaluation:
        model = _eval_model(trainer)
        figures: dict[str, float | None] = {}
        with trainer.autocast_smart_context_manager():
            if self.text_ids:
                figures["general_perplexity"] = self.perplexity(model)
                before = trainer.results.initial_metrics.get("general_perplexity")
                if before is not None:
                    figures["general_perplexity_increase"] = figures["general_perplexity"] - before
            if self.prompts:
                if self.reference is None:  # a resumed run: the answers before the sequence are the base model's
                    self.reference = self._base_answers(trainer)
                shared = [_common_prefix(now, then) / len(then)
                          for now, then in zip(self.answers(model), self.reference, strict=True)]  # fmt: skip
                figures["answer_agreement"] = 100.0 * sum(shared) / len(shared)
        return Evaluation(scalars=figures)


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length
