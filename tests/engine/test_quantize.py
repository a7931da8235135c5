"""int8 weight-only quantization: the transform is exact given its rounding, and the kernel is safe."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.qmatmul import dequantize_int4, int4_matmul, int8_matmul, pack_int4, quantize_int4, quantize_int8
from engine.quantize import Int4Experts, Int4Linear, Int8Experts, Int8Linear

PROMPT = list(range(3, 300, 11))


def test_rounding_error_is_at_most_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 48, 64)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (5, 48)
    assert torch.all((w - q.float() * s[..., None]).abs() <= s[..., None] / 2 + 1e-7)


@pytest.mark.parametrize("k", [8, 13, 24, 64, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_equals_dequantized_product(k: int, dtype: torch.dtype) -> None:
    # K = 8, 13 and 24 are the shapes on which torch's fused bf16 kernel misbehaves.
    torch.manual_seed(k)
    q, s = quantize_int8(torch.randn(40, k))
    x = torch.randn(3, k).to(dtype)
    want = x.float() @ (q.float() * s[:, None]).T
    got = int8_matmul(x, q, s.to(dtype)).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: 8-bit mantissa on x, s and the output
    assert (got - want).abs().max() <= tol * want.abs().max()


def _dequantized_twin(path, quantized: engine.Model) -> engine.Model:
    """The unquantized model with every quantized weight replaced by q * s."""
    twin = engine.load_model(path)
    modules = dict(twin.net.named_modules())
    for name, module in quantized.net.named_modules():
        if isinstance(module, Int8Linear):
            modules[name].weight.copy_(module.weight.float() * module.scales.float()[:, None])
        elif isinstance(module, Int8Experts):
            modules[name].gate_up_proj.copy_(module.gate_up_proj.float() * module.gate_up_scale.float()[..., None])
            modules[name].down_proj.copy_(module.down_proj.float() * module.down_scale.float()[..., None])
    return twin


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "llama"])
def test_quantized_model_computes_with_the_rounded_weights(tiny_checkpoint, name: str) -> None:
    _, path = tiny_checkpoint(name)
    quantized = engine.load_model(path, quantize="int8")
    kinds = {type(m).__name__ for m in quantized.net.modules()}
    assert "Linear" not in kinds and "Int8Linear" in kinds
    assert ("Int8Experts" in kinds) == (name != "llama")
    twin = _dequantized_twin(path, quantized)
    want, got = twin.logits(PROMPT), quantized.logits(PROMPT)
    assert (got - want).abs().max() / want.abs().max() < 1e-4
    assert quantized.generate(PROMPT, max_new_tokens=16) == twin.generate(PROMPT, max_new_tokens=16)


def test_quantize_only_experts_keeps_the_rest(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("qwen3_moe")
    model = engine.quantize(engine.load_model(path), "int8", targets=("experts",))
    kinds = [type(m).__name__ for m in model.net.modules()]
    assert "Int8Experts" in kinds and "Int8Linear" not in kinds
    model.set_experts_backend("reference")  # quantized experts follow the backend switch
    reference = model.logits(PROMPT)
    model.set_experts_backend("cpu")
    assert torch.allclose(model.logits(PROMPT), reference, atol=1e-5)


def test_bfloat16_int8_runs_and_stays_near(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("mixtral")
    full = engine.load_model(path).logits(PROMPT)
    quantized = engine.load_model(path, dtype=torch.bfloat16, quantize="int8").logits(PROMPT)
    # Tiny random models amplify rounding (near-tied routes flip); this bounds gross errors only.
    assert (quantized - full).abs().max() / full.abs().max() < 0.2


def test_unknown_scheme_or_target_is_refused(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("llama")
    with pytest.raises(engine.EngineError, match="int8"):
        engine.load_model(path, quantize="int3")
    with pytest.raises(engine.EngineError, match="targets"):
        engine.quantize(engine.load_model(path), "int8", targets=("embeddings",))


def test_int4_rounding_error_is_at_most_half_a_step() -> None:
    torch.manual_seed(1)
    w = torch.randn(48, 256)
    q, scale_zero = quantize_int4(w, 64)
    assert q.min() >= 0 and q.max() <= 15 and scale_zero.shape == (4, 48, 2)
    step = scale_zero[..., 0].T.repeat_interleave(64, dim=1)  # [N, K]
    assert torch.all((w - dequantize_int4(q, scale_zero)).abs() <= step / 2 + 1e-6)


@pytest.mark.parametrize("n,k,group", [(32, 64, 32), (48, 256, 128), (16, 512, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_fused_kernel_equals_dequantized_product(n: int, k: int, group: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n + k)
    q, scale_zero = quantize_int4(torch.randn(n, k), group)
    x = torch.randn(5, k).to(dtype)
    want = x.float() @ dequantize_int4(q, scale_zero).T
    fused = int4_matmul(x, pack_int4(q), scale_zero.to(torch.bfloat16)).float()
    plain = int4_matmul(x, q.to(torch.uint8), scale_zero).float()
    # The fused kernel runs in bf16 (activations, scales and zeros rounded to 8-bit mantissas).
    assert (fused - want).abs().max() <= 2e-2 * want.abs().max()
    assert (plain - want).abs().max() <= (1e-5 if dtype == torch.float32 else 2e-2) * want.abs().max()


def _int4_twin(path, quantized: engine.Model, group: int) -> engine.Model:
    """The unquantized model with every int4 weight replaced by its dequantized value."""
    twin = engine.load_model(path)
    modules = dict(twin.net.named_modules())
    for name, module in quantized.net.named_modules():
        if isinstance(module, Int4Linear):
            w = modules[name].weight
            w.copy_(dequantize_int4(*quantize_int4(w, group)))
        elif isinstance(module, Int4Experts):
            for stacked in (modules[name].gate_up_proj, modules[name].down_proj):
                for e in range(stacked.shape[0]):
                    stacked[e] = dequantize_int4(*quantize_int4(stacked[e], group))
    return twin


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "llama"])
def test_int4_model_computes_with_the_rounded_weights(tiny_checkpoint, name: str) -> None:
    _, path = tiny_checkpoint(name)
    quantized = engine.load_model(path, quantize="int4", group_size=32)
    kinds = {type(m).__name__ for m in quantized.net.modules()}
    assert "Int4Linear" in kinds and ("Int4Experts" in kinds) == (name != "llama")
    want = _int4_twin(path, quantized, 32).logits(PROMPT)  # [T, V]
    got = quantized.logits(PROMPT)
    # Fused layers round activations to bf16 (kernel error <= 2e-2). A near-tied expert route can
    # flip on that rounding and move one position's logits a lot, so the check is per position:
    # nearly all positions agree to the kernel's tolerance.
    per_position = (got - want).abs().amax(dim=-1) / want.abs().max()  # [T]
    assert (per_position < 2e-2).float().mean() >= 0.9, per_position


def test_int4_group_size_is_checked(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("llama")
    with pytest.raises(engine.EngineError, match="group_size"):
        engine.load_model(path, quantize="int4", group_size=48)
