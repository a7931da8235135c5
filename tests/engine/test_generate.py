"""Greedy generation with the KV cache: consistent with full-sequence logits, batched, bounded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import engine
from tests.engine.cases import VOCAB

PROMPT = [5, 17, 200, 3, 99, 42, 7, 256, 31]


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "llama"])
def test_cached_decode_agrees_with_full_recompute(tiny_checkpoint, name: str) -> None:
    _, path = tiny_checkpoint(name)
    model = engine.load_model(path)
    new = model.generate(PROMPT, max_new_tokens=16)
    full = model.logits(PROMPT + new)  # [T, V], no cache
    assert full[len(PROMPT) - 1 : -1].argmax(dim=-1).tolist() == new


def test_batched_generation_equals_one_by_one(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("deepseek_v3")
    model = engine.load_model(path)
    prompts = [PROMPT, [VOCAB - 1 - t for t in PROMPT]]
    batched = model.generate(prompts, max_new_tokens=12)
    assert batched == [model.generate(p, max_new_tokens=12) for p in prompts]


def test_generation_stops_after_eos(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("mixtral")
    model = engine.load_model(path)
    free = model.generate(PROMPT, max_new_tokens=20)
    eos = free[4]
    stopped = model.generate(PROMPT, max_new_tokens=20, eos_token_ids=[eos])
    assert stopped == free[: free.index(eos) + 1]


def test_prompt_longer_than_context_is_refused(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("qwen3")
    short = shutil.copytree(path, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 8
    (short / "config.json").write_text(json.dumps(config))
    model = engine.load_model(short)
    with pytest.raises(engine.ContextLengthError, match="context window of 8|context window is 8"):
        model.generate(PROMPT, max_new_tokens=4)
    with pytest.raises(engine.ContextLengthError):
        model.logits(PROMPT)
    # A prompt that fits gets as many tokens as the window leaves.
    assert len(model.generate(PROMPT[:5], max_new_tokens=10)) == 3


def test_bad_inputs_are_refused(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("qwen3")
    model = engine.load_model(path)
    with pytest.raises(engine.EngineError, match="Token ids must lie"):
        model.logits([1, VOCAB])
    with pytest.raises(engine.EngineError, match="T >= 1"):
        model.logits([])
    with pytest.raises(engine.EngineError, match="Unknown experts backend"):
        model.set_experts_backend("cuda-magic")


def test_logits_are_deterministic_and_independent_of_batch(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("qwen3_moe_awkward")
    model = engine.load_model(path)
    one = model.logits(PROMPT)
    two = model.logits([PROMPT, PROMPT[::-1]])
    assert torch.allclose(two[0], one, rtol=0, atol=1e-5)


def test_checkpoint_eos_is_the_default(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("qwen3_moe")
    free = engine.load_model(path).generate(PROMPT, max_new_tokens=20)
    with_eos = shutil.copytree(path, tmp_path / "eos")
    (with_eos / "generation_config.json").write_text(json.dumps({"eos_token_id": [VOCAB - 1, free[5]]}))
    model = engine.load_model(with_eos)
    assert model.generate(PROMPT, max_new_tokens=20) == free[: free.index(free[5]) + 1]
    assert model.generate(PROMPT, max_new_tokens=20, eos_token_ids=()) == free


def test_repetition_penalty_matches_transformers(tiny_checkpoint) -> None:
    ref, path = tiny_checkpoint("qwen3")
    model = engine.load_model(path)
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        expected = ref.generate(prompt[None], max_new_tokens=24, do_sample=False, repetition_penalty=1.8)
    got = model.generate(PROMPT, engine.SamplingParams(repetition_penalty=1.8), max_new_tokens=24)
    assert got == expected[0, len(PROMPT) :].tolist()
    assert got != model.generate(PROMPT, max_new_tokens=24)  # the penalty changed something


def test_sampling_is_seeded_and_filters_collapse_to_greedy(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("mixtral")
    model = engine.load_model(path)
    greedy = model.generate(PROMPT, max_new_tokens=16)
    hot = engine.SamplingParams(temperature=1.5, seed=7)
    first = model.generate(PROMPT, hot, max_new_tokens=16)
    assert first == model.generate(PROMPT, hot, max_new_tokens=16)
    assert first != greedy
    assert model.generate(PROMPT, engine.SamplingParams(temperature=1.5, top_k=1, seed=1), max_new_tokens=16) == greedy
    assert (
        model.generate(PROMPT, engine.SamplingParams(temperature=1.5, top_p=1e-6, seed=1), max_new_tokens=16) == greedy
    )


def test_sampling_stays_inside_top_k(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("llama")
    model = engine.load_model(path)
    allowed = set(model.logits(PROMPT)[-1].topk(3).indices.tolist())
    for seed in range(8):
        params = engine.SamplingParams(temperature=5.0, top_k=3, seed=seed)
        assert model.generate(PROMPT, params, max_new_tokens=1)[0] in allowed


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0), dict(max_new_tokens=-1)]
)
def test_bad_sampling_params_are_refused(bad: dict) -> None:
    with pytest.raises(engine.EngineError):
        engine.SamplingParams(**bad)


def test_settings_as_keywords_override_the_params_object(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("llama")
    model = engine.load_model(path)
    params = engine.SamplingParams(max_new_tokens=12, eos_token_ids=())
    assert len(model.generate(PROMPT, params)) == 12
    assert model.generate(PROMPT, params, max_new_tokens=5) == model.generate(PROMPT, params)[:5]
    with pytest.raises(engine.EngineError, match="max_new_tokens"):  # a typo names the valid settings
        model.generate(PROMPT, max_tokens=5)
