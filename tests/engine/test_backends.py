"""The native CPU decode backend equals the module-by-module path, for every weight layout; it
follows the weights when they change, and only then; the engine decodes the same on torch alone
(no C compiler)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import engine
from engine import native

PROMPT = list(range(3, 300, 11))


@pytest.fixture
def kernels() -> None:
    if not native.available():
        pytest.skip("no C compiler: there is no native backend")


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


def _count(monkeypatch: pytest.MonkeyPatch, name: str) -> list:
    """Calls of native.<name> from now on, one entry each."""
    calls: list = []
    real = getattr(native, name)
    monkeypatch.setattr(native, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _one_step(net: nn.Module, cache: list) -> torch.Tensor:
    """The logits [1, 1, V] of one decode step after PROMPT, run into `cache`."""
    with torch.inference_mode():
        net(torch.tensor([PROMPT]), cache, 0)
        return net(torch.tensor([[5]]), cache, len(PROMPT))


# Per decode step: native.blocks calls (one per run of blocks it reads whole), blocks run one by
# one (native norms each), and those of them that run native attention.
CALLS = {
    "qwen3_moe": (1, 0, 0),
    "mixtral": (1, 0, 0),
    "qwen3_moe_awkward": (1, 0, 0),  # dense blocks 0, 2 and 3 around sparse block 1, all in the run
    "deepseek_v3": (0, 4, 0),  # latent attention and grouped routing: the modules run them
    "gpt_oss": (1, 0, 0),  # sinks, a sliding window shorter than the prompt, expert biases, the clamped SwiGLU
    "qwen3_5_moe": (1, 0, 0),  # Gated DeltaNet, gated attention with partial RoPE, the gated shared expert
    "qwen3_next": (1, 0, 0),  # the same, Qwen3-Next's grouped projections, a dense layer 1
    "glm4_moe": (1, 0, 0),  # grouped sigmoid routing, shared experts, partial RoPE, a dense first layer
    "qwen2_moe": (1, 0, 0),  # q/k/v biases, the gated shared expert
    "olmoe": (1, 0, 0),  # q/k normed over the whole projection, q/k/v clipped
    "minimax_m2": (1, 0, 0),  # whole-projection q/k norms, partial RoPE, grouped sigmoid routing
    "dots1": (1, 0, 0),  # Qwen3's attention, DeepSeek-V3's experts and dense first layer
    "llama": (1, 0, 0),  # dense: the MLP is the block's only feed-forward
    "qwen3": (1, 0, 0),
}
LAYOUTS = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8"), (torch.bfloat16, "int4")]


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize(
    "name", ["qwen3_moe", "mixtral", "qwen3_moe_awkward", "gpt_oss", "qwen3_5_moe", "glm4_moe", "olmoe", "minimax_m2"]
)
@pytest.mark.parametrize(("dtype", "scheme"), LAYOUTS)
def test_fused_step_equals_the_per_block_path(tiny_checkpoint, monkeypatch, name, dtype, scheme) -> None:
    _, path = tiny_checkpoint(name)
    model = engine.load_model(path, dtype=dtype, quantize=scheme, group_size=32)
    fused = _count(monkeypatch, "blocks")
    with_fused = _decode_logits(model)
    assert len(fused) == 6 * CALLS[name][0], "the fused step did not run"
    model.net.fuse_blocks = False  # every block by itself: native norms and attention, the MLP as a module
    per_block = _decode_logits(model)
    assert len(fused) == 6 * CALLS[name][0]
    # The products are the same kernels; the routing softmax, and for the blocks the per-block
    # path runs as modules (gpt-oss's, Qwen3.5's) attention and the delta rule, are C against
    # torch, which differ in the last bits: fp32 summation-order tolerance. int8 and int4 round
    # activations (to int16 per 32, to int8 per group): a last-bit difference upstream can move
    # one of those roundings by a step, measured up to 1.3e-4 (int8, Qwen3.5) and 2.9e-3 (int4,
    # Mixtral) of the largest logit, hence 2e-4 and 1e-2 there. A different token makes every
    # later step differ.
    tolerance = {"int8": 2e-4, "int4": 1e-2}.get(scheme, 1e-4)
    assert (with_fused - per_block).abs().max() <= tolerance * per_block.abs().max()


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize(("dtype", "scheme"), LAYOUTS[:3])
def test_native_step_equals_the_module_path(tiny_checkpoint, monkeypatch, name, dtype, scheme) -> None:
    # int4 is left to the test above: its int8 rounding of activations turns a last-bit
    # difference in a norm into a step of 1/127, and module by module the two paths drift apart
    # (measured up to 1e-1 of the largest logit, a routing choice flipped).
    _, path = tiny_checkpoint(name)
    model = engine.load_model(path, dtype=dtype, quantize=scheme, group_size=32)
    calls = [_count(monkeypatch, fn) for fn in ("blocks", "rmsnorm", "attention")]
    with_backend = _decode_logits(model)
    runs, one_by_one, attention = CALLS[name]
    counts = [len(c) for c in calls]
    assert counts == [6 * runs, 6 * 2 * one_by_one, 6 * attention]
    model.net.native_decode = False  # the reference: module by module (the products still native)
    modules = _decode_logits(model)
    assert [len(c) for c in calls] == counts
    # The products are the same kernels on the same weights; attention, norms and the routing
    # softmax are C against torch, which differ in the last bits: fp32 summation-order tolerance.
    # int8 rounds activations to int16 per 32: a last-bit difference in a norm can move one of
    # those roundings by a step (1/32767 of the chunk's largest value): measured up to 1.0e-4 of
    # the largest logit (DeepSeek, one step of six), hence 2e-4 there.
    tolerance = 2e-4 if scheme == "int8" else 1e-4
    assert (with_backend - modules).abs().max() <= tolerance * modules.abs().max()


@pytest.mark.usefixtures("kernels")
def test_plan_follows_weights_changed_in_place(tiny_checkpoint) -> None:
    # A plan points into the weights; quantizing the loaded model in place swaps them, and the
    # next step on the same cache must use the new ones.
    _, path = tiny_checkpoint("mixtral")
    model = engine.load_model(path)
    cache = model.net.new_cache(1, len(PROMPT) + 1)
    before = _one_step(model.net, cache)
    engine.quantize(model, "int4", group_size=32)
    after = _one_step(model.net, cache)
    loaded = engine.load_model(path, quantize="int4", group_size=32).net
    fresh = _one_step(loaded, loaded.new_cache(1, len(PROMPT) + 1))
    assert (after - before).abs().max() > 1e-3 * before.abs().max()  # the int4 weights are in use...
    assert torch.equal(after, fresh)  # ...exactly as in a model loaded with them


@pytest.mark.usefixtures("kernels")
def test_conversion_rebuilds_the_plan(tiny_checkpoint) -> None:
    # .to(dtype) replaces every weight the plan points into: the next step on the same cache
    # must read the converted ones, exactly as a model loaded in that dtype does.
    _, path = tiny_checkpoint("mixtral")
    net = engine.load_model(path).net
    cache = net.new_cache(1, len(PROMPT) + 1)
    before = _one_step(net, cache)
    net.to(torch.bfloat16)
    after = _one_step(net, cache)
    loaded = engine.load_model(path, dtype=torch.bfloat16).net
    fresh = _one_step(loaded, loaded.new_cache(1, len(PROMPT) + 1))
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh)


@pytest.mark.usefixtures("kernels")
def test_switching_the_experts_backend_rebuilds_the_plan(tiny_checkpoint, monkeypatch) -> None:
    # The fused kernel runs the "cpu" experts itself: on another backend the experts must run as
    # modules (through that backend), and back on "cpu" fuse again.
    _, path = tiny_checkpoint("mixtral")
    model = engine.load_model(path)
    fused = _count(monkeypatch, "blocks")
    cache = model.net.new_cache(1, len(PROMPT) + 1)
    _one_step(model.net, cache)
    assert fused
    model.set_experts_backend("reference")
    fused.clear()
    _one_step(model.net, cache)
    assert not fused
    model.set_experts_backend("cpu")
    _one_step(model.net, cache)
    assert fused


@pytest.mark.usefixtures("kernels")
def test_modules_built_elsewhere_keep_the_plan(tiny_checkpoint) -> None:
    # Building unrelated modules (an embedder, a layer of another model) leaves this model's
    # weights where they are: its plan for a cache is reused, not rebuilt.
    _, path = tiny_checkpoint("mixtral")
    net = engine.load_model(path).net
    cache = net.new_cache(1, len(PROMPT) + 1)
    _one_step(net, cache)
    plan = cache.plan
    nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).register_buffer("unrelated", torch.zeros(1))
    _one_step(net, cache)
    assert cache.plan is plan


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


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("fuse", [True, False])
def test_a_step_past_the_cache_is_refused(tiny_checkpoint, fuse) -> None:
    # The kernels write the new key and value unchecked: a position past the cache used to write
    # past its memory (and abort the process). Fused runs and per-block attention both refuse it.
    _, path = tiny_checkpoint("mixtral")
    net = engine.load_model(path).net
    net.fuse_blocks = fuse
    cache = net.new_cache(1, len(PROMPT) + 1)
    _one_step(net, cache)  # fills PROMPT and writes the last position
    with torch.inference_mode(), pytest.raises(engine.ContextLengthError, match="outside the KV cache"):
        net(torch.tensor([[5]]), cache, len(PROMPT) + 1)
