"""gpt-oss beyond the parity cases: its sliding layers' KV cache keeps only the window, and a prompt
fed in pieces then decoded gives the logits of one forward (tolerance as tests/engine/test_parity.py)."""

from __future__ import annotations

import torch

import engine
from tests.engine.cases import CASES, VOCAB


def test_sliding_layers_cache_only_their_window_and_decode_matches_one_forward(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("gpt_oss")
    net = engine.load_model(path).net
    window = CASES["gpt_oss"].kwargs["sliding_window"]
    cache = net.new_cache(1, 60)
    slots = [layer[0].shape[2] for layer in cache]
    assert slots == [window, 60, window]  # sliding, full, sliding
    tokens = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = net(tokens)  # [1, 60, V]
        # pieces shorter and longer than the window, then token by token past the ring's wrap
        parts = [net(tokens[:, :4], cache, 0), net(tokens[:, 4:20], cache, 4), net(tokens[:, 20:23], cache, 20)]
        parts += [net(tokens[:, i : i + 1], cache, i) for i in range(23, 60)]
    got = torch.cat(parts, dim=1)
    assert (got - whole).abs().max() / whole.abs().max() < 1e-4
