"""GGUF files load: config, tensors and tokenizer from the metadata; logits equal transformers'.

The files are written here with the gguf package's own writer and tensor-name map, from tiny
random transformers models, laid out as llama.cpp's convert_hf_to_gguf.py lays them out: llama's
(and Mixtral's) Q/K rows permuted for adjacent-pair rope, Llama 3 rope scaling as a rope_freqs
tensor, DeepSeek's kv_b split into k_b [N, R, Dn] and v_b [N, Dv, R], experts stacked, gpt-oss's
gate and up (weights and biases) split apart and its sinks as attn_sinks.weight, GLM's MTP layer
after the model's, rows of one squeezed to vectors, 1-D tensors in F32; or with matrices in GGUF
block types (Q8_0, Q4_K, Q6_K, Q4_0, Q5_K, MXFP4), which stay blocks in the engine.
Tolerances: as tests/engine/test_parity.py (fp32 logits within 1e-4 of the largest logit).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import engine
from engine.errors import CheckpointError, UnsupportedArchitectureError
from engine.gguf import load_tokenizer, read_config, split_files, summarize
from engine.info import describe
from engine.loader import load_checkpoint
from engine.tokenizer import chat_prompt
from kernels.formats import GGUF_FORMATS
from tests.engine.cases import CASES, INIT, VOCAB
from tests.engine.checkpoints import (
    CHAT_TEMPLATE,
    add_tokenizer,
    assert_matches_transformers,
    gguf_blocks,
    save,
    use_portable_kernels,
)

gguf = pytest.importorskip("gguf")

NEW_TOKENS = 32
SENTENCE = "hello world, the engine answers questions about documents!"
# llama without rope scaling: transformers' own GGUF loader ignores rope_freqs, and is compared too.
LLAMA_PLAIN = dict(CASES["llama"].kwargs, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
ARCHS = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "deepseek_v3": "deepseek2",
    "gpt_oss": "gpt-oss",
    "qwen2_moe": "qwen2moe",
    "glm4_moe": "glm4moe",
    "olmoe": "olmoe",
    "dots1": "dots1",
    "mixtral": "llama",
    "minimax_m2": "minimax-m2",
    "ernie4_5_moe": "ernie4_5-moe",
    "granitemoe": "granitemoe",
    "hunyuan_v1_moe": "hunyuan-moe",
}
PERMUTED = ("llama", "granitemoe")  # the architectures convert_hf_to_gguf converts as LlamaModel
MODEL_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}  # "gpt-oss" -> MODEL_ARCH.GPT_OSS
# CASES as llama.cpp can hold them: its gpt-oss clamps SwiGLU at 7 (no metadata key), its qwen2moe
# has no dense layers, its dots1 no q/k/v biases; convert_hf_to_gguf writes no OLMoE clip_qkv.
AS_LLAMA_CPP = {
    "gpt_oss": {"swiglu_limit": 7.0},
    "qwen2_moe": {"mlp_only_layers": []},
    "dots1": {"attention_bias": False},
    "olmoe": {"clip_qkv": None},
    "hunyuan_v1_moe": {"moe_topk": 2},  # llama.cpp's hunyuan-moe has one top k for every layer
}


def _llama_permute(w: torch.Tensor, heads: int, *, undo: bool = False) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute: each head's rotary halves interleaved into pairs (or,
    with `undo`, back)."""
    halves = (w.shape[0] // heads // 2, 2) if undo else (2, w.shape[0] // heads // 2)
    return w.reshape(heads, *halves, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_divisors(config) -> torch.Tensor:
    """convert_hf_to_gguf's rope_freqs for Llama 3 rope scaling (written out here)."""
    p = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old, low, high, factor = (
        p["original_max_position_embeddings"],
        p["low_freq_factor"],
        p["high_freq_factor"],
        p["factor"],
    )
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _hf_tensors(model, arch: str):
    """(HF-style name, tensor) pairs as convert_hf_to_gguf feeds them to the name map: views of the
    model's fp32 parameters, so write_block_gguf can write its blocks' values back through them."""
    c = model.config
    for name, w in model.state_dict().items():
        w = w.float()
        if arch == "granitemoe":  # the names of the other families' MoE, which the name map knows too
            name = name.replace(".block_sparse_moe.router.", ".mlp.gate.").replace(".block_sparse_moe.", ".mlp.")
        if arch == "gpt-oss" and name.endswith("experts.gate_up_proj"):  # [E, H, 2I], gate/up columns alternating
            yield name.replace("gate_up_proj", "gate_proj.weight"), w.transpose(1, 2)[:, 0::2]
            yield name.replace("gate_up_proj", "up_proj.weight"), w.transpose(1, 2)[:, 1::2]
        elif arch == "gpt-oss" and name.endswith("experts.down_proj"):  # [E, I, H]
            yield name + ".weight", w.transpose(1, 2)
        elif name.endswith("experts.gate_up_proj_bias"):  # [E, 2I], alternating
            yield name.replace("gate_up_proj_bias", "gate_proj.bias"), w[:, 0::2]
            yield name.replace("gate_up_proj_bias", "up_proj.bias"), w[:, 1::2]
        elif name.endswith("experts.down_proj_bias"):
            yield name.replace("down_proj_bias", "down_proj.bias"), w
        elif name.endswith("sinks"):
            yield name + ".weight", w
        elif name.endswith("moe_statics.e_score_correction_bias"):  # ERNIE's [1, E], squeezed
            yield name.replace("gate.moe_statics.e_score_correction_bias", "moe_statics.e_score_correction.bias"), w[0]
        elif name.endswith("shared_expert_gate.weight"):  # [1, H], squeezed as convert_hf_to_gguf does
            yield name, w.squeeze(0)
        elif name.endswith("experts.gate_up_proj"):  # [E, 2I, H] -> gate, up [E, I, H]
            half = w.shape[1] // 2
            yield name.replace("gate_up_proj", "gate_proj.weight"), w[:, :half]
            yield name.replace("gate_up_proj", "up_proj.weight"), w[:, half:]
        elif name.endswith("experts.down_proj"):
            yield name + ".weight", w
        elif name.endswith("e_score_correction_bias"):
            yield name.replace("e_score_correction_bias", "e_score_correction.bias"), w
        elif name.endswith("kv_b_proj.weight"):  # split as llama.cpp's DeepseekV2Model does
            n, dn, dv = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
            k_b, v_b = w.view(n, dn + dv, -1).split([dn, dv], dim=1)
            yield name.replace("kv_b_proj", "k_b_proj"), k_b.transpose(1, 2)
            yield name.replace("kv_b_proj", "v_b_proj"), v_b
        elif arch in PERMUTED and ".q_proj." in name:  # weight and bias
            yield name, _llama_permute(w, c.num_attention_heads)
        elif arch in PERMUTED and ".k_proj." in name:
            yield name, _llama_permute(w, c.num_key_value_heads)
        elif name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        else:
            yield name, w


def _metadata(writer, model, arch: str) -> None:
    c = model.config
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if arch == "deepseek2":  # as llama.cpp's DeepseekV2Model writes it (MLA as MQA: one kv head)
        writer.add_head_count_kv(1)
        writer.add_leading_dense_block_count(c.first_k_dense_replace)
        if c.q_lora_rank:
            writer.add_q_lora_rank(c.q_lora_rank)
        writer.add_kv_lora_rank(c.kv_lora_rank)
        writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
        writer.add_value_length(c.kv_lora_rank)
        writer.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
        writer.add_value_length_mla(c.v_head_dim)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_count(c.n_routed_experts)
        writer.add_expert_shared_count(c.n_shared_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_group_count(c.n_group)
        writer.add_expert_group_used_count(c.topk_group)
        writer.add_expert_weights_scale(c.routed_scaling_factor)
        writer.add_expert_weights_norm(c.norm_topk_prob)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_rope_dimension_count(c.qk_rope_head_dim)
        return
    head_dim = getattr(c, "head_dim", None)  # written only where config.json states it
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim or c.hidden_size // c.num_attention_heads)
    if arch in ("qwen3moe", "qwen2moe", "olmoe"):
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    if arch in ("qwen3moe", "qwen2moe", "glm4moe", "dots1"):
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if arch in ("glm4moe", "dots1"):  # DeepSeek-V3's routing
        writer.add_expert_count(c.n_routed_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_group_count(c.n_group)
        writer.add_expert_group_used_count(c.topk_group)
        writer.add_expert_shared_count(c.n_shared_experts)
        writer.add_leading_dense_block_count(c.first_k_dense_replace)
        writer.add_expert_weights_scale(c.routed_scaling_factor)
        writer.add_expert_weights_norm(c.norm_topk_prob)
    if arch == "glm4moe":
        writer.add_block_count(c.num_hidden_layers + 1)  # and one MTP layer (see _mtp_layer)
        writer.add_nextn_predict_layers(1)
        writer.add_rope_dimension_count(int(c.head_dim * c.rope_parameters["partial_rotary_factor"]))
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if c.model_type in ("mixtral", "minimax_m2"):
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    if arch == "ernie4_5-moe":
        writer.add_expert_count(c.moe_num_experts)
        writer.add_expert_used_count(c.moe_k)
        writer.add_interleave_moe_layer_step(c.moe_layer_interval)
        writer.add_leading_dense_block_count(c.moe_layer_start_index)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_shared_count(c.moe_num_shared_experts)
    if arch == "granitemoe":
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_attention_scale(c.attention_multiplier)
        writer.add_embedding_scale(c.embedding_multiplier)
        writer.add_residual_scale(c.residual_multiplier)
        writer.add_logit_scale(c.logits_scaling)
    if arch == "hunyuan-moe":  # the NTK alpha folded into the base, as convert_hf_to_gguf does
        rope, dim = c.rope_parameters, c.hidden_size // c.num_attention_heads
        writer.add_rope_freq_base(rope["rope_theta"] * rope["alpha"] ** (dim / (dim - 2)))
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        writer.add_context_length(256 * 1024)
        writer.add_expert_count(c.num_experts)
        writer.add_expert_used_count(c.moe_topk)
        writer.add_expert_feed_forward_length(c.intermediate_size)
        writer.add_expert_shared_feed_forward_length(c.intermediate_size)
        writer.add_expert_shared_count(1)
    if arch == "minimax-m2":
        writer.add_expert_feed_forward_length(c.intermediate_size)
        writer.add_rope_dimension_count(c.rotary_dim)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if arch == "gpt-oss":
        rope = c.rope_parameters
        writer.add_expert_count(c.num_local_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.intermediate_size)
        writer.add_sliding_window(c.sliding_window)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])


def _tokenizer_metadata(writer, tokenizer_dir: Path) -> None:
    """A byte-level BPE vocabulary with merges ("gpt2"), padded to the model's rows, as llama.cpp writes it."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    vocab |= special
    tokens, types = [f"[PAD{i}]" for i in range(VOCAB)], [gguf.TokenType.UNUSED] * VOCAB
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(special["<|im_end|>"])
    writer.add_chat_template(CHAT_TEMPLATE)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "BF16": gguf.GGMLQuantizationType.BF16,
}


def _mtp_layer(writer, tensors: list[tuple[str, np.ndarray, object]], layers: int, seed: int = 0) -> None:
    """GLM-4.5's multi-token-prediction layer as convert_hf_to_gguf writes it after the model's
    layers: a decoder layer (random, shaped as the last) and its nextn.* tensors, which the engine ignores."""
    rng = np.random.default_rng(seed)
    hidden = next(data.shape[-1] for name, data, _ in tensors if name == "token_embd.weight")
    extra = [("nextn.eh_proj.weight", (hidden, 2 * hidden)), ("nextn.enorm.weight", (hidden,))]
    last = [(name.split(".", 2)[2], data.shape) for name, data, _ in tensors if name.startswith(f"blk.{layers - 1}.")]
    for rest, shape in last + extra:
        writer.add_tensor(f"blk.{layers}.{rest}", rng.standard_normal(shape).astype(np.float32))


def _fuse_gate_up(tensors: list[tuple[str, np.ndarray, object]]) -> list[tuple[str, np.ndarray, object]]:
    """convert_hf_to_gguf --fuse-gate-up-exps: each layer's ffn_gate_exps and ffn_up_exps (weights
    [E, I, H], biases [E, I]) as one ffn_gate_up_exps, gate rows (or bias columns) first."""
    by_name = {name: (data, qtype) for name, data, qtype in tensors}
    out = []
    for name, data, qtype in tensors:
        if ".ffn_up_exps." in name:
            continue
        if ".ffn_gate_exps." in name:
            up = by_name[name.replace("ffn_gate_exps", "ffn_up_exps")][0]
            name, data = name.replace("ffn_gate_exps", "ffn_gate_up_exps"), np.concatenate([data, up], axis=1)
        out.append((name, data, qtype))
    return out


def write_gguf(
    model, tokenizer_dir: Path, path: Path, *, ftype: str = "F32", split_max_tensors: int = 0, fuse: bool = False
) -> Path:
    """`model` (a tiny transformers model) as a GGUF at `path`, matrices in `ftype`, vectors in F32;
    with `fuse`, gate and up experts as one tensor."""
    arch = ARCHS[model.config.model_type]
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    _metadata(writer, model, arch)
    _tokenizer_metadata(writer, tokenizer_dir)
    layers = model.config.num_hidden_layers
    names = gguf.get_tensor_name_map(MODEL_ARCH[arch], layers + 1)
    if getattr(model.config, "rope_parameters", {}).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_divisors(model.config).numpy())
    tensors = []
    for hf_name, w in _hf_tensors(model, arch):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        qtype = _TYPES[ftype] if w.dim() >= 2 else gguf.GGMLQuantizationType.F32
        tensors.append((name, gguf.quants.quantize(w.contiguous().numpy().astype(np.float32), qtype), qtype))
    for name, data, qtype in _fuse_gate_up(tensors) if fuse else tensors:
        writer.add_tensor(name, data, raw_dtype=qtype)
    if arch == "glm4moe":
        _mtp_layer(writer, tensors, layers)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _build(name: str, **overrides):
    """CASES[name]'s model (as Case.build makes it) with config overrides, seeded."""
    case = CASES[name]
    config = getattr(transformers, case.config_class)(
        vocab_size=VOCAB,
        initializer_range=INIT,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **({"hidden_size": 64} | dict(case.kwargs) | overrides),
    )
    torch.manual_seed(0)
    model = getattr(transformers, case.model_class)(config).eval()
    if case.tweak is not None:
        with torch.no_grad():
            case.tweak(model)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> (transformers model, safetensors directory, GGUF writer for it)."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer_dir = add_tokenizer(root / "tokenizer")
    made = {}

    def get(name: str, ftype: str = "F32", **kw):
        key = (name, ftype, tuple(sorted(kw.items())))
        if key not in made:
            base = name.removesuffix("_plain")
            model = _build(base, **(LLAMA_PLAIN if name == "llama_plain" else AS_LLAMA_CPP.get(name, {})))
            directory = save(model, root / f"{name}-hf")
            path = write_gguf(model, tokenizer_dir, root / f"{name}-{ftype}.gguf", ftype=ftype, **kw)
            made[key] = (model, directory, path)
        return made[key]

    get.tokenizer_dir = tokenizer_dir
    return get


def _prompt(seed: int, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


MODELS = [
    "llama", "llama_plain", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3",
    "gpt_oss", "qwen2_moe", "glm4_moe", "olmoe", "dots1", "mixtral", "minimax_m2",
    "ernie4_5_moe", "granitemoe", "hunyuan_v1_moe",
]  # fmt: skip


@pytest.mark.parametrize("ftype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "deepseek_v3"])
def test_tensors_equal_the_source(files, name: str, ftype: str) -> None:
    _, directory, path = files(name, ftype)
    ours = load_checkpoint(path, dtype=torch.float32).net.state_dict()
    theirs = load_checkpoint(directory, dtype=torch.float32).net.state_dict()
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        if expected.dim() >= 2:  # matrices were stored in ftype; vectors in F32
            expected = expected.to(_DTYPES[ftype]).float()
        assert torch.equal(ours[key], expected), key


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_greedy_tokens_match_transformers(files, name: str) -> None:
    ref, _, path = files(name)
    assert_matches_transformers(engine.load_model(path), ref, _prompt(1)[None], name)


@pytest.mark.parametrize("name", ["gpt_oss", "qwen3_moe"])
def test_fused_gate_up_experts(files, tmp_path, name: str) -> None:
    # Newer convert_hf_to_gguf can write each layer's gate and up experts as one ffn_gate_up_exps.
    ref = _build(name, **AS_LLAMA_CPP.get(name, {}))
    path = write_gguf(ref, files.tokenizer_dir, tmp_path / "fused.gguf", fuse=True)
    assert_matches_transformers(engine.load_model(path), ref, _prompt(3)[None], name)


# transformers' own GGUF reader, where it maps this file's metadata fully (its qwen3 ignores
# key_length, its qwen3_moe expert_feed_forward_length): an independent reading of the same bytes.
@pytest.mark.parametrize("name", ["llama_plain", "qwen2"])
def test_logits_match_transformers_own_gguf_reading(files, name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, _, path = files(name)
    config = AutoConfig.for_model(**load_gguf_checkpoint(str(path))["config"])
    theirs = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=theirs)["tensors"]
    missing, unexpected = theirs.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head
    tokens = _prompt(4)
    with torch.no_grad():
        expected = theirs(tokens[None]).logits[0]
    rel = (engine.load_model(path).logits(tokens) - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4, f"{name}: relative logits error {rel:.2e}"


def test_config_tokenizer_and_chat_template_come_from_the_metadata(files) -> None:
    from transformers import AutoTokenizer

    _, _, path = files("qwen3_moe", "BF16")
    source = AutoTokenizer.from_pretrained(str(files.tokenizer_dir))
    model = engine.load_model(path, dtype="auto")
    assert model.net.model.embed_tokens.weight.dtype == torch.bfloat16  # "auto" is the stored type
    assert model.config["num_experts"] == 8 and model.config["norm_topk_prob"] is True
    assert model.eos_token_ids == (source.convert_tokens_to_ids("<|im_end|>"),)
    assert model.prompt_ids(SENTENCE) == source.encode(SENTENCE)  # load_model gives the model its tokenizer
    info = describe(path)  # what `moerag model info` prints
    assert info.weight_format.startswith("gguf (BF16") and 16 <= info.bits_per_weight < 16.5
    ours = load_tokenizer(path)
    assert ours.encode(SENTENCE, add_special_tokens=False) == source.encode(SENTENCE, add_special_tokens=False)
    chat = "<|im_start|>user\nhello<|im_end|>\n<think>"
    assert ours.encode(chat, add_special_tokens=False) == source.encode(chat, add_special_tokens=False)
    assert ours.decode(source.encode(SENTENCE)) == SENTENCE
    assert ours.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hello"}]
    assert chat_prompt(ours, messages) == chat_prompt(source, messages)


def test_split_files_load_from_the_first(files, tmp_path) -> None:
    model = _build("qwen3_moe")
    write_gguf(model, files.tokenizer_dir, tmp_path / "m.gguf", split_max_tensors=10)
    first = tmp_path / "m-00001-of-00003.gguf"
    assert len(split_files(first)) == 3
    tokens = _prompt(5)
    with torch.no_grad():
        expected = model(tokens[None]).logits[0]
    rel = (engine.load_model(first).logits(tokens) - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4
    with pytest.raises(CheckpointError, match="00001-of-00003"):
        engine.load_model(tmp_path / "m-00002-of-00003.gguf")


def test_summary_names_format_types_and_bits(files) -> None:
    _, _, path = files("qwen3", "BF16")
    summary = summarize(path)
    assert summary.format == "gguf" and set(summary.tensor_types) == {"BF16", "F32"}
    assert 16 < summary.bits_per_weight < 17  # BF16 matrices plus a few F32 norms
    assert read_config(path)["torch_dtype"] == "bfloat16"


def test_unsupported_tensor_types_are_refused_by_name(files, tmp_path) -> None:
    model = _build("qwen3")
    path = tmp_path / "q5_0.gguf"
    writer = gguf.GGUFWriter(path, "qwen3")
    _metadata(writer, model, "qwen3")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, model.config.num_hidden_layers)
    for hf_name, w in _hf_tensors(model, "qwen3"):
        qtype = gguf.GGMLQuantizationType.Q5_0 if w.dim() >= 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(
            names.get_name(hf_name, try_suffixes=(".weight", ".bias")),
            gguf.quants.quantize(w.numpy().astype(np.float32), qtype),
            raw_dtype=qtype,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    supported = "F32, F16, BF16, Q8_0, Q4_K, Q6_K, Q4_0, Q5_K"
    with pytest.raises(CheckpointError, match=rf"is Q5_0.*Supported GGUF tensor types: {supported}") as info:
        engine.load_model(path)
    assert "\n" not in str(info.value)


def test_block_rows_that_are_not_whole_blocks_are_refused() -> None:
    from engine.gguf import _check_types, _Tensor

    bad = _Tensor(Path("m.gguf"), "blk.0.attn_q.weight", "Q4_K", (8, 320), 0, 0)
    with pytest.raises(CheckpointError, match=r"blk.0.attn_q.weight is Q4_K with rows of 320 values.*block of 256"):
        _check_types(Path("m.gguf"), [bad])


# GGUF block types: the tiny model at widths that are whole K-quant blocks (256), written as
# llama.cpp writes a quantized file: matrices in blocks, the router and vectors in F32. gguf.quants
# quantizes Q8_0, Q4_0 and MXFP4; K-quant blocks are random bytes with sane fp16 scales (gguf has no
# K-quant quantizer). The transformers model then runs the gguf package's dequantized weights,
# an independent reading of the bytes; its logits are the reference.
BLOCK_WIDTHS = {"hidden_size": 256, "moe_intermediate_size": 256, "head_dim": 64}
BLOCK_TYPES = ["Q8_0", "Q4_K", "Q6_K", "Q4_0", "Q5_K", "MXFP4"]


def _blocks(w: torch.Tensor, qtype, seed: int) -> np.ndarray:
    """w [.., N, K] in GGUF blocks of `qtype` (or as floats, for F32)."""
    if qtype.name in ("Q8_0", "Q4_0", "MXFP4", "F32"):
        return gguf.quants.quantize(w.contiguous().numpy().astype(np.float32), qtype)
    # K-quants: d (and dmin) small enough that d * 63 * 15 (q4_k's largest) stays near INIT-sized weights
    return gguf_blocks(GGUF_FORMATS[qtype.name], tuple(w.shape), seed=seed, scale=2e-5).numpy()


def write_block_gguf(
    model, tokenizer_dir: Path, path: Path, qtype_name: str, mix: dict[str, str] | None = None
) -> Path:
    """`model` as a GGUF whose matrices (router aside) are `qtype_name` blocks, or `mix`'s type for
    the tensors named there; the model's own weights are overwritten in place with the blocks'
    dequantized values (gguf's reading)."""
    arch = ARCHS[model.config.model_type]
    writer = gguf.GGUFWriter(path, arch)
    _metadata(writer, model, arch)
    _tokenizer_metadata(writer, tokenizer_dir)
    names = gguf.get_tensor_name_map(MODEL_ARCH[arch], model.config.num_hidden_layers)
    for seed, (hf_name, w) in enumerate(_hf_tensors(model, arch)):  # fp32 views of the model's parameters
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        qtype = gguf.GGMLQuantizationType[(mix or {}).get(name, qtype_name)]
        # llama-quantize keeps vectors, biases and routers float, and widths that are not whole blocks
        if w.dim() < 2 or not name.endswith(".weight") or "gate_inp" in name or w.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F32
        data = _blocks(w, qtype, seed)
        values = torch.from_numpy(gguf.quants.dequantize(data, qtype))
        with torch.no_grad():
            if arch in PERMUTED and hf_name.endswith(("q_proj.weight", "k_proj.weight")):  # a permuted copy
                heads = model.config.num_attention_heads if "q_proj" in hf_name else model.config.num_key_value_heads
                model.get_parameter(hf_name).copy_(_llama_permute(values, heads, undo=True))
            else:
                w.copy_(values)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_block_types_stay_quantized_and_match_transformers(files, tmp_path, monkeypatch, qtype: str) -> None:
    from engine.ggml_quants import GGUFExperts, GGUFLinear

    ref = _build("qwen3_moe", **BLOCK_WIDTHS)
    path = write_block_gguf(ref, files.tokenizer_dir, tmp_path / f"m-{qtype}.gguf", qtype)
    tokens = _prompt(7)
    rounded = engine.load_model(path).logits(tokens)  # [T, V], the build this CPU runs (SIMD if it can)
    use_portable_kernels(monkeypatch)
    model = engine.load_model(path)
    fmt = GGUF_FORMATS[qtype]
    stored = [m for m in model.net.modules() if isinstance(m, (GGUFLinear, GGUFExperts))]
    assert len(stored) == 2 * 5 + 1  # per layer q, k, v, o and the experts; the head
    for m in stored:
        formats = (m.format,) if isinstance(m, GGUFLinear) else (m.gate_up_format, m.down_format)
        assert set(formats) == {fmt} and all(b.dtype == torch.uint8 for b in m.buffers())
    assert model.net.model.embed_tokens.weight.dtype == torch.float32  # widened: an embedding is a lookup
    info = describe(path)  # `moerag model info`: the block type and its bits (router and norms in F32 add some)
    assert qtype in info.weight_format and fmt.block_bytes * 8 / fmt.block <= info.bits_per_weight < 9
    assert_matches_transformers(model, ref, tokens[None], qtype)
    # The SIMD build's activations rounded to int8: ~0.5 % per product (test_native.py), 9 products
    # deep here (per block q/k/v, o, gate/up, down; then the head), measured up to 1.3e-2 of the
    # largest logit. Per position, as in test_quantize.py: a near-tied expert route may flip.
    exact = model.logits(tokens)
    per_position = (rounded - exact).abs().amax(dim=-1) / exact.abs().max()  # [T]
    assert (per_position < 4.5e-2).float().mean() >= 0.9, per_position


# Each family read since the first five, quantized as llama.cpp's tools leave it: Q8_0 matrices
# (routers, biases and widths that are not whole blocks stay F32, as llama-quantize keeps them), or
# gpt-oss as convert_hf_to_gguf writes the released checkpoints, MXFP4 experts beside float attention.
QUANTIZED = [
    "gpt_oss", "qwen2_moe", "glm4_moe", "olmoe", "dots1", "mixtral", "minimax_m2", "ernie4_5_moe", "granitemoe",
    "hunyuan_v1_moe",
]  # fmt: skip


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_families_stay_quantized_and_match_transformers(files, tmp_path, monkeypatch, name: str) -> None:
    from engine.ggml_quants import GGUFExperts, GGUFLinear
    from engine.moe import Experts

    ref = _build(name, **AS_LLAMA_CPP.get(name, {}))
    if name == "gpt_oss":
        layers, qtype = range(ref.config.num_hidden_layers), "MXFP4"
        mix = {f"blk.{i}.ffn_{p}_exps.weight": qtype for i in layers for p in ("gate", "up", "down")}
        path = write_block_gguf(ref, files.tokenizer_dir, tmp_path / "m.gguf", "F32", mix)
    else:
        qtype = "Q8_0"
        path = write_block_gguf(ref, files.tokenizer_dir, tmp_path / "m.gguf", qtype)
    use_portable_kernels(monkeypatch)  # transformers' arithmetic (fp32 activations)
    model = engine.load_model(path)
    fmt, modules = GGUF_FORMATS[qtype], list(model.net.modules())
    experts = [m for m in modules if isinstance(m, GGUFExperts)]
    assert experts and not any(isinstance(m, Experts) for m in modules)  # every layer's experts kept as blocks
    assert all(m.gate_up_format == fmt and m.down_format == fmt for m in experts)
    linears = [m for m in modules if isinstance(m, GGUFLinear)]
    assert (len(linears) == 0) if name == "gpt_oss" else (linears and all(m.format == fmt for m in linears))
    tokens = _prompt(10)
    with torch.no_grad():
        expected = ref(tokens[None]).logits[0]  # [T, V]; greedy decoding is the float files' test above
    rel = (model.logits(tokens) - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4, f"{name} in {qtype}: relative logits error {rel:.2e}"


def test_unsupported_architecture_is_named(tmp_path) -> None:
    path = tmp_path / "g.gguf"
    writer = gguf.GGUFWriter(path, "gemma2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    supported = (
        "llama, qwen2, qwen3, qwen3moe, qwen2moe, olmoe, deepseek2, glm4moe, dots1, granitemoe, hunyuan-moe, "
        "ernie4_5-moe, minimax-m2, gpt-oss"
    )
    with pytest.raises(UnsupportedArchitectureError, match=rf"'gemma2'.*Supported: {supported}\. .*qwen3_next"):
        engine.load_model(path)


def test_a_gguf_quantizes_to_a_checkpoint_that_loads_directly(files, tmp_path) -> None:
    # `moerag model quantize x.gguf DST`: the written checkpoint carries the GGUF's tokenizer and
    # decodes exactly as the GGUF quantized while loading.
    _, _, path = files("qwen3_moe", "F32")
    engine.quantize_checkpoint(path, tmp_path / "q", scheme="int8")
    written = engine.load_model(tmp_path / "q")
    assert written.tokenizer is not None
    assert written.prompt_ids(SENTENCE) == engine.load_model(path).prompt_ids(SENTENCE)
    want = engine.load_model(path, quantize="int8").generate(_prompt(6), max_new_tokens=8, eos_token_ids=())
    assert written.generate(_prompt(6), max_new_tokens=8, eos_token_ids=()) == want


def test_block_types_requantize_while_loading(files, tmp_path) -> None:
    # quantize="int8" on a Q4_K file: each GGUF module is widened alone, then quantized again.
    from engine.ggml_quants import GGUF_MODULES
    from engine.quantization import QuantizedExperts

    ref = _build("qwen3_moe", **BLOCK_WIDTHS)
    path = write_block_gguf(ref, files.tokenizer_dir, tmp_path / "m.gguf", "Q4_K")
    blocks, int8 = engine.load_model(path), engine.load_model(path, quantize="int8")
    assert not any(isinstance(m, GGUF_MODULES) for m in int8.net.modules())
    assert sum(isinstance(m, QuantizedExperts) for m in int8.net.modules()) == 2
    tokens = _prompt(8)
    want = blocks.logits(tokens)
    rel = (int8.logits(tokens) - want).abs().max() / want.abs().max()
    # int8's own rounding of the widened weights (measured 1.6e-3); a wrong module or layout is O(1)
    assert rel < 1e-2, f"int8 of the Q4_K weights: relative logits error {rel:.2e}"


def test_mixed_block_types_as_in_q4_k_m_files(files, tmp_path, monkeypatch) -> None:
    # Q4_K_M keeps attn_v and some ffn_down_exps in Q6_K: block 0's q, k, v mix types, block 1's
    # experts mix them (gate and up Q4_K, down Q6_K); both still decode in the fused block kernel
    # (block types share one prepared input; the MoE reads down in its own type).
    ref = _build("qwen3_moe", **BLOCK_WIDTHS)
    mix = {"blk.0.attn_v.weight": "Q6_K", "blk.1.ffn_down_exps.weight": "Q6_K"}
    use_portable_kernels(monkeypatch)  # transformers' arithmetic (fp32 activations)
    model = engine.load_model(write_block_gguf(ref, files.tokenizer_dir, tmp_path / "m.gguf", "Q4_K", mix))
    tokens = _prompt(9)
    with torch.no_grad():
        expected = ref(tokens[None]).logits[0]  # [T, V]
        want = ref.generate(tokens[None], max_new_tokens=NEW_TOKENS, do_sample=False)[0, tokens.numel() :]
    rel = (model.logits(tokens) - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4, f"relative logits error {rel:.2e}"
    assert model.generate(tokens, max_new_tokens=NEW_TOKENS, eos_token_ids=()) == want.tolist()
    blocks = model.net._native.blocks
    assert blocks[0].fused is not None and blocks[1].fused is not None
