"""Tiny checkpoints written in each exact format the engine loads (safetensors, fp8 blocks, MXFP4 pairs,
GGUF blocks, a tokenizer), from the models of tests/engine/cases.py, and the comparisons with
transformers that the format suites share.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kernels.formats import Format
from tests.engine.cases import CASES


def save(model: nn.Module, directory: Path, **kwargs: Any) -> Path:
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def add_tokenizer(directory: Path) -> Path:
    """Train a tiny byte-level BPE tokenizer with a Qwen-style chat template into `directory` (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # below the model's 320 rows
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, the engine answers questions about documents"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory


class RoutingRecorder:
    """Collects the expert ids [T, K] each router returns, in call order, via forward hooks.

    Works on transformers' routers (output: logits, weights, ids) and ours (output: weights, ids):
    modules at `mlp.gate` or `mlp.router` (Granite: `block_sparse_moe.router`, Llama 4:
    `feed_forward.router`) whose class is a *Router (Hunyuan's: *Gate).
    """

    def __init__(self, model: nn.Module) -> None:
        self.ids: list[torch.Tensor] = []
        self.handles = [
            module.register_forward_hook(self._hook)
            for name, module in model.named_modules()
            if name.endswith(("mlp.gate", "mlp.router", "block_sparse_moe.router", "feed_forward.router"))
            and type(module).__name__.endswith(("Router", "Gate"))
        ]

    def _hook(self, module: nn.Module, inputs: Any, output: tuple[torch.Tensor, ...]) -> None:
        ids = output[-1]
        if ids.is_floating_point():  # Llama 4's router ends with its logits [T, E]: their top k
            ids = ids.topk(module.top_k, dim=-1).indices
        self.ids.append(ids.detach().clone())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], weight_scale_inv [ceil(N/Bo), ceil(K/B)] fp32) as DeepSeek-V3
    quantizes: one scale per [Bo, B] block, max|w| / 448, edge blocks partial."""
    (n, k), (bo, bi) = w.shape, block
    rows, cols = -(-n // bo), -(-k // bi)
    padded = torch.zeros(rows * bo, cols * bi)
    padded[:n, :k] = w.float()
    scale = padded.view(rows, bo, cols, bi).abs().amax(dim=(1, 3)) / 448.0  # [rows, cols]
    per_weight = scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:n, :k]  # [N, K]
    return (w.float() / per_weight).to(torch.float8_e4m3fn), scale


def _fp8_stays_float(name: str) -> bool:
    # DeepSeek-V3 keeps embeddings, the head, norms and the router in bf16.
    return not name.endswith(".weight") or any(p in name for p in ("embed_tokens", "lm_head", "norm", "mlp.gate."))


def save_fp8(model: nn.Module, directory: Path, block: tuple[int, int]) -> Path:
    """Write `model` as a DeepSeek-V3 FP8 checkpoint: every projection float8_e4m3fn with its
    weight_scale_inv, experts one tensor per expert and projection, the rest bf16, and
    config.json's quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": block}."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, w in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, 2I, H] / [E, H, I]
            prefix = name.rsplit(".", 1)[0]
            for e, we in enumerate(w):
                parts = (("gate_proj", we[: we.shape[0] // 2]), ("up_proj", we[we.shape[0] // 2 :]))
                for proj, part in parts if name.endswith("gate_up_proj") else (("down_proj", we),):
                    q, scale = _fp8_blocks(part, block)
                    tensors[f"{prefix}.{e}.{proj}.weight"], tensors[f"{prefix}.{e}.{proj}.weight_scale_inv"] = q, scale
        elif w.dim() == 2 and not _fp8_stays_float(name):
            tensors[name], tensors[name.removesuffix(".weight") + ".weight_scale_inv"] = _fp8_blocks(w, block)
        elif not name.endswith("lm_head.weight") or not model.config.tie_word_embeddings:
            tensors[name] = w.to(torch.bfloat16) if "correction_bias" not in name else w.float()
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    config = model.config.to_dict()
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


_GGUF_SCALES = {"q8_0": (0,), "q4_0": (0,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}  # each block's fp16s


def gguf_blocks(fmt: Format, shape: tuple[int, ...], *, seed: int = 0, scale: float = 1 / 8) -> torch.Tensor:
    """Random GGUF blocks [.., N, K / block * bytes] of `fmt` for weights [.., N, K]: every byte random
    but each block's fp16 scales (d, and dmin for q4_k / q5_k), which are in [0.5, 1.5) * `scale`
    (K-quants multiply them by 6- or 8-bit sub-scales too), so the weights are finite and bounded."""
    rows, k = math.prod(shape[:-1]), shape[-1]
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows * k // fmt.block, fmt.block_bytes), dtype=torch.uint8, generator=g)
    for at in _GGUF_SCALES[fmt.name]:
        d = (torch.rand(blocks.shape[0], generator=g) + 0.5) * scale
        blocks[:, at : at + 2] = d.to(torch.float16).view(-1, 1).view(torch.uint8)
    return blocks.view(*shape[:-1], k // fmt.block * fmt.block_bytes)


def _mxfp4_pair(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [.., N, K] (K a multiple of 32) -> OCP MXFP4 (blocks [.., N, K/32, 16] uint8, scales [.., N, K/32]
    uint8): per 32 inputs the power of two that puts the largest at or under e2m1's 6, each input the
    nearest e2m1 code, input 2j in the low nibble of byte j."""
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    groups = w.float().unflatten(-1, (-1, 32))  # [.., N, G, 32]
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2.0**-100) / 6))  # [.., N, G]
    codes = (groups / torch.exp2(exponent)[..., None])[..., None].sub(values).abs().argmin(-1)  # [.., N, G, 32]
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)  # [.., N, G, 16]
    return blocks, (exponent + 127).to(torch.uint8)


def save_mxfp4(model: nn.Module, directory: Path, *, stacked: bool, attention: bool = True) -> Path:
    """Write `model` as an MXFP4 checkpoint (gpt-oss's quantization_config): the experts (and q_proj
    with `attention`) as `P_blocks` / `P_scales` pairs, the experts stacked (`experts.gate_up_proj_blocks`)
    or one pair per expert and projection (`experts.3.gate_proj.weight_blocks`), the rest bf16.
    gpt-oss holds its float experts transposed ([E, H, 2I]); its blocks are rows of outputs, as gpt-oss
    publishes them."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, w in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, 2I, H] / [E, H, I]
            if model.config.model_type == "gpt_oss":
                w = w.transpose(1, 2)
            if stacked:
                tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = _mxfp4_pair(w)
                continue
            prefix = name.rsplit(".", 1)[0]
            for e, we in enumerate(w):
                parts = (("gate_proj", we[: we.shape[0] // 2]), ("up_proj", we[we.shape[0] // 2 :]))
                for proj, part in parts if name.endswith("gate_up_proj") else (("down_proj", we),):
                    pair = _mxfp4_pair(part)
                    tensors[f"{prefix}.{e}.{proj}.weight_blocks"], tensors[f"{prefix}.{e}.{proj}.weight_scales"] = pair
        elif attention and name.endswith("q_proj.weight"):
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = _mxfp4_pair(w)
        elif not name.endswith("lm_head.weight") or not model.config.tie_word_embeddings:
            tensors[name] = w.to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    config = model.config.to_dict()
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head", "embed_tokens"]}
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


_PER_EXPERT = re.compile(r"(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")


def transformers_model(name: str, weights: dict[str, torch.Tensor]) -> nn.Module:
    """transformers' model for case `name` holding `weights` (a checkpoint's, dequantized): one tensor
    per expert and projection are stacked as transformers holds them ([E, 2I, H] and [E, H, I])."""
    state, experts = {}, {}
    for key, w in weights.items():
        match = _PER_EXPERT.fullmatch(key)
        if match:
            experts.setdefault(match["prefix"], {})[(int(match["e"]), match["proj"])] = w
        else:
            state[key] = w
    for prefix, parts in experts.items():
        count = 1 + max(e for e, _ in parts)
        state[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(count)]
        )  # [E, 2I, H]
        state[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(count)])  # [E, H, I]
    ref = CASES[name].build()
    ref.load_state_dict(state)
    return ref.eval()


def use_portable_kernels(monkeypatch) -> None:
    """Run the native kernels' portable build from here on, whose activations stay fp32 as the
    reference's do. The SIMD build rounds them to int8 per group for the integer and block formats
    (~0.5 % a product, checked against that definition in tests/engine/test_native.py): enough to
    flip a greedy token of a random tiny model, not a bug."""
    from engine import native

    portable = native.library(scalar=True)
    monkeypatch.setattr(native, "library", lambda scalar=False: portable)


def assert_matches_transformers(model: Any, ref: nn.Module, tokens: torch.Tensor, label: str = "") -> None:
    """fp32 logits within 1e-4 of the largest of transformers' on the same weights, for every row of
    tokens [B, T] (the math in another order), and the same 32 greedy tokens after the first row."""
    with torch.no_grad():
        expected = ref(tokens).logits  # [B, T, V]
        want = ref.generate(tokens[:1], max_new_tokens=32, do_sample=False)[0, tokens.shape[1] :]
    rel = (model.logits(tokens) - expected).abs().max() / expected.abs().max()
    assert rel < 1e-4, f"{label}: relative logits error {rel:.2e}"
    assert model.generate(tokens[0], max_new_tokens=32, eos_token_ids=()) == want.tolist()
