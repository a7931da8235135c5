"""Router math: router logits -> (routing weights, expert ids) per token.

Shapes: T tokens, E experts, K experts per token, G expert groups.
Plain torch; the GPU kernels (kernels/) must agree with these on ids exactly.
"""

from __future__ import annotations

import torch


def softmax_topk(logits: torch.Tensor, k: int, *, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE / Mixtral: softmax over all experts in fp32, keep the top k.

    logits [T, E] -> weights [T, K] fp32, ids [T, K] int64 (descending by probability).
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sigmoid_grouped_topk(
    logits: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores; the correction bias steers selection only, never the weights.

    Groups are ranked by the sum of their two best biased scores; experts outside the best
    `topk_group` groups are masked with -inf (official DeepSeek semantics), then the top k
    biased scores are chosen and weighted by their unbiased sigmoid scores.
    logits [T, E] -> weights [T, K] fp32, ids [T, K] int64.
    """
    t, e = logits.shape
    scores = torch.sigmoid(logits.float())  # [T, E]
    choice = scores + bias.float()  # [T, E]
    if n_group > 1:
        per_group = choice.view(t, n_group, e // n_group)  # [T, G, E/G]
        best = min(2, e // n_group)
        group_scores = per_group.topk(best, dim=-1).values.sum(dim=-1)  # [T, G]
        keep_groups = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)  # [T, G]
        expert_mask = group_mask[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)  # [T, E]
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids


def softmax_group_topk(
    logits: torch.Tensor, k: int, *, n_group: int, topk_group: int, renormalize: bool, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax over all experts in fp32; with n_group > 1 ("group_limited_greedy") only
    the `topk_group` groups with the highest single score compete; the top k scores, optionally
    renormalized, times `scaling`. logits [T, E] -> weights [T, K] fp32, ids [T, K] int64."""
    t, e = logits.shape
    scores = torch.softmax(logits.float(), dim=-1)  # [T, E]
    if n_group > 1:
        group_scores = scores.view(t, n_group, e // n_group).amax(dim=-1)  # [T, G]
        keep_groups = torch.topk(group_scores, topk_group, dim=-1).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)  # [T, G]
        scores = scores.masked_fill(~group_mask.repeat_interleave(e // n_group, dim=1), 0.0)
    weights, ids = torch.topk(scores, k, dim=-1)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids
