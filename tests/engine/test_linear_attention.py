"""Qwen3-Next / Qwen3.5 linear attention (Gated DeltaNet) beyond the parity cases: prompts longer
than a chunk, prompts split across calls, decode against one full forward, Qwen3.5's published
(multimodal) layout, and the chunked rule against the token-by-token recurrence it replaces.

Tolerances as tests/engine/test_parity.py: fp32 logits within 1e-4 of the largest logit.
"""

from __future__ import annotations

import json

import pytest
import torch

import engine
from engine.models.qwen3_next import CHUNK, gated_delta_rule
from tests.engine.cases import VOCAB


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def _tokens(seed: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def test_chunked_rule_equals_the_token_by_token_recurrence() -> None:
    # The definition, one token at a time: S <- exp(g) S; u = beta (v - k^T S); S <- S + k u^T; o = q^T S.
    gen = torch.Generator().manual_seed(0)
    b, h, t, dk, dv = 2, 3, 2 * CHUNK + 5, 8, 4  # two whole chunks and a partial one
    q, k = (
        torch.randn(b, h, t, dk, generator=gen),
        torch.nn.functional.normalize(torch.randn(b, h, t, dk, generator=gen), dim=-1),
    )
    v = torch.randn(b, h, t, dv, generator=gen)
    g = -torch.rand(b, h, t, generator=gen)
    beta = torch.rand(b, h, t, generator=gen)
    start = torch.randn(b, h, dk, dv, generator=gen)
    state, want = start.clone(), []
    for i in range(t):
        state = state * g[:, :, i, None, None].exp()
        u = beta[:, :, i, None] * (v[:, :, i] - (k[:, :, i, :, None] * state).sum(-2))
        state = state + k[:, :, i, :, None] * u[:, :, None, :]
        want.append((q[:, :, i, :, None] * state).sum(-2))
    out, final = gated_delta_rule(q, k, v, g, beta, start)
    assert _close(out, torch.stack(want, dim=2)) < 1e-5 and _close(final, state) < 1e-5


@pytest.mark.parametrize("name", ["qwen3_next", "qwen3_5_moe"])
def test_a_prompt_of_several_chunks_matches_transformers(tiny_checkpoint, name: str) -> None:
    ref, path = tiny_checkpoint(name)
    tokens = _tokens(5, 2 * CHUNK + 17)[None]
    with torch.no_grad():
        want = ref(tokens).logits
    assert _close(engine.load_model(path).logits(tokens), want) < 1e-4


def test_prefill_in_pieces_then_decode_equals_one_forward(tiny_checkpoint) -> None:
    # The conv inputs and the recurrent state carry over between calls: a prompt fed as 70 + 30
    # tokens, then 12 decode steps, gives every position the logits of one forward over all 112.
    _, path = tiny_checkpoint("qwen3_next")
    net = engine.load_model(path).net
    tokens = _tokens(6, 112)[None]
    with torch.no_grad():
        whole = net(tokens)  # [1, 112, V]
        cache = net.new_cache(1, 112)
        parts = [net(tokens[:, :70], cache, 0), net(tokens[:, 70:100], cache, 70)]
        parts += [net(tokens[:, i : i + 1], cache, i) for i in range(100, 112)]
    assert _close(torch.cat(parts, dim=1), whole) < 1e-4


def test_qwen3_5_published_multimodal_layout_loads_its_text_model(tiny_checkpoint, tmp_path) -> None:
    # Qwen3.5 ships as a vision-language model: config.json nests the text config, the text
    # weights sit under model.language_model., the vision tower under model.visual.
    from safetensors.torch import load_file, save_file

    ref, path = tiny_checkpoint("qwen3_5_moe")
    tensors = {
        (name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name): w
        for name, w in load_file(str(path / "model.safetensors")).items()
    }
    tensors["model.visual.patch_embed.proj.weight"] = torch.zeros(4, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    text = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "text_config": text}))
    tokens = _tokens(7, 24)[None]
    with torch.no_grad():
        want = ref(tokens).logits
    assert _close(engine.load_model(tmp_path).logits(tokens), want) < 1e-4
