"""Native kernels, built on demand with torch.utils.cpp_extension for the GPU in use.

``load(name)`` compiles ``csrc/<name>.cu`` for this device's architecture the first time it is
asked for (the build is cached under TORCH_EXTENSIONS_DIR, keyed by the source, so a later
process loads it in a second) and returns the module. ``load(name, ("X",))`` builds a variant
with the macro X defined (a module of its own, e.g. a kernel's tracing build). Each kernel here
has a Triton or torch twin that its tests compare it against and that runs wherever it cannot be
built.
"""
from __future__ import annotations

import functools
import pathlib

import torch

SOURCES = pathlib.Path(__file__).resolve().parent


class BuildError(RuntimeError):
    """A native kernel could not be built here (no CUDA device, no nvcc, a compiler error)."""


@functools.cache
def load(name: str, defines: tuple[str, ...] = ()):
    """The module built from csrc/<name>.cu with the macros ``defines`` defined; BuildError says
    why there is none."""
    source = SOURCES / f"{name}.cu"
    if not source.exists():
        raise BuildError(f"no native kernel {name!r} (looked for {source})")
    if not torch.cuda.is_available() or torch.version.hip is not None:
        raise BuildError(f"{name}: native kernels are built for NVIDIA GPUs with CUDA; this "
                         f"process has {'ROCm' if torch.version.hip else 'no CUDA device'}")
    from torch.utils import cpp_extension
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    flags = [f"-D{d}" for d in defines]
    try:
        return cpp_extension.load(
            name="_".join([f"loom_{name}", *(d.lower() for d in defines)]), sources=[str(source)],
            extra_cflags=["-O3", *flags],
            extra_cuda_cflags=["-O3", "-lineinfo", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                               *flags],
            verbose=False)
    except Exception as e:   # compiler missing or failing: the caller falls back to the twin
        raise BuildError(f"{name}: building {source.name} for sm_{arch} failed: "
                         f"{str(e).strip()[-2000:]}") from e
