"""Fused routing: router logits -> (top-k weights, top-k expert ids), one program per token.

Data flow (T tokens, E experts, K per token, G groups):
    logits [T, E] --load one row--> scores = softmax(row)            (Qwen3, Mixtral)
                                  | scores = sigmoid(row)            (DeepSeek-V3)
    choice = scores (+ correction bias, sigmoid only: it steers selection, never the weights)
    G > 1: group score = sum of the group's two best choices; keep the best `topk_group` groups,
           the other experts' choices become -inf (official DeepSeek semantics)
    K times: i = argmax(choice), take scores[i], mask i
Ties go to the lowest expert index, in the kernel and in the reference (a stable descending
sort). torch.topk itself promises no order among equal values (on CPU it returned [2, 4] for
three equal maxima at 1, 2, 4), so the reference does not use it for the choice.
    renormalize (optional), times `scaling` -> weights [T, K] fp32, ids [T, K] int32
Grouped routing needs E and G to be powers of two (a row is reshaped to [G, E/G]); every
published grouped config (DeepSeek-V3/R1: E=256, G=8) is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    E, stride_t, scaling,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    valid = offs < E
    x = tl.load(logits_ptr + t * stride_t + offs, mask=valid, other=-float("inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.where(valid, tl.sigmoid(x), 0.0)
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    else:
        ex = tl.where(valid, tl.exp(x - tl.max(x, 0)), 0.0)
        scores = ex / tl.sum(ex, 0)
        choice = scores
    choice = tl.where(valid, choice, -float("inf"))

    if N_GROUP > 1:
        GROUP_SIZE: tl.constexpr = BLOCK_E // N_GROUP
        grouped = tl.reshape(choice, (N_GROUP, GROUP_SIZE))  # [G, E/G]
        col = tl.arange(0, GROUP_SIZE)
        best = tl.argmax(grouped, 1)  # [G]
        group_score = tl.max(grouped, 1)  # [G]
        if GROUP_SIZE > 1:
            second = tl.where(col[None, :] == best[:, None], -float("inf"), grouped)
            group_score += tl.max(second, 1)
        g = tl.arange(0, N_GROUP)
        keep = g < 0  # [G] all False
        for _ in tl.static_range(TOPK_GROUP):
            pick = tl.argmax(group_score, 0)
            keep = keep | (g == pick)
            group_score = tl.where(g == pick, -float("inf"), group_score)
        keep_e = tl.reshape(tl.broadcast_to(keep[:, None], (N_GROUP, GROUP_SIZE)), (BLOCK_E,))  # [E]
        choice = tl.where(keep_e, choice, -float("inf"))

    slots = tl.arange(0, BLOCK_K)
    sel_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    sel_i = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for j in tl.static_range(K):
        i = tl.argmax(choice, 0)
        w = tl.sum(tl.where(offs == i, scores, 0.0), 0)
        sel_w = tl.where(slots == j, w, sel_w)
        sel_i = tl.where(slots == j, i.to(tl.int32), sel_i)
        choice = tl.where(offs == i, -float("inf"), choice)
    if RENORMALIZE:
        sel_w = sel_w / (tl.sum(sel_w, 0) + 1e-20)
    sel_w = sel_w * scaling
    tl.store(weights_ptr + t * K + slots, sel_w, mask=slots < K)
    tl.store(ids_ptr + t * K + slots, sel_i, mask=slots < K)


def _check(logits: torch.Tensor, top_k: int, scoring: str, n_group: int, topk_group: int, bias: torch.Tensor | None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    e = logits.shape[1]
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must lie in [1, {e}], got {top_k}")
    if n_group > 1:
        if scoring != "sigmoid":
            raise ValueError("group-limited routing is DeepSeek's: use scoring='sigmoid'")
        if e % n_group or not 1 <= topk_group <= n_group:
            raise ValueError(f"n_group {n_group} must divide E={e} and 1 <= topk_group <= n_group")
        if e & (e - 1) or n_group & (n_group - 1):
            raise ValueError(f"grouped routing needs E and n_group to be powers of two (E={e}, n_group={n_group})")
    if bias is not None and bias.shape != (e,):
        raise ValueError(f"bias must be [E] = [{e}], got {tuple(bias.shape)}")


def route(
    logits: torch.Tensor,
    *,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    n_group: int = 1,
    topk_group: int = 1,
    bias: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, K] fp32, ids [T, K] int32), in one kernel launch."""
    _check(logits, top_k, scoring, n_group, topk_group, bias)
    logits = logits.contiguous()
    t, e = logits.shape
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    if t == 0:
        return weights, ids
    _route_kernel[(t,)](
        logits, bias if bias is not None else logits, weights, ids,
        e, logits.stride(0), float(scaling),
        K=top_k, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(e),
        SIGMOID=scoring == "sigmoid", HAS_BIAS=bias is not None, N_GROUP=n_group, TOPK_GROUP=topk_group,
        RENORMALIZE=renormalize,
    )
    return weights, ids


def route_reference(
    logits: torch.Tensor,
    *,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    n_group: int = 1,
    topk_group: int = 1,
    bias: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, the same arguments and results (ids as int32)."""
    _check(logits, top_k, scoring, n_group, topk_group, bias)
    t, e = logits.shape
    if scoring == "softmax":
        scores = torch.softmax(logits.float(), dim=-1)  # [T, E]
        choice = scores
    else:
        scores = torch.sigmoid(logits.float())  # [T, E]
        choice = scores + (bias.float() if bias is not None else 0.0)
    if n_group > 1:
        per_group = choice.view(t, n_group, e // n_group)  # [T, G, E/G]
        group_scores = per_group.topk(min(2, e // n_group), dim=-1).values.sum(dim=-1)  # [T, G]
        keep = _top(group_scores, topk_group)  # [T, topk_group]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # [T, G]
        choice = choice.masked_fill(~mask.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = _top(choice, top_k)  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, ids.to(torch.int32)


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row, best first, ties to the lowest index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]
