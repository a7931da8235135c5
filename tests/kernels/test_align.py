"""kernels.align (kernels/alignment.py): the invariants of the sorted, padded slot layout, on awkward routings."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels import align, align_reference  # noqa: E402

ROUTINGS = {
    "random": lambda: torch.randint(0, 6, (7, 2)),
    "all on one expert": lambda: torch.full((9, 2), 3),
    "experts with no tokens": lambda: torch.tensor([[0, 5], [5, 0], [0, 5]]),
    "one token, K=1": lambda: torch.tensor([[2]]),
    "T not a power of two, E=5": lambda: torch.randint(0, 5, (13, 3)),
}


@pytest.mark.parametrize("name", ROUTINGS)
@pytest.mark.parametrize("block_m", [16, 32])
def test_alignment_invariants(name, block_m):
    torch.manual_seed(1)
    ids = ROUTINGS[name]()
    e = 6
    t, k = ids.shape
    a = align(ids, e, block_m)
    slots, total = a.sorted_slots, int(a.total)
    assert int(a.counts.sum()) == t * k and torch.equal(a.counts, torch.bincount(ids.flatten(), minlength=e).int())
    assert total % block_m == 0
    real = slots[slots != a.sentinel]
    assert sorted(real.tolist()) == list(range(t * k))  # every slot exactly once
    assert torch.all(slots[total:] == a.sentinel)  # nothing past the used blocks
    flat = ids.flatten()
    for b in range(total // block_m):
        block = slots[b * block_m : (b + 1) * block_m]
        mine = block[block != a.sentinel]
        assert len(mine) > 0 and torch.all(flat[mine.long()] == a.block_expert[b])  # one expert per block
        assert torch.all(block[len(mine):] == a.sentinel)  # padding only at a run's end
    assert torch.all(a.block_expert[total // block_m :] == -1)
    ref = align_reference(ids, e, block_m)
    assert torch.equal(a.block_expert, ref.block_expert) and int(ref.total) == total


def test_gather_then_scatter_is_the_identity():
    torch.manual_seed(2)
    t, k, h = 11, 3, 8
    ids = torch.randint(0, 4, (t, k))
    x = torch.randn(t, h)
    a = align(ids, 4, 16)
    valid = a.sorted_slots != a.sentinel
    slot = a.sorted_slots[valid].long()
    gathered = x[slot // k]  # [S, H] in expert order
    back = torch.zeros(t * k, h).index_copy_(0, slot, gathered).view(t, k, h)
    assert torch.equal(back, x[:, None, :].expand(t, k, h))
