"""The decoder-only skeleton every architecture fills in: embed -> pre-norm blocks -> norm -> head.

Shapes: B batch, T new tokens, H hidden, V vocabulary.
Module names follow the Hugging Face checkpoints (model.layers.N.self_attn...), so most
checkpoint tensors load by name.
"""

from __future__ import annotations

import torch
from torch import nn

from engine import decode_step
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

    def new_cache(self, batch: int, max_len: int) -> decode_step.KVCache:
        device = self.model.embed_tokens.weight.device
        layers = self.model.layers
        return decode_step.KVCache(block.self_attn.new_cache(batch, max_len, self.compute_dtype, device) for block in layers)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (torch's signature)
        decode_step.changed()  # .to(), .float(), ... may move every weight the fused plans point into
        return super()._apply(fn, recurse)

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
        cos, sin = self.rope.span(start, tokens.shape[1], x.dtype, x.device)  # [T, D] each
        if cache is None:
            for block in self.model.layers:
                x = block(x, cos, sin, None, start)
        else:
            x = decode_step.run_blocks(self.model.layers, x, cos, sin, cache, start)
        if last_only:
            x = x[:, -1:]  # [B, 1, H]; generation needs only the next-token logits
        return self.lm_head(self.model.norm(x))  # [B, T, V]
