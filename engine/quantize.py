"""Weight-only quantization as a transform: `quantize(model, "int8" | "int4")` swaps modules in place.

int8: per output channel, w [N, K] ~= q * s [N], s = max|w[n, :]| / 127.
int4: asymmetric per group of `group_size` inputs, w ~= (q - 8) * scale + zero (see qmatmul).
Activations stay in the model dtype (int4's fused kernel rounds them to bf16). Shapes: N
outputs, K inputs, E experts, G groups. The architecture files never mention quantization.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from engine.errors import EngineError
from engine.experts import EXPERT_BACKENDS
from engine.moe import Experts
from engine.qmatmul import INT4_GROUPS, int4_fused_ok, int4_matmul, int8_matmul, pack_int4, quantize_int4, quantize_int8

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
TARGETS = ("experts", "attention", "mlp", "head")


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scales = quantize_int8(linear.weight.data)
        self.register_buffer("weight", q)  # [N, K] int8
        self.register_buffer("scales", scales.to(linear.weight.dtype))  # [N]
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = int8_matmul(x.reshape(-1, shape[-1]), self.weight, self.scales)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], y.shape[-1])


class Int8Experts(nn.Module):
    """Stacked int8 experts with per-channel scales; same call as `Experts`."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        q13, s13 = quantize_int8(experts.gate_up_proj.data)  # [E, 2I, H], [E, 2I]
        q2, s2 = quantize_int8(experts.down_proj.data)  # [E, H, I], [E, H]
        dtype = experts.gate_up_proj.dtype
        self.register_buffer("gate_up_proj", q13)
        self.register_buffer("gate_up_scale", s13.to(dtype))
        self.register_buffer("down_proj", q2)
        self.register_buffer("down_scale", s2.to(dtype))
        self.backend = experts.backend

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return EXPERT_BACKENDS[self.backend](
            x, self.gate_up_proj, self.down_proj, weights, ids, w13_scale=self.gate_up_scale, w2_scale=self.down_scale
        )


def _int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed [N, K/2] uint8 for the fused kernel, or plain [N, K] uint8; scale_zero [G, N, 2])."""
    n, k = w.shape
    q, scale_zero = quantize_int4(w, group)
    if int4_fused_ok(n, k, group):
        return pack_int4(q), scale_zero.to(torch.bfloat16)
    return q.to(torch.uint8), scale_zero


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear, group: int) -> None:
        super().__init__()
        q, scale_zero = _int4(linear.weight.data, group)
        self.register_buffer("weight", q)
        self.register_buffer("scale_zero", scale_zero)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = int4_matmul(x.reshape(-1, shape[-1]), self.weight, self.scale_zero)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], y.shape[-1])


class Int4Experts(nn.Module):
    """Stacked int4 experts (each expert packed on its own); same call as `Experts`."""

    def __init__(self, experts: Experts, group: int) -> None:
        super().__init__()
        up = [_int4(w, group) for w in experts.gate_up_proj.data]  # E x ([2I, ...], [G, 2I, 2])
        down = [_int4(w, group) for w in experts.down_proj.data]  # E x ([H, ...], [G, H, 2])
        self.register_buffer("gate_up_proj", torch.stack([q for q, _ in up]))
        self.register_buffer("gate_up_scale", torch.stack([s for _, s in up]))
        self.register_buffer("down_proj", torch.stack([q for q, _ in down]))
        self.register_buffer("down_scale", torch.stack([s for _, s in down]))
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
    if scheme == "int8" and any(p.dtype == torch.float32 for p in net.parameters()):
        log.warning(
            "int8 weights with float32 activations run on a slow path (torch's fused int8 CPU kernel "
            "is fast only for bfloat16); load with dtype=torch.bfloat16 for speed"
        )
    swaps = quantize_modules(net, scheme, targets=targets, group_size=group_size)
    log.info("quantized %d modules to %s", swaps, scheme)
    return model


def quantize_modules(
    net: nn.Module, scheme: str, *, targets: tuple[str, ...] = TARGETS, group_size: int = 128
) -> int:
    """Swap the float modules under `net` (a whole model or one decoder layer); returns the count.

    Already-quantized modules are left alone, so the loader can call this per layer and then once
    more on the whole model (for the head). Works on the meta device too (shapes only).
    """
    chosen: list[tuple[str, nn.Module, str, nn.Module]] = []
    for parent_name, parent in net.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if (isinstance(child, Experts) and "experts" in targets) or (
                isinstance(child, nn.Linear) and _target(full) in targets
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
    return swaps


def _quantized(module: nn.Module, scheme: str, group: int) -> nn.Module | None:
    if scheme == "int8":
        return Int8Experts(module) if isinstance(module, Experts) else Int8Linear(module)
    widths = (
        [module.gate_up_proj.shape[-1], module.down_proj.shape[-1]]
        if isinstance(module, Experts)
        else [module.in_features]
    )
    if any(w % group for w in widths):
        return None
    return Int4Experts(module, group) if isinstance(module, Experts) else Int4Linear(module, group)
