"""The decoder-only skeleton every architecture fills in: embed -> pre-norm blocks -> norm -> head.

Shapes: B batch, T new tokens, H hidden, V vocabulary.
Module names follow the Hugging Face checkpoints (model.layers.N.self_attn...), so most
checkpoint tensors load by name. The modules are the reference; decode steps on CPU go through
a native backend (engine/backends) that CausalLM builds from its weights and owns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.backends import NativeCPU
from engine.layers import RMSNorm, linear
from engine.rope import Rope

LayerCache = list[torch.Tensor]


class KVCache(list):
    """The per-layer caches [[k, v], ...] of one generation, and the plan a decode backend built
    for them (it points into these tensors), tagged with the backend that built it."""

    plan: tuple[object, list] | None = None


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); the MLP may be dense or a mixture of experts."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, hidden: int, eps: float, *, offset_norms: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps, offset=offset_norms)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset=offset_norms)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None, start: int
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, vocab: int, hidden: int, blocks: list[Block], eps: float, *, offset_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleList(blocks)
        self.norm = RMSNorm(hidden, eps, offset=offset_norm)


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
        offset_norm: bool = False,
    ) -> None:
        super().__init__()
        self.model = Backbone(vocab, hidden, blocks, eps, offset_norm=offset_norm)
        self.lm_head = linear(hidden, vocab)
        if tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = rope  # a plain object: its tables are derived from config.json, not loaded
        self.max_position_embeddings = max_position_embeddings
        # Decode steps on CPU go through the native backend, built from the weights on first use.
        # native_decode False runs them module by module: the reference (its products stay native).
        # fuse_blocks False runs each block by itself: the reference for the fused block kernel.
        self.native_decode = True
        self.fuse_blocks = True
        self._native: NativeCPU | None = None

    @classmethod
    def assemble(
        cls, args: Any, blocks: list[Block], *, rope_dim: int | None = None, offset_norm: bool = False
    ) -> CausalLM:
        """The model around `blocks`, from what every architecture's args hold alike (config.DecoderArgs'
        vocab_size, hidden_size, rms_norm_eps, rope, tie_word_embeddings), with RoPE over `rope_dim`
        dims (default: args.head_dim)."""
        return cls(
            args.vocab_size,
            args.hidden_size,
            blocks,
            eps=args.rms_norm_eps,
            rope=Rope(args.rope, rope_dim or args.head_dim),
            tie_word_embeddings=args.tie_word_embeddings,
            max_position_embeddings=args.rope.max_position_embeddings,
            offset_norm=offset_norm,
        )

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: the weights' one, except fp32 on CPU, which has no bf16/fp16
        arithmetic (bf16 activations would only add a conversion around every product)."""
        weight = self.model.embed_tokens.weight
        return torch.float32 if weight.device.type == "cpu" else weight.dtype

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        device = self.model.embed_tokens.weight.device
        layers = self.model.layers
        return KVCache(block.self_attn.new_cache(batch, max_len, self.compute_dtype, device) for block in layers)

    def weights_changed(self) -> None:
        """Drop what was built from the weights (the native backend points into them); it is rebuilt
        at the next decode step. Call after replacing, moving or converting weights, or switching
        the experts backend."""
        self._native = None

    def _apply(self, fn, recurse=True):  # torch's signature, untyped there too
        self.weights_changed()  # .to(), .float(), ... may move every weight
        return super()._apply(fn, recurse)

    def _native_backend(self, x: torch.Tensor, cache: list[LayerCache] | None) -> NativeCPU | None:
        """The native backend when it runs this step (see NativeCPU.fits), built on first use."""
        if not (self.native_decode and isinstance(cache, KVCache) and NativeCPU.fits(x)):
            return None
        if self._native is None or self._native.fuse != self.fuse_blocks:
            self._native = NativeCPU(self.model.layers, fuse=self.fuse_blocks)
        return self._native

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
        backend = self._native_backend(x, cache)
        if backend is not None:
            x = backend.step(x, cos, sin, cache, start)
        else:
            for i, block in enumerate(self.model.layers):
                x = block(x, cos, sin, None if cache is None else cache[i], start)
        if last_only:
            x = x[:, -1:]  # [B, 1, H]; generation needs only the next-token logits
        return self.lm_head(self.model.norm(x))  # [B, T, V]
