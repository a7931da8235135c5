"""kernels.route against its torch reference (and the engine's router): ids exactly, weights to
fp32 rounding (1e-6: the kernel and torch sum the same few numbers in another order)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels import route, route_reference  # noqa: E402

CASES = [  # T, E, K, scoring, renormalize, n_group, topk_group, bias, scaling
    (5, 8, 2, "softmax", True, 1, 1, False, 1.0),  # Qwen3 / Mixtral
    (7, 13, 3, "softmax", False, 1, 1, False, 1.0),  # E not a power of two, no renormalization
    (3, 6, 1, "softmax", True, 1, 1, False, 1.0),  # K = 1
    (4, 5, 5, "softmax", True, 1, 1, False, 1.0),  # K = E
    (6, 32, 4, "sigmoid", True, 8, 3, True, 2.5),  # DeepSeek-V3 shape in miniature
    (9, 16, 2, "sigmoid", True, 4, 1, True, 1.0),  # a single group kept
    (3, 16, 6, "sigmoid", False, 2, 2, False, 1.0),
]


@pytest.mark.parametrize("case", CASES)
def test_route_matches_the_reference(case):
    t, e, k, scoring, renorm, n_group, topk_group, with_bias, scaling = case
    torch.manual_seed(t * 100 + e)
    logits = torch.randn(t, e)
    bias = torch.randn(e) * 0.5 if with_bias else None
    args = dict(top_k=k, scoring=scoring, renormalize=renorm, n_group=n_group, topk_group=topk_group, bias=bias,
                scaling=scaling)
    w, ids = route(logits, **args)
    rw, rids = route_reference(logits, **args)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-6)


def test_grouped_routing_masks_the_other_groups():
    # Group 0 holds the single best expert but its second best is poor; groups 1 and 2 win on
    # the sum of their two best, so expert 0 must not be chosen (DeepSeek's -inf masking).
    logits = torch.full((1, 16), -4.0)
    logits[0, 0] = 6.0
    logits[0, 4:6] = torch.tensor([3.0, 3.0])
    logits[0, 8:10] = torch.tensor([2.5, 2.5])
    w, ids = route(logits, top_k=3, scoring="sigmoid", n_group=4, topk_group=2)
    assert 0 not in ids.tolist()[0] and set(ids.tolist()[0]) <= {4, 5, 6, 7, 8, 9, 10, 11}


def test_ties_go_to_the_lowest_expert_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    _, ids = route(logits, top_k=2)
    _, rids = route_reference(logits, top_k=2)
    assert torch.equal(ids, rids) and ids.tolist() == [[1, 2], [0, 1]]


def test_agrees_with_the_engines_router():
    from engine.routing import sigmoid_grouped_topk, softmax_topk

    torch.manual_seed(0)
    logits, bias = torch.randn(7, 32), torch.randn(32) * 0.3
    w, ids = route(logits, top_k=4, scoring="sigmoid", n_group=8, topk_group=3, bias=bias, scaling=2.5)
    ew, eids = sigmoid_grouped_topk(logits, 4, bias=bias, n_group=8, topk_group=3, renormalize=True, scaling=2.5)
    assert torch.equal(ids.long(), eids)
    torch.testing.assert_close(w, ew)
    w, ids = route(logits, top_k=8, renormalize=False)
    ew, eids = softmax_topk(logits, 8, renormalize=False)
    assert torch.equal(ids.long(), eids)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="top_k"):
        route(torch.randn(2, 4), top_k=5)
    with pytest.raises(ValueError, match="powers of two"):
        route(torch.randn(2, 24), top_k=2, scoring="sigmoid", n_group=3, topk_group=1)
    with pytest.raises(ValueError, match="scoring"):
        route(torch.randn(2, 4), top_k=2, scoring="relu")
