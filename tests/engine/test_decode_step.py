"""The fused native decode step equals the module-by-module path, for every weight layout, and
the engine decodes the same on torch alone (no C compiler)."""

from __future__ import annotations

import pytest
import torch

import engine
import engine.decode_step
from engine import native

PROMPT = list(range(3, 300, 11))


def _decode_logits(model: engine.Model, steps: int = 6) -> torch.Tensor:
    """Logits of `steps` greedy decode steps after PROMPT, with a batch of two sequences."""
    net = model.net
    tokens = torch.tensor([PROMPT, PROMPT[::-1]])  # [B, T]
    cache = net.new_cache(2, len(PROMPT) + steps)
    with torch.inference_mode():
        logits = net(tokens, cache, 0, last_only=True)  # [B, 1, V]
        out = []
        for step in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            logits = net(token, cache, len(PROMPT) + step, last_only=True)
            out.append(logits.float())
    return torch.cat(out, dim=1)  # [B, steps, V]


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize(
    ("dtype", "scheme"), [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8"), (torch.bfloat16, "int4")]
)
def test_fused_step_equals_the_module_path(tiny_checkpoint, monkeypatch, name, dtype, scheme) -> None:
    if not native.available():
        pytest.skip("no C compiler: there is no fused step")
    _, path = tiny_checkpoint(name)
    model = engine.load_model(path, dtype=dtype, quantize=scheme, group_size=32)
    calls = []
    real = native.blocks
    monkeypatch.setattr(native, "blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = _decode_logits(model)
    # Mixtral: every block fits, so one native call per token; Qwen3's dense layers split it.
    assert len(calls) == 6 if name == "mixtral" else calls, "the fused step did not run"
    monkeypatch.setattr(engine.decode_step, "_args", lambda block: None)  # no block fits: module by module
    modules = _decode_logits(engine.load_model(path, dtype=dtype, quantize=scheme, group_size=32))
    # Same kernels in the same order; only the routing softmax (expf vs torch) may differ in the
    # last bits, so fp32 summation-order tolerance. int4 rounds activations to int8 per group: a
    # last-bit difference upstream can move one of those roundings by a step (1/127 of the
    # group's largest value): measured up to 2.9e-3 of the largest logit (Mixtral, one step of
    # six; 1e-6 on the others), hence 1e-2 there. A different token makes every later step differ.
    tolerance = 1e-2 if scheme == "int4" else 1e-4
    assert (fused - modules).abs().max() <= tolerance * modules.abs().max()


def test_fused_plan_follows_weights_changed_in_place(tiny_checkpoint) -> None:
    # A plan points into the weights; quantizing the loaded model in place swaps them, and the
    # next step on the same cache must use the new ones.
    if not native.available():
        pytest.skip("no C compiler: there is no fused step")
    _, path = tiny_checkpoint("mixtral")
    model = engine.load_model(path)
    net, start = model.net, len(PROMPT)

    def step(cache: list) -> torch.Tensor:
        with torch.inference_mode():
            net(torch.tensor([PROMPT]), cache, 0)
            return net(torch.tensor([[5]]), cache, start)

    cache = net.new_cache(1, start + 1)
    before = step(cache)
    engine.quantize(model, "int4", group_size=32)
    after = step(cache)
    fresh = step(net.new_cache(1, start + 1))
    assert (after - before).abs().max() > 1e-3 * before.abs().max()  # the int4 weights are in use...
    assert torch.equal(after, fresh)  # ...exactly as in a plan built for them


@pytest.mark.parametrize(("dtype", "scheme"), [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8")])
def test_torch_alone_decodes_the_same(tiny_checkpoint, monkeypatch, dtype, scheme) -> None:
    # Without a C compiler (or with MOERAG_NATIVE=0) every product runs in torch instead.
    if not native.available():
        pytest.skip("no C compiler: only the torch path exists")
    _, path = tiny_checkpoint("qwen3_moe")
    with_kernels = _decode_logits(engine.load_model(path, dtype=dtype, quantize=scheme))
    monkeypatch.setattr(native, "library", lambda **_: None)
    assert not native.available()
    torch_alone = _decode_logits(engine.load_model(path, dtype=dtype, quantize=scheme))
    # int8: the kernels round activations to int16 per 32 (~2e-5 each); float: summation order.
    assert (with_kernels - torch_alone).abs().max() <= 1e-4 * torch_alone.abs().max()


def test_float16_weights_fall_back_to_torch(tiny_checkpoint) -> None:
    # The kernels read fp32, bf16, int8 and int4; an fp16 model on CPU must still decode.
    _, path = tiny_checkpoint("qwen3_moe")
    half = _decode_logits(engine.load_model(path, dtype=torch.float16))
    full = _decode_logits(engine.load_model(path))
    assert torch.isfinite(half).all()
    assert (half - full).abs().max() <= 2e-2 * full.abs().max()  # fp16's 10-bit mantissa on weights
