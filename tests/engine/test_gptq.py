"""GPTQ and AWQ int4 checkpoints, kept 4-bit, against transformers running the same weights dequantized
by the published formulas, and the int4zp kernels they run on against the reference dequantize.

The checkpoints are written here in the published layouts from random float weights (quantized as
GPTQ and AutoAWQ quantize, packed as they pack), and read back here by the published formulas,
independently of engine/gptq.py: GPTQ w[n, k] = (q - z) * s with q in bits 4 (k % 8) of
qweight[k // 8, n], z in bits 4 (n % 8) of qzeros[g, n // 8] (+ 1 for checkpoint_format "gptq"),
g = g_idx[k]; AWQ w[n, k] = (q - z) * s with q in nibble AWQ_ORDER.index(n % 8) of qweight[k, n // 8]
and z likewise in qzeros[k // group, n // 8]. Tolerances as tests/engine/test_fp8.py.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

import engine
from engine import native
from engine.errors import CheckpointError
from engine.export import write_checkpoint
from engine.gptq import ActOrderExperts, ActOrderLinear, Int4ZpExperts, Int4ZpLinear
from engine.info import describe
from engine.quantization import QuantizedExperts, QuantizedLinear, quantize
from kernels.formats import INT4ZP, pack_int4, quantize_int4
from kernels.formats import dequantize as dequantize_reference
from tests.engine.cases import INIT, VOCAB
from tests.engine.checkpoints import assert_matches_transformers, use_portable_kernels
from tests.engine.test_native import _close, _round_chunks

NEW_TOKENS = 32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack order: nibble i holds output AWQ_ORDER[i] of 8
_NO_SPECIAL = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
# Every width a multiple of 128, so groups of 32, 64 and 128 all divide it.
MODELS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, initializer_range=INIT, **_NO_SPECIAL,
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=INIT, **_NO_SPECIAL,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Scheme:
    method: str  # "gptq" or "awq"
    group: int  # -1: per channel
    sym: bool = False
    # "": g_idx = k // group; "all": a random g_idx for each module; "shared": one per input, as GPTQ's
    # Hessian order gives (q, k and v alike; an expert's gate and up alike); "down": down_proj's alone
    act_order: str = ""
    v1: bool = False  # GPTQ's checkpoint_format "gptq": qzeros hold zero - 1

    def config(self) -> dict:
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group, "version": "gemm", "zero_point": True}
        return {
            "quant_method": "gptq", "bits": 4, "group_size": self.group, "sym": self.sym,
            "desc_act": bool(self.act_order), "checkpoint_format": "gptq" if self.v1 else "gptq_v2",
        }  # fmt: skip


SCHEMES = {
    "gptq-g32-sym": Scheme("gptq", 32, sym=True),
    "gptq-g64-asym-v1": Scheme("gptq", 64, v1=True),
    "gptq-g32-act-order-v1": Scheme("gptq", 32, act_order="all", v1=True),
    "gptq-g32-act-order-down": Scheme("gptq", 32, sym=True, act_order="down"),
    "gptq-g64-act-order-shared": Scheme("gptq", 64, act_order="shared"),
    "gptq-per-channel": Scheme("gptq", -1),
    "awq-g64": Scheme("awq", 64),
    "awq-g128": Scheme("awq", 128),
}


# Writing: GPTQ's and AutoAWQ's quantizers and packers, written out from their papers and code.


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """[.., 8] values 0..15 -> [..] int32 words, value i in bits 4i (wrapping into the sign bit)."""
    v = (nibbles.long() << (4 * torch.arange(8))).sum(-1)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _quantize(w: torch.Tensor, scheme: Scheme, random_order: bool, seed: int) -> dict[str, torch.Tensor]:
    """w [N, K] float -> the module's checkpoint tensors (qweight, qzeros, scales, g_idx for GPTQ)."""
    n, k = w.shape
    group = k if scheme.group == -1 else scheme.group
    g_idx = torch.arange(k) // group
    if random_order:  # act-order: group j // group for the input quantized j-th (GPTQ's g_idx)
        g_idx = torch.empty(k, dtype=torch.long)
        g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(seed))] = torch.arange(k) // group
    groups = k // group
    scale, zero = torch.empty(groups, n), torch.empty(groups, n)
    q = torch.empty(n, k, dtype=torch.long)
    for g in range(groups):
        cols = (g_idx == g).nonzero()[:, 0]
        wg = w[:, cols].float()  # [N, group]
        low, high = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
        if scheme.sym:
            high = torch.maximum(-low, high)
            low = -high
        s = ((high - low) / 15).clamp(min=1e-5).half().float()  # the checkpoint's fp16 scale
        z = torch.full((n,), 8.0) if scheme.sym else torch.round(-low / s).clamp(0, 15)
        scale[g], zero[g] = s, z
        q[:, cols] = torch.clamp(torch.round(wg / s[:, None]) + z[:, None], 0, 15).long()
    stored = (zero.long() - 1) & 15 if scheme.v1 else zero.long()  # v1 keeps zero - 1 (0 wraps to 15, read 16)
    if scheme.method == "awq":
        order = list(AWQ_ORDER)
        return {
            "qweight": _words(q.T.reshape(k, n // 8, 8)[..., order]),  # [K, N/8]
            "qzeros": _words(stored.reshape(groups, n // 8, 8)[..., order]),  # [G, N/8]
            "scales": scale.half(),
        }
    return {
        "qweight": _words(q.T.reshape(k // 8, 8, n).transpose(1, 2)),  # [K/8, N]: input 8r + i in nibble i
        "qzeros": _words(stored.reshape(groups, n // 8, 8)),  # [G, N/8]
        "scales": scale.half(),
        "g_idx": g_idx.to(torch.int32),
    }


def _quantized(name: str) -> bool:
    return name.endswith("_proj.weight") and "lm_head" not in name


def save_int4(model: torch.nn.Module, directory: Path, scheme: Scheme) -> Path:
    """`model` as a GPTQ / AWQ checkpoint: every attention and MLP projection (experts one per expert
    and projection) quantized, embeddings, norms, router and head fp16."""
    tensors: dict[str, torch.Tensor] = {}
    weights = dict(model.state_dict())
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w, prefix = weights.pop(name), name.rsplit(".", 1)[0]  # [E, 2I, H] / [E, H, I]
        for e, we in enumerate(w):
            if name.endswith("gate_up_proj"):
                weights[f"{prefix}.{e}.gate_proj.weight"], weights[f"{prefix}.{e}.up_proj.weight"] = we.chunk(2)
            else:
                weights[f"{prefix}.{e}.down_proj.weight"] = we
    for i, (name, w) in enumerate(sorted(weights.items())):
        if _quantized(name):
            random_order = scheme.act_order in ("all", "shared") or (scheme.act_order == "down" and "down_proj" in name)
            same_input = re.sub(r"(q|k|v|gate|up)_proj", "input", name)  # modules reading one x
            seed = zlib.crc32(same_input.encode()) if scheme.act_order == "shared" else i
            for kind, t in _quantize(w, scheme, random_order, seed=seed).items():
                tensors[f"{name.removesuffix('.weight')}.{kind}"] = t
        elif not name.endswith("lm_head.weight") or not model.config.tie_word_embeddings:
            tensors[name] = w.half()
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    config = model.config.to_dict()
    config["torch_dtype"] = "float16"
    config["quantization_config"] = scheme.config()
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


# Reading: the published formulas.


def _nibble(words: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    return (words.long() >> (4 * which)) & 15


def published(path: Path, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as GPTQ / AWQ define them, fp32 [N, K]; float tensors as stored; and
    each GPTQ module's g_idx [K] (as `X.g_idx`)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for name in names:
            if not name.endswith(".qweight"):
                if not name.endswith((".qzeros", ".scales", ".g_idx")):
                    out[name] = f.get_tensor(name).float()
                continue
            prefix = name.removesuffix(".qweight")
            qweight, qzeros, scales = (f.get_tensor(f"{prefix}.{t}") for t in ("qweight", "qzeros", "scales"))
            if scheme.method == "awq":
                k, n = qweight.shape[0], qweight.shape[1] * 8
                kk, nn_ = torch.arange(k)[None, :], torch.arange(n)[:, None]  # [1, K], [N, 1]
                where = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])[nn_ % 8]  # nibble of output n
                q = _nibble(qweight[kk, nn_ // 8], where)  # [N, K]
                g = kk // (k // scales.shape[0])
                z = _nibble(qzeros[g, nn_ // 8], where)
            else:
                k, n = qweight.shape[0] * 8, qweight.shape[1]
                kk, nn_ = torch.arange(k)[None, :], torch.arange(n)[:, None]
                q = _nibble(qweight[kk // 8, nn_], kk % 8)  # [N, K]
                g = f.get_tensor(f"{prefix}.g_idx").long()[None, :]  # [1, K]
                out[f"{prefix}.g_idx"] = g[0]
                z = _nibble(qzeros[g, nn_ // 8], nn_ % 8) + (1 if scheme.v1 else 0)
            out[f"{prefix}.weight"] = (q - z).float() * scales[g, nn_].float()
    return out


def reference(name: str, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' model for `name` holding `weights`, per-expert tensors stacked as it holds them."""
    ref = getattr(transformers, {"qwen3_moe": "Qwen3MoeForCausalLM", "llama": "LlamaForCausalLM"}[name])(MODELS[name]())
    state = {k: v for k, v in weights.items() if ".experts." not in k and not k.endswith(".g_idx")}
    for layer in range(ref.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        if f"{prefix}.0.gate_proj.weight" not in weights:
            continue
        count = ref.config.num_experts
        state[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([weights[f"{prefix}.{e}.{p}.weight"] for p in ("gate_proj", "up_proj")]) for e in range(count)]
        )  # [E, 2I, H]
        state[f"{prefix}.down_proj"] = torch.stack([weights[f"{prefix}.{e}.down_proj.weight"] for e in range(count)])
    if ref.config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    ref.load_state_dict(state)
    return ref.eval()


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    made: dict[tuple[str, str], Path] = {}

    def make(model: str, scheme: str) -> Path:
        if (model, scheme) not in made:
            torch.manual_seed(0)
            net = getattr(transformers, {"qwen3_moe": "Qwen3MoeForCausalLM", "llama": "LlamaForCausalLM"}[model])(
                MODELS[model]()
            ).eval()
            made[model, scheme] = save_int4(net, tmp_path_factory.mktemp(f"{model}-{scheme}"), SCHEMES[scheme])
        return made[model, scheme]

    return make


def _prompt(seed: int, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def _dense_weights(module: torch.nn.Module) -> torch.Tensor:
    """An int4zp Linear's weight [N, K] in the original input order, by the reference dequantize."""
    if isinstance(module, ActOrderLinear):
        w = dequantize_reference(module.weight.view(torch.uint8), module.scale, fmt=INT4ZP)
        out = torch.empty_like(w)
        out[:, module.perm] = w
        return out
    return dequantize_reference(module.weight, module.scale, fmt=INT4ZP)


def _expert_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked int4zp experts -> (w13 [E, 2I, H], w2 [E, H, I]) by the reference dequantize, gate and up
    in their original input order (down's act-order stays folded: gate and up's rows follow it)."""
    w13 = module.gate_up_proj
    w13 = dequantize_reference(w13.view(torch.uint8), module.gate_up_scale, fmt=INT4ZP)
    w2 = dequantize_reference(module.down_proj, module.down_scale, fmt=INT4ZP)
    if isinstance(module, ActOrderExperts):
        inter = w13.shape[1] // 2
        for e in range(w13.shape[0]):
            for part, rows in enumerate((slice(0, inter), slice(inter, None))):
                out = torch.empty_like(w13[e, rows])
                out[:, module.gate_up_perm[e, part]] = w13[e, rows]
                w13[e, rows] = out
    return w13, w2


CASES = [("qwen3_moe", s) for s in SCHEMES] + [("llama", "gptq-g32-act-order-v1"), ("llama", "awq-g64")]


@pytest.mark.parametrize("model_name,scheme", CASES)
def test_weights_stay_int4_and_dequantize_to_the_published_formula(int4_checkpoint, model_name, scheme) -> None:
    path = int4_checkpoint(model_name, scheme)
    want = published(path, SCHEMES[scheme])
    model = engine.load_model(path)
    checked = 0
    for name, module in model.net.named_modules():
        if isinstance(module, (Int4ZpLinear, ActOrderLinear)):
            assert torch.equal(_dense_weights(module), want[f"{name}.weight"]), name
            checked += 1
        elif isinstance(module, (Int4ZpExperts, ActOrderExperts)):
            w13, w2 = _expert_weights(module)
            for e in range(w13.shape[0]):
                down = f"{name}.{e}.down_proj"
                # down's act-order folds into gate and up's rows: its inputs sorted by group, theirs alike
                g_idx = want.get(f"{down}.g_idx", torch.zeros(w2.shape[-1], dtype=torch.long))
                order = torch.sort(g_idx, stable=True).indices
                assert torch.equal(w2[e], want[f"{down}.weight"][:, order])
                gate, up = w13[e].chunk(2)
                assert torch.equal(gate, want[f"{name}.{e}.gate_proj.weight"][order])
                assert torch.equal(up, want[f"{name}.{e}.up_proj.weight"][order])
            checked += 1
    permuted = any(isinstance(m, (ActOrderLinear, ActOrderExperts)) for m in model.net.modules())
    assert permuted == (SCHEMES[scheme].act_order in ("all", "shared"))  # down's alone folds into gate and up
    layers = len(model.net.model.layers)
    assert checked == layers * (5 if model_name == "qwen3_moe" else 7)  # q, k, v, o (+ experts | gate, up, down)
    assert model.net.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("model_name,scheme", CASES)
def test_logits_and_greedy_tokens_match_transformers_on_the_dequantized_weights(
    int4_checkpoint, monkeypatch, model_name, scheme
):
    use_portable_kernels(monkeypatch)  # transformers' arithmetic (fp32 activations)
    path = int4_checkpoint(model_name, scheme)
    ref, model = reference(model_name, published(path, SCHEMES[scheme])), engine.load_model(path)
    assert_matches_transformers(model, ref, torch.stack([_prompt(1), _prompt(2)]), scheme)


@pytest.mark.parametrize(
    "scheme,fused",
    [("gptq-g32-sym", True), ("gptq-g32-act-order-down", True), ("awq-g128", True), ("gptq-g32-act-order-v1", False)],
)
def test_decode_runs_on_the_fused_kernel_unless_inputs_are_permuted(int4_checkpoint, scheme: str, fused: bool):
    model = engine.load_model(int4_checkpoint("qwen3_moe", scheme))
    prompt = _prompt(3)
    tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS)
    assert all((block.fused is not None) == fused for block in model.net._native.blocks)
    model.net.native_decode = False  # module by module
    assert model.generate(prompt, max_new_tokens=NEW_TOKENS) == tokens


def test_a_module_split_across_shards_loads_the_same(int4_checkpoint, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    source = int4_checkpoint("qwen3_moe", "gptq-g32-act-order-v1")
    tensors = load_file(str(source / "model.safetensors"))
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for i, (name, t) in enumerate(sorted(tensors.items())):  # qweight, qzeros, scales, g_idx alternate
        shards[i % 2][name] = t
    weight_map = {}
    for i, shard in enumerate(shards):
        save_file(shard, str(tmp_path / f"model-{i + 1:05d}-of-00002.safetensors"))
        weight_map |= dict.fromkeys(shard, f"model-{i + 1:05d}-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    tokens = _prompt(5)
    assert torch.equal(engine.load_model(tmp_path).logits(tokens), engine.load_model(source).logits(tokens))


def test_model_info_names_the_scheme(int4_checkpoint) -> None:
    info = describe(int4_checkpoint("qwen3_moe", "gptq-g32-act-order-v1"))
    assert info.weight_format == "gptq int4 (group 32, asym, act-order, kept 4-bit)"
    assert (
        describe(int4_checkpoint("qwen3_moe", "awq-g64")).weight_format == "awq int4 (group 64, asym, gemm, kept 4-bit)"
    )
    assert 3 < info.bits_per_weight < 16  # fp16 embeddings and head beside the 4-bit projections


@pytest.mark.parametrize(
    "change,says",
    [
        ({"bits": 8}, "gptq bits 8"),
        ({"checkpoint_format": "marlin"}, "gptq checkpoint_format 'marlin'"),
        ({"group_size": 16}, "gptq group_size 16"),
        ({"quant_method": "awq", "version": "gemv"}, "awq version 'gemv'"),
        ({"quant_method": "awq", "zero_point": False}, "awq zero_point false"),
    ],
)
def test_unsupported_variants_are_refused_by_name(int4_checkpoint, tmp_path: Path, change: dict, says: str) -> None:
    source = int4_checkpoint("llama", "awq-g64")
    for f in source.iterdir():
        (tmp_path / f.name).symlink_to(f)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {**SCHEMES["gptq-g32-sym"].config(), **change}
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"quantization_config has {says}") as err:
        engine.load_model(tmp_path)
    assert "'gptq'" in str(err.value) and "'awq'" in str(err.value)  # and what loads


# The int4zp kernels (both builds) against the reference dequantize.


@pytest.fixture(params=["simd", "portable"])
def lib(request):
    lib = native.library(scalar=request.param == "portable")
    if lib is None:
        pytest.skip("no C compiler: the engine runs on torch alone")
    if request.param == "simd" and not lib.moerag_simd():
        pytest.skip("this CPU has no AVX2: the portable build is the one in use")
    return lib


def _int4zp(shape: tuple[int, ...], group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int4zp weights [.., N, K]: any nibbles, fp16 scales, zero points 0..16 (v1 reads 16)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, shape, generator=g)
    scale = (torch.rand(*shape[:-1], shape[-1] // group, generator=g) + 0.5) / 16
    zero = torch.randint(0, 17, scale.shape, generator=g).float()
    return pack_int4(q), torch.stack([scale, zero], dim=-1).half()


def _expected(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, simd: bool) -> torch.Tensor:
    """x [M, K] @ W^T as the kernel defines it: the SIMD build rounds x to int8 per weight group."""
    group = w.shape[-1] * 2 // scale.shape[-2]
    return (_round_chunks(x, 127, group) if simd else x) @ dequantize_reference(w, scale, fmt=INT4ZP).T


@pytest.mark.parametrize("k,group", [(32, 32), (96, 32), (256, 64), (1024, 128), (512, 256)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_int4zp_gemv_equals_the_dequantized_product(lib, k: int, group: int, m: int) -> None:
    w, scale = _int4zp((45, k), group, seed=k + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    _close(native.gemv(x, w, scale, fmt=INT4ZP, lib=lib), _expected(x, w, scale, bool(lib.moerag_simd())))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4zp_dequantize_is_exact(lib, group: int) -> None:
    w, scale = _int4zp((19, 384), group, seed=group)
    assert torch.equal(native.dequantize(w, scale, fmt=INT4ZP, lib=lib), dequantize_reference(w, scale, fmt=INT4ZP))


@pytest.mark.parametrize("group", [32, 64])
def test_int4zp_moe_equals_the_reference(lib, group: int) -> None:
    experts, hidden, width = 8, 128, 192
    w13, s13 = _int4zp((experts, 2 * width, hidden), group, seed=1)
    w2, s2 = _int4zp((experts, hidden, width), group, seed=2)
    ids = torch.tensor([[0, 5], [5, 0], [2, 7], [7, 7]])
    x, weights = torch.randn(ids.shape[0], hidden), torch.rand(ids.shape)
    got = native.moe(x, w13, w2, weights, ids, w13_scale=s13, w2_scale=s2, fmt=INT4ZP, lib=lib)
    simd = bool(lib.moerag_simd())
    want = torch.zeros_like(x)
    for t, k in torch.cartesian_prod(torch.arange(ids.shape[0]), torch.arange(ids.shape[1])).tolist():
        e = int(ids[t, k])
        gate, up = _expected(x[t : t + 1], w13[e], s13[e], simd).chunk(2, dim=-1)
        want[t] += weights[t, k] * _expected(F.silu(gate) * up, w2[e], s2[e], simd)[0]
    _close(got, want)


@pytest.mark.parametrize("scheme", ["gptq-g32-sym", "gptq-g32-act-order-v1"])
def test_quantize_while_loading_requantizes_the_int4zp_weights(int4_checkpoint, tmp_path: Path, scheme: str) -> None:
    path = int4_checkpoint("qwen3_moe", scheme)
    stored = engine.load_model(path)
    model = engine.load_model(path, quantize="int4", group_size=32)
    kept = dict(stored.net.named_modules())
    for name, module in model.net.named_modules():
        assert not isinstance(module, (Int4ZpLinear, ActOrderLinear, Int4ZpExperts, ActOrderExperts))
        if isinstance(module, QuantizedLinear) and name != "lm_head":
            assert torch.equal(module.weight, quantize_int4(kept[name].to_float().weight, 32)[0])
        elif isinstance(module, QuantizedExperts):
            assert torch.equal(module.down_proj, quantize_int4(kept[name].widened("down_proj"), 32)[0])
    write_checkpoint(model, tmp_path / "int4")  # every target re-quantized: it writes and loads back
    prompt = _prompt(4)
    assert engine.load_model(tmp_path / "int4").generate(prompt, max_new_tokens=4) == model.generate(
        prompt, max_new_tokens=4
    )
    partial = quantize(engine.load_model(path), "int4", targets=("experts",), group_size=32)
    with pytest.raises(engine.EngineError, match="GPTQ / AWQ checkpoint"):
        write_checkpoint(partial, tmp_path / "partial")
