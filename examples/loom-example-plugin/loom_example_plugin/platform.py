"""A platform that runs on the CPU under another name: what a vendor's platform plugin
declares (device, dist backend, memory, dtypes, graphs, attention and fused-ops defaults)."""
from __future__ import annotations

import os

import torch

from loom.platform import Platform


class ExampleCpuPlatform(Platform):
    name = "example-cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    supported_dtypes = (torch.float32, torch.bfloat16)
    fp8_dtype = None
    supports_graphs = False
    default_attention_backends = ("example-sdpa", "torch")
    default_fused_ops = ("torch",)
    auto_priority = -1               # only when asked for by name: `platform: auto` keeps cpu
    default_kv_cache_gb = 1.0        # no device allocator to profile: a fixed KV budget

    @classmethod
    def is_available(cls) -> bool:
        return True

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def describe(self) -> str:
        return f"example-cpu: {os.cpu_count()} CPU cores (loom-example-plugin)"
