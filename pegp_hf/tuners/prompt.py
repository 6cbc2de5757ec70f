"""Visual prompt tuning (VPT, deep): ``L`` learnable tokens ``p`` (``(L, d)``) at positions ``1 .. L`` of the input
of chosen blocks, right after the CLS token.

At the first chosen block of a stack the tokens are inserted (the sequence grows from ``T`` to ``T + L``), or, with
``insert=False``, they overwrite positions ``1 .. L`` (CoOp-style text prompts: the caller reserves ``L``
placeholder tokens after the first token, so sequence length, causal mask and EOS pooling stay as they are). Deeper
chosen blocks overwrite the same positions with their own prompt. After the last block of the stack inserted tokens
are removed again, so heads that read the CLS or the mean of patch tokens see the usual layout.

PEGP condition: the prompt rows enter the block as tokens, next to the old token inputs ``X``; the update ``delta p``
must be orthogonal to the union of ``span(X)`` and ``span(old p)`` (PGP; the official code sums two PCA bases whose
rows mean different things, we stack the vectors). That union is the block's input sequence after the prompt is put
in, so one hook on the :class:`Prompt` module's output gives the features: ``X p^T`` is kept. The ``L`` prompt rows
are few and start small next to ``T`` tokens, so an energy threshold would drop them: the features scale the prompt
rows of each batch to the tokens' total energy, and the two spans enter the basis with equal weight (at eps 0.97 at
most 6% of either part's energy is left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from pegp_hf.core.protected import ProtectedTensor
from pegp_hf.tuners.base import Attachment, PETConfig, PETModule, check_not_adapted
from pegp_hf.tuners.discovery import find_block_stacks, hidden_size, select_layers
from pegp_hf.tuners.registry import register_tuner


@dataclass
class PromptConfig(PETConfig):
    """Deep visual prompts.

    Attributes:
        length: prompt tokens ``L`` per block (PEGP: 10).
        insert: insert the tokens after the first one (vision); ``False``: overwrite positions ``1 .. L``, for inputs
            that hold ``L`` placeholder tokens there (text towers: CoOp context tokens before the class name).
        init_std: standard deviation of the normal initialisation.
    """

    pet_type = "prompt"
    length: int = 10
    insert: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length must be at least 1, got {self.length}")


class Prompt(PETModule):
    """``L`` prompt tokens for one block: ``forward`` puts them into the block's input ``(B, T, d)``."""

    def __init__(self, length: int, dim: int, insert: bool, init_std: float) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(length, dim) * init_std)
        self.insert = insert

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, T, d)`` -> ``(B, T + L, d)`` when inserting, else ``(B, T, d)`` with rows ``1 .. L`` replaced."""
        batch, length = hidden_states.shape[0], self.prompt.shape[0]
        tokens = self.prompt.to(hidden_states.dtype).expand(batch, -1, -1)
        if self.insert:
            return torch.cat([hidden_states[:, :1], tokens, hidden_states[:, 1:]], dim=1)
        if hidden_states.shape[1] < 1 + length:
            raise ValueError(f"a sequence of {hidden_states.shape[1]} tokens has no room for {length} prompt tokens")
        return torch.cat([hidden_states[:, :1], tokens, hidden_states[:, 1 + length :]], dim=1)

    def protected_tensors(self, name: str) -> list[ProtectedTensor]:
        if not self.prompt.requires_grad:
            return []
        return [ProtectedTensor(f"{name}.prompt", "prompt", self, "prompt", self, self.tokens_and_prompt_rows)]

    def tokens_and_prompt_rows(self, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Features of the prompt: the block input's token rows ``(B, T, d)`` and its prompt rows ``(B, L, d)``,
        the latter scaled to the same total energy, stacked as ``(B, T + L, d)``."""
        length = self.prompt.shape[0]
        tokens = torch.cat([output[:, :1], output[:, 1 + length :]], dim=1).float()
        rows = output[:, 1 : 1 + length].float()
        scale = (tokens.pow(2).sum() / rows.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
        return torch.cat([tokens, rows * scale], dim=1)


def _put_prompt(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """Forward pre-hook of a prompted block: its hidden states go through ``block.pegp_prompt``."""
    prompt: Prompt = block.pegp_prompt
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    if prompt.insert and (mask is not None or kwargs.get("is_causal")):
        raise ValueError(
            "prompt insertion changes the sequence length, but this block gets an attention mask or is causal (a "
            "text tower): use PromptConfig(insert=False, layers_pattern=...) with placeholder tokens after the first "
            "token"
        )
    if args:
        return (prompt(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": prompt(kwargs["hidden_states"])}


def _remove_inserted(block: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook of a stack's last block: drop the ``block.pegp_inserted_tokens`` tokens after the first."""
    count = block.pegp_inserted_tokens
    hidden = output[0] if isinstance(output, tuple) else output
    hidden = torch.cat([hidden[:, :1], hidden[:, 1 + count :]], dim=1)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def plan_prompts(model: nn.Module, config: PromptConfig) -> list[Attachment]:
    """A :class:`Prompt` as ``pegp_prompt`` on the chosen blocks of every matching stack; with insertion, the stack's
    last block drops the inserted tokens again."""
    attachments = []
    for _, stack in find_block_stacks(model, config.layers_pattern):
        for position, index in enumerate(select_layers(len(stack), config.layers)):
            block, insert = stack[index], config.insert and position == 0
            check_not_adapted(block, "pegp_prompt")
            build = partial(Prompt, config.length, hidden_size(block), insert, config.init_std)
            install = partial(_install, last=stack[-1] if insert else None, length=config.length)
            attachments.append(Attachment(block, "pegp_prompt", build, install))
    return attachments


def _install(block: nn.Module, last: nn.Module | None, length: int) -> None:
    block.register_forward_pre_hook(_put_prompt, with_kwargs=True)
    if last is not None:
        last.pegp_inserted_tokens = length
        last.register_forward_hook(_remove_inserted)


register_tuner(PromptConfig, plan_prompts, size_field="length")
