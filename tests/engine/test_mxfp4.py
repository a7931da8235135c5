"""MXFP4 checkpoints (gpt-oss's quantization_config and tensor pairs), kept at 4.25 bits a weight, on an
architecture we have (qwen3_moe): its experts and q_proj as `P_blocks` / `P_scales`, stacked or one
pair per expert, against transformers running the same weights dequantized by the published formula.

Tolerances as tests/engine/test_parity.py: fp32 logits within 1e-4 of the reference's largest (the
same weights, the math in another order), greedy tokens exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import engine
from engine.errors import CheckpointError, TensorShapeError
from engine.ggml_quants import GGUFExperts, GGUFLinear
from engine.info import describe
from kernels.formats import MXFP4, dequantize
from tests.engine.cases import CASES, VOCAB
from tests.engine.checkpoints import assert_matches_transformers, save_mxfp4, transformers_model, use_portable_kernels

# The OCP microscaling spec's e2m1 values, by code (sign bit 3, then 2 exponent and 1 mantissa bits).
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    made: dict[bool, Path] = {}

    def make(stacked: bool) -> Path:
        if stacked not in made:
            torch.manual_seed(0)
            made[stacked] = save_mxfp4(CASES["qwen3_moe"].build(), tmp_path_factory.mktemp("mxfp4"), stacked=stacked)
        return made[stacked]

    return make


def published(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as the format defines them, fp32: for each pair, code c of input
    i = byte i // 2's low nibble (i even) or high nibble (i odd), w = E2M1[c] * 2^(scale - 127)."""
    out = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for name in names:
            if name.endswith("_scales"):
                continue
            if not name.endswith("_blocks"):
                out[name] = f.get_tensor(name).float()
                continue
            blocks, scales = f.get_tensor(name).long(), f.get_tensor(name.replace("_blocks", "_scales")).long()
            codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).flatten(-2)  # [.., N, G, 32]
            w = torch.tensor(E2M1)[codes] * 2.0 ** (scales[..., None] - 127).double()
            out[name.removesuffix("_blocks")] = w.flatten(-2).float()
    return out


def _prompt(seed: int, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per-expert"])
def test_weights_stay_mxfp4_and_dequantize_to_the_published_formula(mxfp4_checkpoint, stacked: bool) -> None:
    path = mxfp4_checkpoint(stacked)
    want = published(path)
    model = engine.load_model(path)
    kept = [(n, m) for n, m in model.net.named_modules() if isinstance(m, (GGUFLinear, GGUFExperts))]
    assert len(kept) == 2 * len(model.net.model.layers)  # q_proj and the experts of every layer
    for module_name, module in kept:
        if isinstance(module, GGUFLinear):
            assert module.format is MXFP4 and module.weight.dtype == torch.uint8
            assert torch.equal(dequantize(module.weight, None, fmt=MXFP4), want[f"{module_name}.weight"])
            continue
        assert module.gate_up_format is MXFP4 and module.down_format is MXFP4
        w13 = dequantize(module.gate_up_proj, None, fmt=MXFP4)  # [E, 2I, H]
        w2 = dequantize(module.down_proj, None, fmt=MXFP4)  # [E, H, I]
        if stacked:
            assert torch.equal(w13, want[f"{module_name}.gate_up_proj"])
            assert torch.equal(w2, want[f"{module_name}.down_proj"])
            continue
        for e in range(w13.shape[0]):
            gate, up = w13[e].chunk(2)
            assert torch.equal(gate, want[f"{module_name}.{e}.gate_proj.weight"])
            assert torch.equal(up, want[f"{module_name}.{e}.up_proj.weight"])
            assert torch.equal(w2[e], want[f"{module_name}.{e}.down_proj.weight"])
    # 4.25 bits for the MXFP4 tensors, bf16 for the rest (embeddings, head, k/v/o): between the two
    info = describe(path)
    assert info.weight_format.startswith("mxfp4") and 4.25 < info.bits_per_weight < 16


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per-expert"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_logits_and_greedy_tokens_match_transformers(
    mxfp4_checkpoint, monkeypatch, stacked: bool, backend: str
) -> None:
    use_portable_kernels(monkeypatch)  # transformers' arithmetic (fp32 activations)
    path = mxfp4_checkpoint(stacked)
    ref = transformers_model("qwen3_moe", published(path))
    model = engine.load_model(path, experts_backend=backend)
    assert_matches_transformers(model, ref, torch.stack([_prompt(1), _prompt(2)]), "mxfp4")


def test_requantizing_while_loading(mxfp4_checkpoint) -> None:
    # quantize="int8": each MXFP4 module is widened alone, then quantized again (the tiny model's
    # widths are under int4's group of 128). Each re-quantized weight (MXFP4 or bf16 in the file) is
    # the published one within int8's half step (the largest of its row / 254); a misplaced expert
    # or row would be O(1) off.
    from engine.quantization import QuantizedExperts, QuantizedLinear

    path = mxfp4_checkpoint(True)
    want, model = published(path), engine.load_model(path, quantize="int8")
    assert not any(isinstance(m, (GGUFLinear, GGUFExperts)) for m in model.net.modules())
    checked = 0
    for module_name, module in model.net.named_modules():
        if isinstance(module, QuantizedExperts):
            pairs = [
                (f"{module_name}.{p}_proj", getattr(module, f"{p}_proj"), getattr(module, f"{p}_scale"))
                for p in ("gate_up", "down")
            ]
        elif isinstance(module, QuantizedLinear) and f"{module_name}.weight" in want:
            pairs = [(f"{module_name}.weight", module.weight, module.scale)]
        else:
            continue
        for name, q, scale in pairs:
            w = want[name]
            assert ((dequantize(q, scale) - w).abs() <= w.abs().amax(-1, keepdim=True) / 254 + 1e-7).all(), name
            checked += 1
    assert checked == 6 * len(model.net.model.layers) + 1  # q, k, v, o, gate_up, down; the head
    assert len(model.generate(_prompt(8), max_new_tokens=8)) == 8


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of checkpoint `src` in `dst` with `change(tensors)` applied to its tensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    change(tensors)
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_a_blocks_tensor_without_its_scales_is_named(mxfp4_checkpoint, tmp_path) -> None:
    name = "model.layers.1.self_attn.q_proj.weight_scales"
    path = _rewrite(mxfp4_checkpoint(True), tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_blocks has no .*q_proj\.weight_scales"):
        engine.load_model(path)


def test_scales_that_do_not_match_their_blocks_are_refused(mxfp4_checkpoint, tmp_path) -> None:
    name = "model.layers.0.mlp.experts.down_proj_scales"

    def cut(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name][..., :-1].contiguous()

    path = _rewrite(mxfp4_checkpoint(True), tmp_path / "m", cut)
    with pytest.raises(TensorShapeError, match=r"down_proj_blocks .* are not MXFP4 blocks"):
        engine.load_model(path)


def test_a_nan_scale_is_refused_naming_the_tensor(mxfp4_checkpoint, tmp_path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight_scales"

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][3, 1] = 255

    path = _rewrite(mxfp4_checkpoint(True), tmp_path / "m", poison)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_scales holds e8m0's NaN exponent"):
        engine.load_model(path)


def test_the_quantization_config_is_what_marks_the_pairs(mxfp4_checkpoint, tmp_path) -> None:
    # Without quant_method mxfp4 the pairs are unknown tensors: named, not silently dropped.
    src = mxfp4_checkpoint(True)
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"_blocks"):
        engine.load_model(tmp_path)


def test_gpt_oss_as_published_matches_transformers_own_mxfp4_loading(tmp_path, monkeypatch) -> None:
    # gpt-oss's own layout: experts only, stacked, rows interleaving gate and up, with their biases;
    # transformers reads it with its Mxfp4 integration (dequantized on a CPU), an independent reading.
    from transformers import GptOssForCausalLM, Mxfp4Config

    use_portable_kernels(monkeypatch)  # transformers' arithmetic (fp32 activations)
    torch.manual_seed(0)
    path = save_mxfp4(CASES["gpt_oss"].build(), tmp_path, stacked=True, attention=False)
    ref = GptOssForCausalLM.from_pretrained(
        path, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    model = engine.load_model(path)
    assert all(isinstance(block.mlp.experts, GGUFExperts) for block in model.net.model.layers)
    assert_matches_transformers(model, ref, torch.stack([_prompt(1), _prompt(2)]), "gpt-oss mxfp4")
