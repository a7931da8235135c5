"""Every architecture against `transformers` on the same tiny random checkpoint.

Tolerances: fp32 logits within 1e-4 of the reference's largest logit (both sides run the same
math in a different order; the observed gap is ~1e-7), greedy tokens and expert ids exact.
"""

from __future__ import annotations

import pytest
import torch

import engine
from tests.engine.cases import CASES, VOCAB
from tests.engine.checkpoints import RoutingRecorder

NEW_TOKENS = 32


def _prompt(seed: int, batch: int | None = None, length: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (length,) if batch is None else (batch, length)
    return torch.randint(0, VOCAB, shape, generator=gen)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(tiny_checkpoint, name: str) -> None:
    ref, path = tiny_checkpoint(name)
    model = engine.load_model(path)
    tokens = _prompt(1, batch=2)
    with torch.no_grad():
        expected = ref(tokens).logits  # [B, T, V]
    got = model.logits(tokens)
    assert got.shape == (2, tokens.shape[1], VOCAB) and got.dtype == torch.float32
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4, f"{name}: relative logits error {rel:.2e}"
    assert model.logits(tokens[0]).shape == (tokens.shape[1], VOCAB)


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_tokens_match_transformers(tiny_checkpoint, name: str) -> None:
    ref, path = tiny_checkpoint(name)
    model = engine.load_model(path)
    prompt = _prompt(2)
    with torch.no_grad():
        expected = ref.generate(prompt[None], max_new_tokens=NEW_TOKENS, do_sample=False)[0, prompt.numel() :]
    assert model.generate(prompt, max_new_tokens=NEW_TOKENS) == expected.tolist()


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.moe))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_routing_ids_match_transformers(tiny_checkpoint, name: str, backend: str) -> None:
    ref, path = tiny_checkpoint(name)
    model = engine.load_model(path, experts_backend=backend)
    tokens = _prompt(3, length=40)
    theirs, ours = RoutingRecorder(ref), RoutingRecorder(model.net)
    try:
        with torch.no_grad():
            expected = ref(tokens[None]).logits[0]
        got = model.logits(tokens)
    finally:
        theirs.close()
        ours.close()
    assert len(ours.ids) == len(theirs.ids) > 0
    for layer, (a, b) in enumerate(zip(ours.ids, theirs.ids, strict=True)):
        # DeepSeek's reference takes top-k unsorted; the chosen set per token is what must agree.
        assert torch.equal(a.sort(dim=-1).values, b.sort(dim=-1).values), (
            f"{name}: MoE layer {layer} routes differently"
        )
    assert (got - expected).abs().max() / expected.abs().max() < 1e-4


def test_sparse_step_and_mlp_only_layers_follow_config(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("qwen3_moe_awkward")
    model = engine.load_model(path)
    kinds = [type(block.mlp).__name__ for block in model.net.model.layers]
    # decoder_sparse_step=2: layers 1 and 3 would be sparse, but layer 3 is in mlp_only_layers.
    assert kinds == ["MLP", "SparseMoe", "MLP", "MLP"]


def test_deepseek_dense_first_layers_and_shared_experts(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("deepseek_v3")
    model = engine.load_model(path)
    kinds = [type(block.mlp).__name__ for block in model.net.model.layers]
    assert kinds == ["MLP", "MLP", "RoutedMoe", "RoutedMoe"]
    assert model.net.model.layers[2].mlp.shared_experts is not None


def test_bfloat16_stays_close_to_float32(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("qwen3_moe")
    tokens = _prompt(4)
    full = engine.load_model(path).logits(tokens)
    half = engine.load_model(path, dtype=torch.bfloat16)
    assert half.net.model.embed_tokens.weight.dtype == torch.bfloat16
    got = half.logits(tokens)
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: a few percent of the logit range after a few layers.
    assert (got - full).abs().max() / full.abs().max() < 5e-2


def test_deepseek_correction_bias_stays_float32_in_bfloat16(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("deepseek_v3")
    model = engine.load_model(path, dtype=torch.bfloat16)
    gate = model.net.model.layers[2].mlp.gate
    assert gate.e_score_correction_bias.dtype == torch.float32
    assert gate.weight.dtype == torch.bfloat16
