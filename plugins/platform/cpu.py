"""The CPU platform: runs everywhere, gloo for distributed, no graphs."""
from __future__ import annotations

import os

import torch

from loom.hookspecs import hookimpl
from loom.platform import Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    fp8_dtype = torch.float8_e4m3fn
    supports_graphs = False
    default_attention_backends = ("torch",)
    auto_priority = 0
    default_kv_cache_gb = 2.0

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        pages = os.sysconf("SC_PHYS_PAGES")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return avail * size, pages * size

    def preferred_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        # fp16 matmuls are slow or missing on many CPUs; bf16 keeps the range.
        return torch.bfloat16 if checkpoint_dtype == torch.float16 else checkpoint_dtype


@hookimpl
def loom_platforms():
    return [CpuPlatform]
