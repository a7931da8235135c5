"""int8 / int4 weight-only quantization: the transform computes with exactly the rounded weights."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.qmatmul import matmul
from engine.quantization import QuantizedExperts, QuantizedLinear
from kernels.formats import MXFP4, Q4_K, quantize, quantize_int4, quantize_int8
from kernels.formats import dequantize as dequantize_reference

PROMPT = list(range(3, 300, 11))


def test_rounding_error_is_at_most_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 48, 64)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (5, 48)
    assert torch.all((w - q.float() * s[..., None]).abs() <= s[..., None] / 2 + 1e-7)


@pytest.mark.parametrize("k", [8, 13, 24, 64, 96])
@pytest.mark.parametrize("m", [3, 40])  # decode (native kernel) and prefill (dequantize + GEMM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_equals_dequantized_product(k: int, m: int, dtype: torch.dtype) -> None:
    # K = 8, 13 and 24 are the shapes on which torch's own fused bf16 int8 kernel misbehaved.
    torch.manual_seed(k)
    q, s = quantize_int8(torch.randn(40, k))
    x = torch.randn(m, k).to(dtype)
    want = x.float() @ (q.float() * s[:, None]).T
    got = matmul(x, q, s).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # int16 activations per 32; bf16's 8-bit mantissa
    assert (got - want).abs().max() <= tol * want.abs().max()


def _dequantized_twin(path, quantized: engine.Model) -> engine.Model:
    """The unquantized model with every quantized weight replaced by q * s."""
    twin = engine.load_model(path)
    modules = dict(twin.net.named_modules())
    for name, module in quantized.net.named_modules():
        if isinstance(module, QuantizedLinear):
            modules[name].weight.copy_(dequantize_reference(module.weight, module.scale))
        elif isinstance(module, QuantizedExperts):
            modules[name].gate_up_proj.copy_(dequantize_reference(module.gate_up_proj, module.gate_up_scale))
            modules[name].down_proj.copy_(dequantize_reference(module.down_proj, module.down_scale))
    return twin


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "llama"])
def test_quantized_model_computes_with_the_rounded_weights(tiny_checkpoint, name: str) -> None:
    _, path = tiny_checkpoint(name)
    quantized = engine.load_model(path, quantize="int8")
    kinds = {type(m).__name__ for m in quantized.net.modules()}
    assert "Linear" not in kinds and "QuantizedLinear" in kinds
    assert ("QuantizedExperts" in kinds) == (name != "llama")
    twin = _dequantized_twin(path, quantized)
    want, got = twin.logits(PROMPT), quantized.logits(PROMPT)
    assert (got - want).abs().max() / want.abs().max() < 1e-4
    assert quantized.generate(PROMPT, max_new_tokens=16) == twin.generate(PROMPT, max_new_tokens=16)


def test_quantize_only_experts_keeps_the_rest(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("qwen3_moe")
    model = engine.quantize(engine.load_model(path), "int8", targets=("experts",))
    kinds = [type(m).__name__ for m in model.net.modules()]
    assert "QuantizedExperts" in kinds and "QuantizedLinear" not in kinds
    model.set_experts_backend("reference")  # quantized experts follow the backend switch
    reference = model.logits(PROMPT)
    model.set_experts_backend("cpu")
    assert torch.allclose(model.logits(PROMPT), reference, atol=1e-5)


def test_bfloat16_int8_runs_and_stays_near(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("mixtral")
    full = engine.load_model(path).logits(PROMPT)
    quantized = engine.load_model(path, dtype=torch.bfloat16, quantize="int8").logits(PROMPT)
    # Tiny random models amplify rounding: a near-tied route can flip and move one position's
    # logits a lot (measured: one of 27 positions at 0.32, the rest near 0.01), so per position.
    per_position = (quantized - full).abs().amax(dim=-1) / full.abs().max()  # [T]
    assert (per_position < 0.05).float().mean() >= 0.9, per_position


def test_unknown_scheme_or_target_is_refused(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("llama")
    with pytest.raises(engine.EngineError, match="int8"):
        engine.load_model(path, quantize="int3")
    with pytest.raises(engine.EngineError, match="targets"):
        engine.quantize(engine.load_model(path), "int8", targets=("embeddings",))


def _int4_twin(path, quantized: engine.Model, group: int) -> engine.Model:
    """The unquantized model with every int4 weight replaced by its dequantized value."""
    twin = engine.load_model(path)
    modules = dict(twin.net.named_modules())
    for name, module in quantized.net.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedExperts)):
            for stacked in (
                (modules[name].weight,)
                if isinstance(module, QuantizedLinear)
                else (
                    modules[name].gate_up_proj,
                    modules[name].down_proj,
                )
            ):
                stacked.copy_(dequantize_reference(*quantize_int4(stacked, group)))
    return twin


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "llama"])
def test_int4_model_computes_with_the_rounded_weights(tiny_checkpoint, name: str) -> None:
    _, path = tiny_checkpoint(name)
    quantized = engine.load_model(path, quantize="int4", group_size=32)
    kinds = {type(m).__name__ for m in quantized.net.modules()}
    assert "QuantizedLinear" in kinds and ("QuantizedExperts" in kinds) == (name != "llama")
    want = _int4_twin(path, quantized, 32).logits(PROMPT)  # [T, V]
    got = quantized.logits(PROMPT)
    # Prefill runs on the dequantized weights (exact); a near-tied expert route can still flip on
    # fp32 summation order and move one position's logits a lot, so the check is per position:
    # nearly all positions agree to 2e-2.
    per_position = (got - want).abs().amax(dim=-1) / want.abs().max()  # [T]
    assert (per_position < 2e-2).float().mean() >= 0.9, per_position


def test_int4_group_size_is_checked(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("llama")
    with pytest.raises(engine.EngineError, match="group_size"):
        engine.load_model(path, quantize="int4", group_size=48)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_converting_a_quantized_model_keeps_its_stored_weights(tiny_checkpoint, tmp_path, scheme) -> None:
    # .to(bfloat16) converts every floating-point tensor; quantized weights and their scales must
    # stay as stored (an fp32 int8 scale rounded to bf16 would change every product) while the
    # float parts (embeddings, norms, routers) follow.
    _, path = tiny_checkpoint("qwen3_moe")
    model = engine.load_model(path, quantize=scheme, group_size=32)
    engine.write_checkpoint(model, tmp_path / "q")
    stored = {name: (b.dtype, b.clone()) for name, b in model.net.named_buffers()}
    model.net.to(torch.bfloat16)
    for name, b in model.net.named_buffers():
        assert b.dtype == stored[name][0] and torch.equal(b, stored[name][1]), name
    assert model.net.model.embed_tokens.weight.dtype == torch.bfloat16
    # The same quantized weights loaded with bf16 float parts: exactly the converted model.
    direct = engine.load_model(tmp_path / "q", dtype=torch.bfloat16)
    assert torch.equal(model.logits(PROMPT), direct.logits(PROMPT))


def test_mxfp4_quantizer_makes_the_bytes_gguf_makes() -> None:
    # The gguf package's MXFP4 quantizer is an independent implementation of the same OCP rule.
    gguf = pytest.importorskip("gguf")
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, :32] = 0  # an all-zero block
    ours = quantize(w, MXFP4)[0]
    assert torch.equal(ours, torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.MXFP4)))


def test_q4_k_quantizer_writes_blocks_gguf_reads_back_near_the_weights() -> None:
    gguf = pytest.importorskip("gguf")
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    blocks = quantize(w, Q4_K)[0]
    assert blocks.shape == (64, 2 * 144) and blocks.dtype == torch.uint8
    back = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q4_K))
    assert torch.equal(back, dequantize_reference(blocks, None, fmt=Q4_K))  # gguf reads our layout as we do
    # Each sub-block of 32 spans its range in 15 steps: an error within one step (half a step of
    # rounding, plus the 6-bit rounding of its step and offset) of the sub-block's range / 15.
    sub, err = w.view(-1, 32), (back - w).view(-1, 32)
    step = (sub.amax(-1) - sub.amin(-1).clamp(max=0)) / 15
    assert (err.abs().amax(-1) <= step).all()
