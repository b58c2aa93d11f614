"""What the quantized GEMMs share: their tile configuration, and how many programs split K
(decode-sized M leaves fewer output tiles than the GPU has SMs, and splitting K (fp32 partial
sums, added afterwards) fills them)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@functools.cache
def num_sms(device: torch.device) -> int:
    """The device's multiprocessor count (1 off CUDA); the quant kernels size grids by it."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k_for(tiles: int, k_steps: int, device: torch.device) -> int:
    """Enough K splits that the grid covers every SM about twice, at most one per K step."""
    return max(1, min(triton.cdiv(2 * num_sms(device), tiles), k_steps))


@dataclass
class SplitPlan:
    """One launch of a split-K GEMM: K chunk per program, number of splits, output, grid."""
    k_chunk: int
    splits: int
    out: torch.Tensor          # [M, N] in the output dtype, or [splits, M, N] fp32 partials
    grid: tuple[int, int, int]

    @property
    def split_stride(self) -> int:
        return self.out.stride(0) if self.splits > 1 else 0

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.out if self.splits == 1 else self.out.sum(0).to(dtype)


def plan_split_k(M: int, N: int, K: int, cfg: TileConfig, block_k: int, split_k: int | None,
                 out_dtype: torch.dtype, device: torch.device) -> SplitPlan:
    """Tiles of ``cfg`` (with ``block_k``) over [M, N], K split ``split_k`` times or as
    split_k_for chooses."""
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    k_steps = triton.cdiv(K, block_k)
    k_chunk = triton.cdiv(k_steps, split_k or split_k_for(tiles, k_steps, device)) * block_k
    splits = triton.cdiv(K, k_chunk)
    if splits == 1:
        out = torch.empty(M, N, dtype=out_dtype, device=device)
    else:
        out = torch.empty(splits, M, N, dtype=torch.float32, device=device)
    grid = (triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m), splits)
    return SplitPlan(k_chunk, splits, out, grid)
