"""The CUDA platform: NVIDIA GPUs through torch.cuda, NCCL, CUDA graphs."""
from __future__ import annotations

import torch

from loom.hookspecs import hookimpl
from loom.platform import TorchCudaPlatform


class CudaPlatform(TorchCudaPlatform):
    name = "cuda"

    @classmethod
    def is_available(cls) -> bool:
        return torch.version.hip is None and torch.cuda.is_available()

    def __init__(self):
        # e4m3 tensor cores arrived with Ada (sm_89) and Hopper (sm_90).
        self.fp8_dtype = torch.float8_e4m3fn if torch.cuda.get_device_capability() >= (8, 9) else None

    def describe(self) -> str:
        major, minor = torch.cuda.get_device_capability()
        return (f"cuda: {torch.cuda.get_device_name()} (compute capability {major}.{minor}), "
                f"{torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}")


@hookimpl
def loom_platforms():
    return [CudaPlatform]
