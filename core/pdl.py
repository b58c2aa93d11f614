"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step (the fused ops'
and the triton attention backend's, which share this helper rather than import each other).

A kernel launched with ``launch_pdl`` may start while the kernel before it in the stream is still
running; it must call ``gdc_wait`` before it reads anything that kernel wrote (or writes anything
it reads), and ``gdc_launch_dependents`` lets the kernel after it start early the same way. The
native int4 GEMV does the same (csrc/wna16_gemv.cu), so a decode step's kernels hand over to each
other without the launch gap between them.

``enabled(device)``: sm_90+, a Triton that takes ``launch_pdl`` (3.3+), not the interpreter, and
``LOOM_TRITON_PDL`` not 0. Kernels take a ``USE_GDC`` constexpr (False where PDL is off, so the
interpreter and older GPUs never see the instructions) and ``launch_kwargs(use)`` at launch.
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _triton_launches_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch as programmatic dependents."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("LOOM_TRITON_PDL", "1") == "0":
        return False
    return _triton_launches_pdl() and _device_supports(device.index or 0)


def launch_kwargs(use: bool) -> dict:
    """The launch keyword for a kernel launched with USE_GDC=use."""
    return {"launch_pdl": True} if use else {}
