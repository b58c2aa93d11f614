"""The Platform interface: everything the core needs to know about a kind of hardware."""
from __future__ import annotations

import importlib.util
import os
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch


class Platform:
    """A kind of device. Subclasses are registered by plugins through ``loom_platforms``."""

    name: str = ""
    device_type: str = "cpu"           # torch device type: "cpu", "cuda" (ROCm reports "cuda" too)
    dist_backend: str = "gloo"         # torch.distributed backend
    supported_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    fp8_dtype: torch.dtype | None = None
    supports_graphs: bool = False
    default_attention_backends: tuple[str, ...] = ("torch",)
    default_fused_ops: tuple[str, ...] = ("torch",)
    auto_priority: int = 0             # platform: auto picks the available one with the highest
    default_kv_cache_gb: float | None = None  # KV budget when not profiled (None: profile)

    @classmethod
    def is_available(cls) -> bool:
        raise NotImplementedError

    def device(self, index: int = 0) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, index)

    def set_device(self, index: int) -> None:
        """Make device ``index`` current for this process (one rank, one device)."""

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def peak_memory_allocated(self, index: int = 0) -> int:
        return 0

    def reset_peak_memory_stats(self, index: int = 0) -> None:
        pass

    def memory_allocated(self, index: int = 0) -> int:
        """Bytes held by live tensors on the device."""
        return 0

    def preferred_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        """The dtype used for ``dtype: auto`` given the checkpoint's dtype."""
        if checkpoint_dtype in self.supported_dtypes:
            return checkpoint_dtype
        return self.supported_dtypes[0]

    def graph_capture(self) -> AbstractContextManager:
        """A context in which decode graphs are captured (a side stream on CUDA/HIP)."""
        return nullcontext()

    def make_graph(self):
        """A new, empty device graph (``torch.cuda.CUDAGraph`` on CUDA and HIP)."""
        raise NotImplementedError(f"platform {self.name!r} does not support graphs")

    def graph_pool(self):
        """A memory pool handle that captured graphs share."""
        raise NotImplementedError(f"platform {self.name!r} does not support graphs")

    def capture(self, graph, pool, stream) -> AbstractContextManager:
        """The context in which work issued on ``stream`` is recorded into ``graph``."""
        raise NotImplementedError(f"platform {self.name!r} does not support graphs")

    def supports_triton(self) -> bool:
        """Triton kernels run here: on GPUs when triton is installed; on the CPU only through
        triton's interpreter (TRITON_INTERPRET=1, for tests)."""
        if importlib.util.find_spec("triton") is None:
            return False
        if self.device_type == "cuda":
            return True
        return self.device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"

    def describe(self) -> str:
        return self.name


class TorchCudaPlatform(Platform):
    """The ``torch.cuda`` device API, which CUDA and ROCm (HIP) builds of torch share."""

    device_type = "cuda"
    dist_backend = "nccl"              # RCCL answers to this name on ROCm
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    supports_graphs = True
    # attention-backend auto: the fastest first, as measured on an H200 (Llama-3-8B shape,
    # benchmarks/results/throughput_1000x1024x1024_*_run1[01].json: triton 8,520, flash_attn
    # 8,364, flashinfer 7,214 output tok/s; batch-1 decode 215, 202, 194 tok/s).
    default_attention_backends = ("triton", "flash_attn", "flashinfer", "torch")
    default_fused_ops = ("triton", "torch")
    auto_priority = 10

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def memory_info(self, index: int = 0) -> tuple[int, int]:
        return torch.cuda.mem_get_info(index)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def peak_memory_allocated(self, index: int = 0) -> int:
        return torch.cuda.max_memory_allocated(index)

    def reset_peak_memory_stats(self, index: int = 0) -> None:
        torch.cuda.reset_peak_memory_stats(index)

    def memory_allocated(self, index: int = 0) -> int:
        return torch.cuda.memory_allocated(index)

    @contextmanager
    def graph_capture(self):
        """Yields a side stream, current inside the block, to pass to ``torch.cuda.graph``."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            yield stream
        torch.cuda.current_stream().wait_stream(stream)

    def make_graph(self):
        return torch.cuda.CUDAGraph()

    def graph_pool(self):
        return torch.cuda.graph_pool_handle()

    def capture(self, graph, pool, stream):
        return torch.cuda.graph(graph, pool=pool, stream=stream)
