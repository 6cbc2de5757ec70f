"""Visual prompt tuning (VPT, deep): ``L`` learnable tokens ``p`` (``(L, d)``) at positions ``1 .. L`` of the input
of chosen blocks, right after the CLS token.

At the first chosen block of a stack the tokens are inserted (the sequence grows from ``T`` to ``T + L``), or, with
``insert=False``, they overwrite positions ``1 .. L`` (CoOp-style text prompts: the caller reserves ``L``
placeholder tokens after the first token, so sequence length, causal mask and EOS pooling stay as they are). Deeper
chosen blocks overwrite the same positions with their own prompt. After the last block of the stack inserted tokens
are removed again, so heads that read the CLS or the mean of patch tokens see the usual layout.

PEGP condition: the prompt rows enter the block as tokens, next to the old token inputs ``X``; the update ``delta p``
must be orthogonal to the union of ``span(X)`` and ``span(old p)`` (PGP; the official code sums two PCA bases whose
rows mean different things, we stack the vectors). That union is exactly the block's input sequence after the
prompt is put in, so one hook on the :class:`Prompt` module's output gives the features: ``X p^T`` is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pegp_hf.tuners.base import PETConfig, PETModule, ProtectedTensor, module_output
from pegp_hf.tuners.discovery import find_block_stacks, hidden_size, select_layers


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
        return [ProtectedTensor(f"{name}.prompt", "prompt", self, "prompt", self, module_output)]


def _put_prompt(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """Forward pre-hook of a prompted block: its hidden states go through ``block.pegp_prompt``."""
    prompt: Prompt = block.pegp_prompt
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    if prompt.insert and mask is not None:
        raise ValueError(
            "prompt insertion changes the sequence length, but this block gets an attention mask: use "
            "PromptConfig(insert=False) with placeholder tokens after the first token"
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


def inject_prompts(model: nn.Module, config: PromptConfig) -> None:
    """Add a :class:`Prompt` as ``pegp_prompt`` to the chosen blocks of every matching stack, in place."""
    for _, stack in find_block_stacks(model, config.layers_pattern):
        chosen = select_layers(len(stack), config.layers)
        for position, index in enumerate(chosen):
            block = stack[index]
            insert = config.insert and position == 0
            block.pegp_prompt = Prompt(config.length, hidden_size(block), insert, config.init_std)
            block.register_forward_pre_hook(_put_prompt, with_kwargs=True)
        if config.insert:
            stack[-1].pegp_inserted_tokens = config.length
            stack[-1].register_forward_hook(_remove_inserted)
