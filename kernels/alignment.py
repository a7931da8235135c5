"""Alignment: sort the T*K token slots by expert into blocks of BLOCK_M, on the device.

Data flow (T tokens, K per token, E experts, S = T*K slots, slot s = t*K + k):
    ids [T, K] --count (atomic adds)--> counts [E]
    counts --pad each to a multiple of BLOCK_M, exclusive cumsum--> starts [E], total [1]
    starts --per block b: the last expert whose start <= b*BLOCK_M--> block_expert [B] (-1 past total)
    slots --atomic cursor per expert--> sorted_slots [P]: each expert's slots in one run, runs
           padded with the sentinel S
Every size is an upper bound known on the host (P = S + E*(BLOCK_M-1), rounded up to BLOCK_M),
so nothing is copied back to the host: the GEMM launches B blocks and skips those past total.
Within an expert, slots appear in the order their atomic adds landed (any order is correct).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, S, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    e = tl.load(ids_ptr + offs, mask=mask, other=0)
    tl.atomic_add(counts_ptr + e, tl.full((BLOCK,), 1, tl.int32), mask=mask)


@triton.jit
def _starts_kernel(counts_ptr, starts_ptr, total_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    offs = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + offs, mask=offs < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E]
    ends = tl.cumsum(padded, 0)
    tl.store(starts_ptr + offs, ends - padded, mask=offs < E)
    tl.store(total_ptr, tl.sum(padded, 0))


@triton.jit
def _blocks_kernel(starts_ptr, total_ptr, block_expert_ptr, E, B, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_B: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    e = tl.arange(0, BLOCK_E)
    starts = tl.load(starts_ptr + e, mask=e < E, other=2**30)  # [E]
    first_row = b * BLOCK_M
    owner = tl.sum((starts[None, :] <= first_row[:, None]).to(tl.int32), 1) - 1  # [BLOCK_B]
    total = tl.load(total_ptr)
    tl.store(block_expert_ptr + b, tl.where(first_row < total, owner, -1), mask=b < B)


@triton.jit
def _scatter_kernel(ids_ptr, starts_ptr, cursor_ptr, sorted_ptr, S, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    e = tl.load(ids_ptr + offs, mask=mask, other=0)
    rank = tl.atomic_add(cursor_ptr + e, tl.full((BLOCK,), 1, tl.int32), mask=mask)
    pos = tl.load(starts_ptr + e, mask=mask, other=0) + rank
    tl.store(sorted_ptr + pos, offs.to(tl.int32), mask=mask)


@dataclass
class Alignment:
    sorted_slots: torch.Tensor  # [P] int32: slot ids grouped by expert, runs padded with `sentinel`
    block_expert: torch.Tensor  # [B] int32: the expert of each BLOCK_M block, -1 past `total`
    total: torch.Tensor  # [1] int32: padded slots in use (a multiple of block_m), on the device
    counts: torch.Tensor  # [E] int32: slots per expert
    block_m: int
    sentinel: int  # = T*K: marks padding


def max_padded(slots: int, experts: int, block_m: int) -> int:
    return triton.cdiv(slots + experts * (block_m - 1), block_m) * block_m


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """ids [T, K] -> the slots sorted by expert in BLOCK_M blocks (see the module docstring)."""
    if ids.dim() != 2:
        raise ValueError(f"ids must be [T, K], got shape {tuple(ids.shape)}")
    flat = ids.reshape(-1).to(torch.int32).contiguous()  # [S]
    s, dev = flat.numel(), ids.device
    p = max_padded(s, num_experts, block_m)
    b = p // block_m
    counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    starts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    total = torch.zeros(1, dtype=torch.int32, device=dev)
    cursor = torch.zeros(num_experts, dtype=torch.int32, device=dev)
    sorted_slots = torch.full((p,), s, dtype=torch.int32, device=dev)
    block_expert = torch.empty(b, dtype=torch.int32, device=dev)
    block = 256
    block_e = triton.next_power_of_2(num_experts)
    if s:
        _count_kernel[(triton.cdiv(s, block),)](flat, counts, s, BLOCK=block)
    _starts_kernel[(1,)](counts, starts, total, num_experts, BLOCK_M=block_m, BLOCK_E=block_e)
    _blocks_kernel[(triton.cdiv(b, 64),)](starts, total, block_expert, num_experts, b, BLOCK_M=block_m, BLOCK_E=block_e,
                                          BLOCK_B=64)
    if s:
        _scatter_kernel[(triton.cdiv(s, block),)](flat, starts, cursor, sorted_slots, s, BLOCK=block)
    return Alignment(sorted_slots, block_expert, total, counts, block_m, s)


def align_reference(ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Plain torch: the same layout, slots in ascending order within each expert."""
    flat = ids.reshape(-1).long()
    s = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    p = max_padded(s, num_experts, block_m)
    sorted_slots = torch.full((p,), s, dtype=torch.int32, device=ids.device)
    block_expert = torch.full((p // block_m,), -1, dtype=torch.int32, device=ids.device)
    for e in range(num_experts):
        mine = torch.nonzero(flat == e).flatten()
        sorted_slots[starts[e] : starts[e] + len(mine)] = mine.to(torch.int32)
        block_expert[starts[e] // block_m : (starts[e] + padded[e]) // block_m] = e
    total = padded.sum().reshape(1).to(torch.int32)
    return Alignment(sorted_slots, block_expert, total, counts.to(torch.int32), block_m, s)
