"""Mixture-of-experts modules: routers (nn.Modules so hooks can observe ids) and stacked experts.

Shapes: B batch, T tokens, E experts, K experts per token, H hidden, I expert width.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.experts import EXPERT_BACKENDS
from engine.qmatmul import matmul
from engine.routing import sigmoid_grouped_topk, softmax_topk


class Experts(nn.Module):
    """E SwiGLU experts held stacked; the computation is a backend from EXPERT_BACKENDS."""

    def __init__(self, experts: int, hidden: int, width: int, *, backend: str = "cpu") -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * width, hidden), requires_grad=False)  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, width), requires_grad=False)  # [E, H, I]
        self.backend = backend

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return EXPERT_BACKENDS[self.backend](x, self.gate_up_proj, self.down_proj, weights, ids)  # [T, H]


class SoftmaxRouter(nn.Module):
    """Softmax top-k routing (Qwen3-MoE, Mixtral). Returns (weights [T, K] fp32, ids [T, K])."""

    def __init__(self, experts: int, hidden: int, top_k: int, *, renormalize: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)  # [E, H]
        self.top_k, self.renormalize = top_k, renormalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = matmul(x, self.weight)  # [T, E]
        return softmax_topk(logits, self.top_k, renormalize=self.renormalize)


class SigmoidGroupRouter(nn.Module):
    """DeepSeek-V3 routing: fp32 sigmoid scores, bias for selection, group-limited top-k."""

    def __init__(
        self,
        experts: int,
        hidden: int,
        top_k: int,
        *,
        n_group: int,
        topk_group: int,
        renormalize: bool,
        scaling: float,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)  # [E, H]
        self.e_score_correction_bias = nn.Parameter(torch.empty(experts), requires_grad=False)  # [E], kept fp32
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.renormalize, self.scaling = renormalize, scaling

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = matmul(x.float(), self.weight)  # [T, E]; fp32 as the reference does
        return sigmoid_grouped_topk(
            logits,
            self.top_k,
            bias=self.e_score_correction_bias,
            n_group=self.n_group,
            topk_group=self.topk_group,
            renormalize=self.renormalize,
            scaling=self.scaling,
        )


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
