"""The engine with the `triton` experts backend gives the torch backend's logits (tiny random
checkpoints; in Triton's interpreter on CPU, on the GPU when there is one)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_triton_backend_logits_equal_the_torch_backends(tiny_checkpoint, name):
    from engine import load_model

    _, path = tiny_checkpoint(name)
    model = load_model(path, dtype=torch.float32)
    tokens = [3, 17, 42, 5, 99, 7, 11, 2, 64, 30, 8]  # 11 tokens: the grouped-GEMM path
    model.set_experts_backend("cpu")
    want = model.logits(tokens)
    model.set_experts_backend("triton")
    got = model.logits(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # decode steps (one token at a time) go through the sort-free path
    with_triton = model.generate(tokens, max_new_tokens=4, eos_token_ids=())
    model.set_experts_backend("cpu")
    assert with_triton == model.generate(tokens, max_new_tokens=4, eos_token_ids=())


def test_int4_experts_on_triton_say_what_to_do(tiny_checkpoint):
    from engine import EngineError, load_model

    _, path = tiny_checkpoint("qwen3_moe")
    model = load_model(path, dtype=torch.bfloat16, quantize="int4", group_size=32)
    model.set_experts_backend("triton")
    with pytest.raises(EngineError, match="experts_backend='cpu'"):
        model.logits([1, 2, 3])
