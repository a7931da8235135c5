"""Mixture-of-experts modules: routers (nn.Modules so hooks can observe ids) and stacked experts.

Shapes: B batch, T tokens, E experts, K experts per token, H hidden, I expert width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.experts import EXPERT_BACKENDS
from engine.layers import MLP, linear
from engine.qmatmul import matmul
from engine.routing import sigmoid_grouped_topk, softmax_group_topk, softmax_topk


class Experts(nn.Module):
    """E SwiGLU experts held stacked; the computation is a backend from EXPERT_BACKENDS."""

    def __init__(self, experts: int, hidden: int, width: int, *, backend: str = "cpu") -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * width, hidden), requires_grad=False)  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, width), requires_grad=False)  # [E, H, I]
        self.backend = backend

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return EXPERT_BACKENDS[self.backend](x, self.gate_up_proj, self.down_proj, weights, ids)  # [T, H]


def stored(experts: nn.Module, part: str) -> tuple[torch.Tensor, torch.Tensor | None, int | None, Any]:
    """(weight [E, N, stored K], scale, fp8 block, block format) of `part` ("gate_up" or "down") of any
    stored form of Experts: float, int8 / int4 with `*_scale`, fp8 with its `block`, GGUF / MXFP4
    blocks with `*_format`. The one place that knows how those forms name what they hold."""
    return (
        getattr(experts, f"{part}_proj"),
        getattr(experts, f"{part}_scale", None),
        getattr(experts, "block", None),
        getattr(experts, f"{part}_format", None),
    )


def expert_matmul(experts: nn.Module, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """x [R, K] @ expert e's `name` ("gate_up_proj" [2I, H] or "down_proj" [H, I])^T -> [R, N], for any
    stored form of Experts (see `stored`): for architectures whose experts need more than the backends'
    SwiGLU."""
    w, scale, block, fmt = stored(experts, name.removesuffix("_proj"))
    return matmul(x, w[e], None if scale is None else scale[e], block, fmt)


class SoftmaxRouter(nn.Module):
    """Softmax top-k routing (Qwen3-MoE, Mixtral). Returns (weights [T, K] fp32, ids [T, K])."""

    def __init__(self, experts: int, hidden: int, top_k: int, *, renormalize: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)  # [E, H]
        self.top_k, self.renormalize = top_k, renormalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = matmul(x, self.weight)  # [T, E]
        return softmax_topk(logits, self.top_k, renormalize=self.renormalize)


class GroupRouter(nn.Module):
    """DeepSeek-style routing settings: fp32 scores over a router [E, H], top-k limited to the
    `topk_group` best of `n_group` expert groups, optionally renormalized, scaled. Subclasses score."""

    def __init__(
        self, experts: int, hidden: int, top_k: int, *, n_group: int, topk_group: int, renormalize: bool, scaling: float
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)  # [E, H]
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.renormalize, self.scaling = renormalize, scaling

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x.float(), self.weight)  # [T, E]; fp32 as the references do

    def _groups(self) -> dict[str, Any]:
        return dict(
            n_group=self.n_group, topk_group=self.topk_group, renormalize=self.renormalize, scaling=self.scaling
        )


class SigmoidGroupRouter(GroupRouter):
    """DeepSeek-V3 routing: sigmoid scores, a correction bias for selection only. Returns
    (weights [T, K] fp32, ids [T, K])."""

    def __init__(self, experts: int, hidden: int, top_k: int, **groups: Any) -> None:
        super().__init__(experts, hidden, top_k, **groups)
        self.e_score_correction_bias = nn.Parameter(torch.empty(experts), requires_grad=False)  # [E], kept fp32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sigmoid_grouped_topk(self._logits(x), self.top_k, bias=self.e_score_correction_bias, **self._groups())


class SoftmaxGroupRouter(GroupRouter):
    """DeepSeek-V2 routing: softmax scores, greedy or group-limited. Returns (weights [T, K] fp32, ids [T, K])."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return softmax_group_topk(self._logits(x), self.top_k, **self._groups())


class SparseMoe(nn.Module):
    """Router + experts, no shared expert (Qwen3-MoE, Mixtral)."""

    def __init__(self, experts: int, hidden: int, width: int, top_k: int, *, renormalize: bool) -> None:
        super().__init__()
        self.gate = SoftmaxRouter(experts, hidden, top_k, renormalize=renormalize)
        self.experts = Experts(experts, hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [B*T, H]
        weights, ids = self.gate(flat)  # [B*T, K] each
        return self.experts(flat, weights, ids).view(shape)  # [B, T, H]


class SharedExpertMoe(nn.Module):
    """Softmax-routed experts plus one shared expert every token takes, scaled by its own sigmoid
    gate (Qwen2-MoE): routed(x) + sigmoid(x . g) * shared(x)."""

    def __init__(
        self, experts: int, hidden: int, width: int, top_k: int, shared_width: int, *, renormalize: bool
    ) -> None:
        super().__init__()
        self.gate = SoftmaxRouter(experts, hidden, top_k, renormalize=renormalize)
        self.experts = Experts(experts, hidden, width)
        self.shared_expert = MLP(hidden, shared_width)
        self.shared_expert_gate = linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [B*T, H]
        weights, ids = self.gate(flat)  # [B*T, K] each
        shared = torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)  # [B*T, H]
        return (self.experts(flat, weights, ids) + shared).view(shape)  # [B, T, H]


class RoutedMoe(nn.Module):
    """Routed experts behind any router (`gate`: DeepSeek-V3's grouped sigmoid routing, V2's softmax
    one, ...) plus `shared` always-on experts held as one MLP of `shared` x their width, if any
    (DeepSeek-V2/V3, GLM-4.5, MiniMax-M2)."""

    def __init__(self, gate: nn.Module, experts: int, hidden: int, width: int, *, shared: int) -> None:
        super().__init__()
        self.gate = gate
        self.experts = Experts(experts, hidden, width)
        self.shared_experts = MLP(hidden, width * shared) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [B*T, H]
        weights, ids = self.gate(flat)  # [B*T, K] each
        out = self.experts(flat, weights, ids).view(shape)  # [B, T, H]
        return out if self.shared_experts is None else out + self.shared_experts(x)
