"""The native Gated DeltaNet decode step (native_linear.c) against GatedDeltaNet.forward in plain torch,
on the tiny Qwen3.5 (split projections) and Qwen3-Next (grouped, reordered at describe) checkpoints
and on awkward head shapes: after a prompt longer than the convolution, several decode steps give
the same outputs, convolution inputs and recurrent states, for one and two sequences, fp32 and int4
weights, both builds.

Tolerance: 1e-4 of the largest value (summation order only; observed <= 6e-6). The reference's
products are the build's own: the SIMD build rounds activations for int4 weights (int8 per group,
tests/engine/test_native.py), which puts the step 2-8 % from exact fp32 activations on these tiny
layers, so against the SIMD build torch's products run on the same kernels, against the portable
build on torch alone.
"""

from __future__ import annotations

import copy

import pytest
import torch

import engine
from engine import native
from engine.backends.native_linear import describe, step
from engine.models.qwen3_next import GatedDeltaNet, Qwen3NextArgs
from engine.quantization import QuantizedLinear

PROMPT, STEPS = 6, 4  # the convolution keeps K - 1 = 3 inputs: the prompt fills it and more


@pytest.fixture(params=["simd", "portable"])
def lib(request):
    lib = native.library(scalar=request.param == "portable")
    if lib is None:
        pytest.skip("no C compiler: the engine runs on torch alone")
    if request.param == "simd" and not lib.moerag_simd():
        pytest.skip("this CPU has no AVX2: the portable build is the one in use")
    return lib


def _mixer(tiny_checkpoint, name: str) -> GatedDeltaNet:
    _, path = tiny_checkpoint(name)
    layers = engine.load_model(path).net.model.layers
    mixer = next(block.self_attn for block in layers if isinstance(block.self_attn, GatedDeltaNet))
    assert mixer.hv > mixer.hk  # value heads share key heads
    return copy.deepcopy(mixer)  # quantized below without touching the session's model


def _quantize(mixer: GatedDeltaNet, names: tuple[str, ...]) -> None:
    for name in names:
        setattr(mixer, name, QuantizedLinear(getattr(mixer, name), "int4", 32))


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


WEIGHTS = {  # the projections quantized to int4 (group 32), by model
    "fp32": {"qwen3_5_moe": (), "qwen3_next": ()},
    "int4": {
        "qwen3_5_moe": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"),
        "qwen3_next": ("in_proj_qkvz", "in_proj_ba", "out_proj"),
    },
    # b and a float beside int4 ones: x is prepared once per format
    "int4, b and a float": {"qwen3_5_moe": ("in_proj_qkv", "in_proj_z", "out_proj"), "qwen3_next": ("in_proj_qkvz",)},
}


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", ["qwen3_5_moe", "qwen3_next"])
def test_decode_steps_match_the_module(tiny_checkpoint, lib, monkeypatch, name: str, batch: int, weights: str) -> None:
    mixer = _mixer(tiny_checkpoint, name)
    _quantize(mixer, WEIGHTS[weights][name])
    described = describe(mixer)
    assert described is not None
    args, _keep = described
    _check_steps(mixer, args, lib, monkeypatch, batch)


def _check_steps(mixer: GatedDeltaNet, args, lib, monkeypatch, batch: int) -> None:
    """A prompt through the module, then STEPS decode steps of the module and of the kernel from the
    same caches: outputs and caches within 1e-4 of the largest value."""
    if not lib.moerag_simd():  # the reference's products as this build computes them (see the module docstring)
        monkeypatch.setattr(native, "available", lambda: False)
    gen = torch.Generator().manual_seed(batch)
    hidden = mixer.out_proj.weight.shape[0]  # out_proj [H, Hv Dv], packed or not
    want_cache = mixer.new_cache(batch, 0, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        mixer(torch.randn(batch, PROMPT, hidden, generator=gen), None, None, want_cache, 0)
    got_cache = [t.clone() for t in want_cache]
    for position in range(PROMPT, PROMPT + STEPS):
        x = torch.randn(batch, hidden, generator=gen)  # [B, H]
        with torch.no_grad():
            want = mixer(x[:, None], None, None, want_cache, position)[:, 0]  # [B, H]
        got = step(args, x, got_cache, lib=lib)
        assert _close(got, want) < 1e-4, f"step at {position}"
        assert _close(got_cache[0], want_cache[0]) < 1e-4, f"convolution inputs at {position}"
        assert _close(got_cache[1], want_cache[1]) < 1e-4, f"recurrent state at {position}"


@pytest.mark.parametrize("batch", [1, 3])
def test_awkward_head_shapes(lib, monkeypatch, batch: int) -> None:
    # Dv = 40: one block of the columns the rule keeps in registers (32) and a remainder; Dk = 24,
    # three value heads per key head, a kernel of 5; random rates that decay some heads fast.
    config = {
        "model_type": "qwen3_5_moe", "vocab_size": 8, "hidden_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 8, "moe_intermediate_size": 8,
        "shared_expert_intermediate_size": 8, "num_experts": 2, "num_experts_per_tok": 1,
        "linear_num_key_heads": 2, "linear_num_value_heads": 6, "linear_key_head_dim": 24,
        "linear_value_head_dim": 40, "linear_conv_kernel_dim": 5, "layer_types": ["linear_attention"],
    }  # fmt: skip
    mixer = GatedDeltaNet(Qwen3NextArgs.from_config(config))
    gen = torch.Generator().manual_seed(7)
    for p in mixer.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * (1 if p.dim() == 1 else 0.2))
    described = describe(mixer)
    assert described is not None
    _check_steps(mixer, described[0], lib, monkeypatch, batch)


def test_a_projection_in_a_layout_the_kernels_do_not_read_is_left_to_torch(tiny_checkpoint) -> None:
    mixer = _mixer(tiny_checkpoint, "qwen3_5_moe")
    mixer.in_proj_z.weight.data = mixer.in_proj_z.weight.data.half()  # fp16: torch reads it
    assert describe(mixer) is None
    assert describe(torch.nn.Linear(4, 4)) is None
