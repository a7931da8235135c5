"""Decode and prefill of the 2025-26 families on ~1B random bench checkpoints (gpt-oss, Qwen3.5-MoE).

One table per architecture, every ratio from figures measured in the same run: decode tokens/s in
bf16 and int4 as a % of the memory-bandwidth limit (the bytes of weights a token reads, experts at
their top-k share, plus its KV cache / recurrent state, over the fastest streaming rate measured,
as bench/engine.py does), and prefill of 1,024 tokens as a % of the fp32 matmul rate.

    .venv/bin/python bench/architectures.py [--arch gpt_oss qwen3_5_moe] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/, comes first

import torch  # noqa: E402

import engine  # noqa: E402
from bench.engine import (  # noqa: E402
    active_weight_bytes,
    engine_decode,
    engine_prefill,
    gemv_rates,
    matmul_rate,
    memory_bandwidth,
)
from engine.info import describe  # noqa: E402

log = logging.getLogger("bench.architectures")

_COMMON = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=12, max_position_embeddings=4096,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
CONFIGS = {
    # 32 experts of width 768, 4 a token; sliding window 128 on every other layer.
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        _COMMON, num_attention_heads=16, num_key_value_heads=4, head_dim=64, intermediate_size=768,
        num_local_experts=32, num_experts_per_tok=4, sliding_window=128)),
    # Three Gated DeltaNet layers to each full attention one; 64 experts of width 384, 8 a token.
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        _COMMON, num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=3072,
        moe_intermediate_size=384, shared_expert_intermediate_size=384, num_experts=64, num_experts_per_tok=8,
        linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64, linear_value_head_dim=64)),
}  # fmt: skip


def make_checkpoint(arch: str, directory: Path) -> Path:
    if (directory / "config.json").is_file():
        return directory
    import transformers

    config_class, model_class, kwargs = CONFIGS[arch]
    torch.manual_seed(0)
    log.info("building the random %s bench checkpoint in %s (once)", arch, directory)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def state_bytes(model: engine.Model, context: int) -> int:
    """Bytes of KV cache / recurrent state a decode step reads at `context` tokens (one sequence)."""
    return sum(t.nbytes for layer in model.net.new_cache(1, context) for t in layer)


def bench(arch: str, directory: Path, bandwidth: float, flops: float, prompt_tokens: int, new_tokens: int) -> None:
    kwargs = CONFIGS[arch][2]
    experts = kwargs.get("num_local_experts") or kwargs["num_experts"]
    share = kwargs["num_experts_per_tok"] / experts
    prompt = torch.randint(0, kwargs["vocab_size"], (prompt_tokens,), generator=torch.Generator().manual_seed(0))
    active = describe(directory).active_params  # per token: prefill's 2 flops a weight
    print(f"\n{arch}: {sum(p.stat().st_size for p in directory.glob('*.safetensors')) / 4e9:.2f} B params")
    print(f"{'':12} {'decode tok/s':>12} {'% BW limit':>11} {'prefill 1024 % matmul':>22}")
    for label, scheme in (("bf16", None), ("int4 g128", "int4")):
        model = engine.load_model(directory, dtype=torch.bfloat16, quantize=scheme)
        _, tps = engine_decode(model, prompt, new_tokens)
        limit = bandwidth / (active_weight_bytes(model, share) + state_bytes(model, prompt_tokens + new_tokens // 2))
        prefill = engine_prefill(model, 1024)
        print(f"{label:12} {tps:12.2f} {100 * tps / limit:10.0f} % {100 * prefill * 2 * active / flops:21.0f} %")
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    opts = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    read, copy = memory_bandwidth()
    bandwidth, flops = max(read, copy, *gemv_rates().values()), matmul_rate()
    print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s | fp32 matmul {flops / 1e9:.0f} GFLOP/s")
    for arch in opts.arch:
        directory = make_checkpoint(arch, Path(f"bench/out/{arch}-1b"))
        bench(arch, directory, bandwidth, flops, opts.prompt_tokens, opts.decode_tokens)


if __name__ == "__main__":
    main()
