"""The decoder-only skeleton every architecture fills in: embed -> pre-norm blocks -> norm -> head.

Shapes: B batch, T new tokens, H hidden, V vocabulary.
Module names follow the Hugging Face checkpoints (model.layers.N.self_attn...), so most
checkpoint tensors load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.decode_step import fused_step
from engine.layers import RMSNorm, linear
from engine.rope import Rope

LayerCache = list[torch.Tensor]


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); the MLP may be dense or a mixture of experts."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, hidden: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None, start: int
    ) -> torch.Tensor:
        if cache is not None and x.shape[1] == 1:
            fused = fused_step(self, x, cos, sin, cache, start)  # the whole block in one native call
            if fused is not None:
                return fused
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, vocab: int, hidden: int, blocks: list[Block], eps: float) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(hidden, eps)


class CausalLM(nn.Module):
    """A decoder-only language model; `forward` runs T new tokens after `start` cached ones."""

    def __init__(
        self,
        vocab: int,
        hidden: int,
        blocks: list[Block],
        *,
        eps: float,
        rope: Rope,
        tie_word_embeddings: bool,
        max_position_embeddings: int,
    ) -> None:
        super().__init__()
        self.model = Backbone(vocab, hidden, blocks, eps)
        self.lm_head = linear(hidden, vocab)
        if tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = rope  # a plain object: its tables are derived from config.json, not loaded
        self.max_position_embeddings = max_position_embeddings

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: the weights' one, except fp32 on CPU, which has no bf16/fp16
        arithmetic (bf16 activations would only add a conversion around every product)."""
        weight = self.model.embed_tokens.weight
        return torch.float32 if weight.device.type == "cpu" else weight.dtype

    def new_cache(self, batch: int, max_len: int) -> list[LayerCache]:
        device = self.model.embed_tokens.weight.device
        return [block.self_attn.new_cache(batch, max_len, self.compute_dtype, device) for block in self.model.layers]

    def forward(
        self,
        tokens: torch.Tensor,
        cache: list[LayerCache] | None = None,
        start: int = 0,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] in the model dtype ([B, 1, V] with `last_only`)."""
        x = self.model.embed_tokens(tokens).to(self.compute_dtype)  # [B, T, H]
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)  # [T]
        cos, sin = self.rope.cos_sin(positions, x.dtype)  # [T, D] each
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, None if cache is None else cache[i], start)
        if last_only:
            x = x[:, -1:]  # [B, 1, H]; generation needs only the next-token logits
        return self.lm_head(self.model.norm(x))  # [B, T, V]
