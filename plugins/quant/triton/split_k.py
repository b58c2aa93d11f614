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
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k_for(tiles: int, k_steps: int, device: torch.device) -> int:
    """Enough K splits that the grid covers every SM about twice, at most one per K step."""
    return max(1, min(triton.cdiv(2 * _num_sms(device), tiles), k_steps))
