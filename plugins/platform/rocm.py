"""The ROCm platform: AMD GPUs through torch's HIP build (torch.cuda API), RCCL, HIP graphs."""
from __future__ import annotations

import torch

from loom.hookspecs import hookimpl
from loom.platform import TorchCudaPlatform


def _gcn_arch() -> str:
    """The current device's architecture, e.g. "gfx942" (without feature flags like ":sramecc+")."""
    return torch.cuda.get_device_properties().gcnArchName.split(":")[0]


def _fp8_dtype(arch: str) -> torch.dtype | None:
    if arch.startswith("gfx94"):                  # MI300: the "fnuz" variant (no -0, bias 8)
        return torch.float8_e4m3fnuz
    if arch.startswith(("gfx95", "gfx12")):       # MI350, RDNA4: OCP e4m3
        return torch.float8_e4m3fn
    return None


class RocmPlatform(TorchCudaPlatform):
    name = "rocm"

    @classmethod
    def is_available(cls) -> bool:
        return torch.version.hip is not None and torch.cuda.is_available()

    def __init__(self):
        self.fp8_dtype = _fp8_dtype(_gcn_arch())

    def describe(self) -> str:
        return (f"rocm: {torch.cuda.get_device_name()} ({_gcn_arch()}), "
                f"{torch.cuda.device_count()} device(s), HIP {torch.version.hip}")


@hookimpl
def loom_platforms():
    return [RocmPlatform]
