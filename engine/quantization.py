"""Weight-only quantization as a transform: `quantize(model, "int8" | "int4")` swaps modules in place.

int8: per output channel, w [N, K] ~= q * s [N], s = max|w[n, :]| / 127.
int4: asymmetric per group of `group_size` inputs, w ~= (q - 8) * scale + zero (see kernels/formats.py).
Activations stay in the model dtype (the native int4 kernel rounds them to int8 per 32 inside
the product). Shapes: N outputs, K inputs, E experts, G groups. The architecture files never
mention quantization.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from engine.decoder import CausalLM
from engine.errors import EngineError
from engine.experts import EXPERT_BACKENDS
from engine.fp8 import FP8_MODULES, Fp8Experts
from engine.ggml_quants import GGUF_MODULES, GGUFExperts
from engine.gptq import INT4ZP_EXPERTS, INT4ZP_LINEARS
from engine.layers import StoredWeights
from engine.moe import Experts
from engine.qmatmul import linear as qlinear
from kernels.formats import INT4_GROUPS, quantize_int4, quantize_int8

log = logging.getLogger(__name__)

STORED_EXPERTS = (Fp8Experts, GGUFExperts, *INT4ZP_EXPERTS)  # re-quantized from their stored weights (`widened`)
STORED_LINEARS = (*FP8_MODULES, *GGUF_MODULES, *INT4ZP_LINEARS)  # ... (`to_float`)

SCHEMES = ("int8", "int4")
TARGETS = ("experts", "attention", "mlp", "head")


class QuantizedLinear(StoredWeights):
    """A Linear whose weight is int8 or int4 (`weight`, `scale` as in kernels/formats.py); same call."""

    def __init__(self, linear: nn.Linear, scheme: str, group: int) -> None:
        super().__init__()
        w = linear.weight.data
        q, scale = quantize_int8(w) if scheme == "int8" else quantize_int4(w, group)
        self.register_buffer("weight", q)  # int8 [N, K] or packed int4 [N, K/2]
        self.register_buffer("scale", scale)  # int8: fp32 [N]; int4: bf16 [N, G, 2]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlinear(x, self.weight, self.scale, self.bias)


class QuantizedExperts(StoredWeights):
    """Stacked int8 or int4 experts with their scales; same call as `Experts`."""

    def __init__(self, experts: nn.Module, scheme: str, group: int) -> None:
        super().__init__()
        for name in ("gate_up_proj", "down_proj"):  # [E, 2I, H], [E, H, I]
            # Stored-quantized experts widen one weight at a time: the layer's float copy is never whole.
            w = getattr(experts, name).data if isinstance(experts, Experts) else experts.widened(name)
            q, scale = quantize_int8(w) if scheme == "int8" else quantize_int4(w, group)
            self.register_buffer(name, q)
            self.register_buffer(name.replace("_proj", "_scale"), scale)
            del w, q, scale
        self.backend = experts.backend

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return EXPERT_BACKENDS[self.backend](
            x, self.gate_up_proj, self.down_proj, weights, ids, w13_scale=self.gate_up_scale, w2_scale=self.down_scale
        )


def _target(name: str) -> str:
    parts = name.split(".")
    if parts[-1] == "lm_head":
        return "head"
    return "attention" if "self_attn" in parts else "mlp"


def check_scheme(scheme: str, *, targets: tuple[str, ...] = TARGETS, group_size: int = 128) -> None:
    """Refuse an unknown scheme, target or int4 group size with an EngineError that lists the choices."""
    if scheme not in SCHEMES:
        raise EngineError(f"Unknown quantization scheme {scheme!r}; available: {', '.join(SCHEMES)}.")
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise EngineError(f"Unknown quantization targets {sorted(unknown)}; choose from {', '.join(TARGETS)}.")
    if scheme == "int4" and group_size not in INT4_GROUPS:
        raise EngineError(f"int4 group_size must be one of 32, 64, 128, 256; got {group_size}.")


def quantize(model: Any, scheme: str = "int8", *, targets: tuple[str, ...] = TARGETS, group_size: int = 128) -> Any:
    """Quantize a loaded Model (or its net) in place and return it.

    targets: any of "experts", "attention", "mlp" (dense MLPs and shared experts), "head".
    Routers, norms and embeddings stay in the model dtype: they are small and sensitive.
    group_size (int4 only): inputs per scale; a layer whose width it does not divide stays float.
    """
    check_scheme(scheme, targets=targets, group_size=group_size)
    net: nn.Module = getattr(model, "net", model)
    swaps = quantize_modules(net, scheme, targets=targets, group_size=group_size)
    log.info("quantized %d modules to %s", swaps, scheme)
    return model


def quantize_modules(net: nn.Module, scheme: str, *, targets: tuple[str, ...] = TARGETS, group_size: int = 128) -> int:
    """Swap the float modules under `net` (a whole model or one decoder layer); returns the count.

    Already-quantized modules are left alone, so the loader can call this per layer and then once
    more on the whole model (for the head). FP8 and GGUF modules (engine.fp8, engine.ggml_quants) are
    dequantized one at a time and quantized again; one the scheme cannot take (int4's group) becomes
    float in the model dtype, as a float one would stay. Works on the meta device too (shapes only). A whole
    CausalLM forgets what it built from its old weights; after quantizing a part of a model that
    has already run, call the model's `weights_changed()`.
    """
    chosen: list[tuple[str, nn.Module, str, nn.Module]] = []
    for parent_name, parent in net.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            experts = isinstance(child, (Experts, *STORED_EXPERTS))
            if (experts and "experts" in targets) or (
                isinstance(child, (nn.Linear, *STORED_LINEARS)) and not experts and _target(full) in targets
            ):
                chosen.append((full, parent, child_name, child))
    swaps = 0
    while chosen:
        # One module at a time, dropping our reference to each float module as soon as it is
        # swapped out, so peak memory grows by one quantized module, not by all of them.
        full, parent, child_name, child = chosen.pop(0)
        new = _quantized(child, scheme, group_size)
        del child
        if new is None:
            log.debug("%s stays float: its input width is not a multiple of group_size %d", full, group_size)
            continue
        setattr(parent, child_name, new)
        swaps += 1
    if swaps and isinstance(net, CausalLM):
        net.weights_changed()
    return swaps


def _quantized(module: nn.Module, scheme: str, group: int) -> nn.Module | None:
    if isinstance(module, STORED_EXPERTS):  # re-quantized from their stored weights
        if scheme == "int4" and any(module.float_inputs(n) % group for n in ("gate_up_proj", "down_proj")):
            return module.to_float()  # int4 cannot take them: float, as dequantized
        return QuantizedExperts(module, scheme, group)
    if isinstance(module, STORED_LINEARS):
        module = module.to_float()  # [N, K] in the model dtype, this module only
        return _quantized(module, scheme, group) or module
    experts = isinstance(module, Experts)
    if scheme == "int4":
        widths = [module.gate_up_proj.shape[-1], module.down_proj.shape[-1]] if experts else [module.in_features]
        if any(w % group for w in widths):
            return None
    return QuantizedExperts(module, scheme, group) if experts else QuantizedLinear(module, scheme, group)
