"""GPU kernels for expert routing (Triton), each beside its plain-torch reference, and the weight
formats (kernels/formats.py) that they and the engine's CPU kernels share.

weights, ids = kernels.route(logits, top_k=8, scoring="softmax", renormalize=True)
y = kernels.fused_moe(x, w13, w2, weights, ids)                  # bf16/fp16/fp32 experts
y = kernels.fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2)  # int8 / int4 experts (kernels/formats.py)
On a machine without CUDA they run in Triton's interpreter (TRITON_INTERPRET=1, set before
first use): correct, and thousands of times slower than torch. Imports only torch and triton,
and triton only when a kernel is first used: `kernels.formats` is plain torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Alignment": "kernels.alignment",
    "align": "kernels.alignment",
    "align_reference": "kernels.alignment",
    "fused_moe": "kernels.experts",
    "fused_moe_reference": "kernels.experts",
    "route": "kernels.routing",
    "route_reference": "kernels.routing",
}

__all__ = ["Alignment", "align", "align_reference", "fused_moe", "fused_moe_reference", "route", "route_reference"]


def __getattr__(name: str) -> Any:  # PEP 562: triton loads on first use, not on `import kernels.formats`
    if name not in _PUBLIC:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
