"""Router math and expert backends on hand-made and awkward inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.experts import EXPERT_BACKENDS
from engine.routing import sigmoid_grouped_topk, softmax_topk


def _grouped_brute_force(logits, bias, k, n_group, topk_group, renormalize, scaling):
    """Official DeepSeek semantics, one token at a time in plain Python."""
    ids, weights = [], []
    per = logits.shape[1] // n_group
    for row in logits.tolist():
        scores = [1 / (1 + torch.exp(torch.tensor(-x)).item()) for x in row]
        choice = [s + b for s, b in zip(scores, bias.tolist(), strict=True)]
        groups = [sum(sorted(choice[g * per : (g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -groups[g])[:topk_group]
        allowed = [e for e in range(len(row)) if e // per in kept]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:k]
        w = [scores[e] for e in chosen]
        if renormalize:
            w = [x / sum(w) for x in w]
        ids.append(chosen)
        weights.append([x * scaling for x in w])
    return torch.tensor(weights), torch.tensor(ids)


def test_excluded_groups_are_never_chosen() -> None:
    # 2 groups of 4. Group 0 holds the single best expert (0) but a weak runner-up; group 1 has
    # two strong experts, so its top-2 sum wins and expert 0 must be masked out.
    logits = torch.tensor([[6.0, -6.0, -6.0, -6.0, 3.0, 3.0, -1.0, -2.0]])
    weights, ids = sigmoid_grouped_topk(
        logits, 2, bias=torch.zeros(8), n_group=2, topk_group=1, renormalize=False, scaling=1.0
    )
    assert sorted(ids[0].tolist()) == [4, 5]
    assert torch.allclose(weights[0], torch.sigmoid(torch.tensor([3.0, 3.0])))


def test_correction_bias_selects_but_does_not_weight() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # lifts expert 3 into the selection
    weights, ids = sigmoid_grouped_topk(logits, 2, bias=bias, n_group=1, topk_group=1, renormalize=False, scaling=2.5)
    assert ids[0].tolist() == [3, 0]
    assert torch.allclose(weights[0], 2.5 * torch.sigmoid(torch.tensor([-1.0, 2.0])))


@pytest.mark.parametrize("n_group,topk_group,k", [(1, 1, 3), (4, 2, 4), (8, 3, 6), (4, 4, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_topk_matches_brute_force(n_group: int, topk_group: int, k: int, renormalize: bool) -> None:
    torch.manual_seed(n_group * 10 + k)
    logits, bias = torch.randn(37, 32), torch.randn(32) * 0.3
    weights, ids = sigmoid_grouped_topk(
        logits, k, bias=bias, n_group=n_group, topk_group=topk_group, renormalize=renormalize, scaling=1.5
    )
    want_w, want_ids = _grouped_brute_force(logits, bias, k, n_group, topk_group, renormalize, 1.5)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(weights, want_w, atol=1e-6)


def test_softmax_topk_renormalization() -> None:
    torch.manual_seed(0)
    logits = torch.randn(9, 8)
    weights, ids = softmax_topk(logits, 3, renormalize=True)
    assert torch.allclose(weights.sum(-1), torch.ones(9))
    raw, raw_ids = softmax_topk(logits, 3, renormalize=False)
    assert torch.equal(ids, raw_ids) and torch.equal(ids, logits.topk(3).indices)
    assert torch.all(raw.sum(-1) < 1)


def _dense_moe(x, w13, w2, weights, ids):
    """Every expert on every token, combined with a dense [T, E] weight matrix."""
    gate_up = torch.einsum("th,eih->tei", x, w13)  # [T, E, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.einsum("tei,ehi->teh", F.silu(gate) * up, w2)  # [T, E, H]
    dense = torch.zeros(x.shape[0], w13.shape[0]).scatter_add_(1, ids, weights)  # [T, E]
    return torch.einsum("te,teh->th", dense, y)


AWKWARD = {
    "one_token": lambda t, e, k: torch.randperm(e)[:k][None],
    "all_on_one_expert_k1": lambda t, e, k: torch.full((t, 1), 3),
    "unused_experts": lambda t, e, k: torch.stack([torch.randperm(3)[:k] for _ in range(t)]),
    "odd_shapes": lambda t, e, k: torch.stack([torch.randperm(e)[:k] for _ in range(t)]),
}


@pytest.mark.parametrize("backend", sorted(EXPERT_BACKENDS))
@pytest.mark.parametrize("case", sorted(AWKWARD))
def test_expert_backends_match_dense_definition(backend: str, case: str) -> None:
    torch.manual_seed(len(case))
    e, h, i, k = 7, 24, 10, 2
    ids = AWKWARD[case](13, e, k)
    t = ids.shape[0]
    x = torch.randn(t, h)
    w13, w2 = torch.randn(e, 2 * i, h) * 0.2, torch.randn(e, h, i) * 0.2
    weights = torch.rand(t, ids.shape[1])
    got = EXPERT_BACKENDS[backend](x, w13, w2, weights, ids)
    assert got.shape == (t, h)
    assert torch.allclose(got, _dense_moe(x, w13, w2, weights, ids), atol=1e-5)
