"""GPU benchmark of the expert kernels (needs CUDA): one command, one table.

    .venv/bin/python -m bench.kernels [--tokens 1 8 64 512 4096] [--skip-transformers]

Shapes (issue #7): a Qwen3-30B-A3B layer (E=128, K=8, H=2048, I=768) and a DeepSeek-V3 layer
(E=256, K=8, H=7168, I=2048; 8 groups, 4 kept), bf16 and int4 (group 128), for each token count.
Measured in the same run: the copy bandwidth (a large device-to-device copy) and the bf16 matmul
rate (a large square GEMM), the physical limits. Per row:
  decode (1 and 8 tokens): bytes of the selected experts' weights / time, as a % of the copy
      bandwidth (target >= 50 %), and the speed-up over transformers' experts (eager and
      grouped_mm, same shapes and routing; target >= 5x);
  prefill (4096 tokens): achieved FLOP/s as a % of the matmul rate (target >= 40 %).
Times are CUDA-event medians after warm-up, with the routing (kernels.route) included.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from kernels import fused_moe, route
from kernels.formats import quantize_int4

SHAPES = {
    "qwen3-30b-a3b": dict(e=128, k=8, h=2048, i=768, n_group=1, topk_group=1, scoring="softmax"),
    "deepseek-v3": dict(e=256, k=8, h=7168, i=2048, n_group=8, topk_group=4, scoring="sigmoid"),
}


def timed(fn, *, iters: int = 50, warmup: int = 5) -> float:
    """Median seconds of fn() over `iters` CUDA-event timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), iters=20)  # read + write bytes / s


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / timed(lambda: a @ b, iters=20)


def transformers_experts(shape: dict, w13: torch.Tensor, w2: torch.Tensor, implementation: str):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=shape["h"], moe_intermediate_size=shape["i"], num_experts=shape["e"],
                            num_experts_per_tok=shape["k"])
    config._experts_implementation = implementation
    experts = Qwen3MoeExperts(config).to(device="cuda", dtype=torch.bfloat16)
    experts.gate_up_proj.data.copy_(w13)
    experts.down_proj.data.copy_(w2)
    return experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.kernels needs a CUDA GPU (the kernels run on CPU only in Triton's interpreter, for tests).")
    torch.manual_seed(0)
    bw, flops = copy_bandwidth(), matmul_rate()
    print(f"{torch.cuda.get_device_name()} | copy bandwidth {bw / 1e9:.0f} GB/s | bf16 matmul {flops / 1e12:.0f} TFLOP/s\n")
    print(f"{'shape':15} {'dtype':5} {'T':>5} {'ms':>8} {'GB/s':>7} {'% BW':>6} {'TFLOP/s':>8} {'% MM':>6} "
          f"{'vs eager':>9} {'vs grouped_mm':>14}")
    for name in args.shapes:
        shape = SHAPES[name]
        e, k, h, i = shape["e"], shape["k"], shape["h"], shape["i"]
        w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) * 0.02
        q13, s13 = quantize_int4(w13, 128)
        q2, s2 = quantize_int4(w2, 128)
        bias = torch.randn(e, device="cuda") * 0.1 if shape["scoring"] == "sigmoid" else None
        hf = {}
        if not args.skip_transformers:
            hf = {impl: transformers_experts(shape, w13, w2, impl) for impl in ("eager", "grouped_mm")}
        for t in args.tokens:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
            logits = torch.randn(t, e, device="cuda")

            def routing():
                return route(logits, top_k=k, scoring=shape["scoring"], n_group=shape["n_group"],
                             topk_group=shape["topk_group"], bias=bias)

            weights, ids = routing()
            active = int(torch.unique(ids).numel())  # experts whose weights a step must read
            for dtype, call, bytes_per_weight in (
                ("bf16", lambda: fused_moe(x, w13, w2, *routing()), 2.0),
                ("int4", lambda: fused_moe(x, q13, q2, *routing(), w13_scale=s13, w2_scale=s2),
                 0.5 + 2 * 2 / 128),  # 4 bits + a bf16 scale and zero per 128 weights
            ):
                seconds = timed(call, iters=20 if t >= 512 else 50)
                moved = active * 3 * h * i * bytes_per_weight
                work = 2 * t * k * 3 * h * i
                ratios = ["-", "-"]
                if hf and dtype == "bf16" and t <= 512:
                    for j, impl in enumerate(("eager", "grouped_mm")):
                        try:
                            theirs = timed(lambda: hf[impl](x, ids.long(), weights.to(x.dtype)), iters=10, warmup=2)
                            ratios[j] = f"{theirs / seconds:.1f}x"
                        except Exception as exc:  # noqa: BLE001 -- an implementation missing here is reported
                            ratios[j] = f"n/a ({exc.__class__.__name__})"
                print(f"{name:15} {dtype:5} {t:5d} {seconds * 1e3:8.3f} {moved / seconds / 1e9:7.0f} "
                      f"{100 * moved / seconds / bw:5.0f}% {work / seconds / 1e12:8.1f} {100 * work / seconds / flops:5.0f}% "
                      f"{ratios[0]:>9} {ratios[1]:>14}")


if __name__ == "__main__":
    main()
