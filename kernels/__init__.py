"""GPU kernels for expert routing (Triton), each beside its plain-torch reference.

weights, ids = kernels.route(logits, top_k=8, scoring="softmax", renormalize=True)
y = kernels.fused_moe(x, w13, w2, weights, ids)                  # bf16/fp16/fp32 experts
y = kernels.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, quant="int4")
On a machine without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1, set before
import): correct, and thousands of times slower than torch. Imports only torch and triton.
"""

from kernels.align import Alignment, align, align_reference
from kernels.fused_moe import dequantize, fused_moe, fused_moe_reference, quantize_int4, quantize_int8
from kernels.routing import route, route_reference

__all__ = [
    "Alignment",
    "align",
    "align_reference",
    "dequantize",
    "fused_moe",
    "fused_moe_reference",
    "quantize_int4",
    "quantize_int8",
    "route",
    "route_reference",
]
