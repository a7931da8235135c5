"""FP8 block-scaled checkpoints (DeepSeek-V3's layout), kept 8-bit, against transformers running the
same weights dequantized by the published formula.

Block sizes are chosen so that most sides are not multiples of them (partial edge blocks, blocks
wider than a side). Tolerances as tests/engine/test_parity.py: fp32 logits within 1e-4 of the
reference's largest (the same weights, the math in another order), greedy tokens exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import engine
from engine.errors import CheckpointError
from engine.fp8 import Fp8Experts, Fp8Linear
from engine.info import describe
from engine.layers import Linear
from engine.quant_methods import LOADABLE
from engine.quantization import QuantizedExperts, QuantizedLinear
from kernels.formats import dequantize, quantize_int4, quantize_int8
from tests.engine.cases import CASES, VOCAB
from tests.engine.checkpoints import assert_matches_transformers, save_fp8, transformers_model

NEW_TOKENS = 32
# [Bo, B]: qwen3_moe's 64 and 32 wide inputs in blocks of 24 (partial); deepseek_v3's rows of 24 in
# blocks of 32 and inputs of 16 and 32 in blocks of 48 (one partial block wider than the side).
BLOCKS = {"qwen3_moe": (16, 24), "deepseek_v3": (32, 48)}


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            torch.manual_seed(0)
            made[name] = save_fp8(CASES[name].build(), tmp_path_factory.mktemp(name), BLOCKS[name])
        return made[name]

    return make


def published(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as DeepSeek-V3's format defines them, fp32:
    w[i, j] = weight[i, j] * weight_scale_inv[i // Bo, j // B]; unscaled tensors as stored."""
    bo, bi = json.loads((path / "config.json").read_text())["quantization_config"]["weight_block_size"]
    out = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for name in names - {n for n in names if n.endswith("weight_scale_inv")}:
            w, scale_name = f.get_tensor(name), name.removesuffix("weight") + "weight_scale_inv"
            if scale_name in names:
                s = f.get_tensor(scale_name)
                i = torch.arange(w.shape[0])[:, None] // bo  # [N, 1] block row of each output
                j = torch.arange(w.shape[1])[None, :] // bi  # [1, K] block column of each input
                out[name] = w.float() * s[i, j]
            else:
                out[name] = w.float()
    return out


def reference(name: str, path: Path) -> torch.nn.Module:
    """transformers' model for the case, holding the published weights."""
    return transformers_model(name, published(path))


def _prompt(seed: int, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_weights_stay_fp8_and_dequantize_to_the_published_formula(fp8_checkpoint, name: str) -> None:
    path = fp8_checkpoint(name)
    want, (_, block) = published(path), BLOCKS[name]
    model = engine.load_model(path)
    partial = 0
    fp8 = [(n, m) for n, m in model.net.named_modules() if isinstance(m, (Fp8Linear, Fp8Experts))]
    assert len(fp8) >= 4 * len(model.net.model.layers) - 1  # every projection of every layer
    for module_name, module in fp8:
        assert module.block == block
        if isinstance(module, Fp8Linear):
            assert module.weight.dtype == torch.float8_e4m3fn
            assert torch.equal(dequantize(module.weight, module.scale, block), want[f"{module_name}.weight"])
            partial += module.weight.shape[1] % block != 0
            continue
        w13 = dequantize(module.gate_up_proj, module.gate_up_scale, block)  # [E, 2I, H]
        w2 = dequantize(module.down_proj, module.down_scale, block)  # [E, H, I]
        for e in range(w13.shape[0]):
            gate, up = w13[e].chunk(2)
            assert torch.equal(gate, want[f"{module_name}.{e}.gate_proj.weight"])
            assert torch.equal(up, want[f"{module_name}.{e}.up_proj.weight"])
            assert torch.equal(w2[e], want[f"{module_name}.{e}.down_proj.weight"])
    assert partial > 0  # some layer's inputs end in a partial block
    kept_float = [model.net.model.embed_tokens.weight, model.net.lm_head.weight, model.net.model.norm.weight]
    assert all(w.dtype == torch.float32 for w in kept_float)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_logits_and_greedy_tokens_match_transformers_on_the_dequantized_weights(fp8_checkpoint, name: str) -> None:
    path = fp8_checkpoint(name)
    ref, model = reference(name, path), engine.load_model(path)
    assert_matches_transformers(model, ref, torch.stack([_prompt(1), _prompt(2)]), name)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_fused_decode_runs_fp8_blocks_as_the_per_block_path_does(fp8_checkpoint, backend: str) -> None:
    model = engine.load_model(fp8_checkpoint("qwen3_moe"), experts_backend=backend)
    prompt = _prompt(3)
    fused = model.generate(prompt, max_new_tokens=NEW_TOKENS)
    if backend == "cpu":  # the fused kernel takes these blocks whole (native.blocks reads fp8)
        assert all(block.fused is not None for block in model.net._native.blocks)
    model.net.fuse_blocks = False
    assert model.generate(prompt, max_new_tokens=NEW_TOKENS) == fused
    model.net.native_decode = False  # module by module: native products, dequantize + GEMM at prefill
    assert model.generate(prompt, max_new_tokens=NEW_TOKENS) == fused


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_quantize_while_loading_requantizes_the_published_weights(fp8_checkpoint, name: str, scheme: str) -> None:
    path = fp8_checkpoint(name)
    want = published(path)
    model = engine.load_model(path, quantize=scheme, group_size=32)

    def requantized(w: torch.Tensor) -> torch.Tensor:
        return quantize_int8(w)[0] if scheme == "int8" else quantize_int4(w, 32)[0]

    floats = 0
    for module_name, module in model.net.named_modules():
        assert not isinstance(module, (Fp8Linear, Fp8Experts))
        if isinstance(module, QuantizedLinear):
            assert torch.equal(module.weight, requantized(want[f"{module_name}.weight"]))
        elif isinstance(module, QuantizedExperts):
            experts = range(module.gate_up_proj.shape[0])
            gate = torch.stack([want[f"{module_name}.{e}.gate_proj.weight"] for e in experts])  # [E, I, H]
            up = torch.stack([want[f"{module_name}.{e}.up_proj.weight"] for e in experts])
            assert torch.equal(module.gate_up_proj, requantized(torch.cat([gate, up], dim=1)))  # [E, 2I, H]
        elif isinstance(module, Linear) and f"{module_name}.weight" in want and module_name != "lm_head":
            # int4 cannot take 16 inputs in groups of 32 (DeepSeek's kv_b_proj): float, as dequantized.
            assert torch.equal(module.weight, want[f"{module_name}.weight"])
            floats += 1
    assert floats == (len(model.net.model.layers) if name == "deepseek_v3" and scheme == "int4" else 0)
    assert len(model.generate(_prompt(4), max_new_tokens=8)) == 8


@pytest.mark.parametrize(
    "section,says",
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
        ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fp8 fmt 'e5m2'"),
        ({"quant_method": "fp8", "fmt": "e4m3"}, "weight_block_size None"),
    ],
)
def test_an_unsupported_quantization_is_named_with_what_loads(fp8_checkpoint, tmp_path, section, says: str) -> None:
    src = fp8_checkpoint("qwen3_moe")
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": section}))
    with pytest.raises(CheckpointError, match=re.escape(says)) as error:
        engine.load_model(tmp_path)
    assert "Loadable: " in str(error.value) and all(f"'{method}'" in str(error.value) for method in LOADABLE)
    assert "\n" not in str(error.value)


def test_model_info_names_fp8_and_its_bits_per_weight(fp8_checkpoint) -> None:
    info = describe(fp8_checkpoint("deepseek_v3"))
    assert info.weight_format == "fp8 e4m3 (blocks of 32 x 48, kept 8-bit)"
    # 8-bit projections with bf16 embeddings, head and norms: between 8 and 16 bits a weight.
    assert 8 < info.bits_per_weight < 16


def test_converting_the_model_keeps_the_fp8_weights_and_scales(fp8_checkpoint) -> None:
    # fp8 counts as floating point to torch: without care, .to(bfloat16) would cast the weights
    # and their fp32 scales, and the kernels would read garbage.
    path = fp8_checkpoint("qwen3_moe")
    model = engine.load_model(path)
    stored = {name: (b.dtype, b.clone()) for name, b in model.net.named_buffers()}
    model.net.to(torch.bfloat16)
    for name, b in model.net.named_buffers():
        assert b.dtype == stored[name][0] and torch.equal(b, stored[name][1]), name
    direct = engine.load_model(path, dtype=torch.bfloat16)
    assert model.generate(_prompt(4), max_new_tokens=8) == direct.generate(_prompt(4), max_new_tokens=8)


def test_writing_an_fp8_model_says_to_quantize_or_keep_the_source(fp8_checkpoint, tmp_path) -> None:
    model = engine.load_model(fp8_checkpoint("qwen3_moe"))
    with pytest.raises(engine.EngineError, match="quantize"):
        engine.write_checkpoint(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_nan_fp8_weight_is_refused_naming_the_tensor(fp8_checkpoint, tmp_path) -> None:
    # e4m3fn's NaN (0x7F / 0xFF) would read as 480 in the kernels: a damaged file, said so at load.
    from safetensors.torch import load_file, save_file

    src = fp8_checkpoint("qwen3_moe")
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name].view(torch.uint8)[0, 3] = 0xFF
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)} holds 1 NaN fp8 weight"):
        engine.load_model(tmp_path)
