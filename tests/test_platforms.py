"""Platform plugins: the CPU platform here, CUDA/ROCm attributes everywhere, a GPU run with -m gpu."""
import pytest
import torch

from loom.plugin_manager import PluginManager
from loom.plugins.platform.cpu import CpuPlatform
from loom.plugins.platform.cuda import CudaPlatform
from loom.plugins.platform.rocm import RocmPlatform, _fp8_dtype

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")


def test_cpu_platform_queries():
    cpu = CpuPlatform()
    free, total = cpu.memory_info()
    assert 0 < free <= total
    assert total > 256 * 2**20
    assert cpu.device() == torch.device("cpu")
    assert cpu.dist_backend == "gloo"
    assert cpu.is_available() and not cpu.supports_graphs
    assert cpu.preferred_dtype(torch.float16) == torch.bfloat16
    assert cpu.preferred_dtype(torch.float32) == torch.float32
    with cpu.graph_capture():
        pass
    with pytest.raises(NotImplementedError, match="'cpu'"):
        cpu.make_graph()


@no_gpu
@pytest.mark.parametrize("cls, name", [(CudaPlatform, "cuda"), (RocmPlatform, "rocm")])
def test_gpu_platform_classes_are_unavailable_here(cls, name):
    assert not cls.is_available()
    assert cls.name == name
    assert cls.device_type == "cuda"
    assert cls.dist_backend == "nccl"
    assert cls.supports_graphs
    assert cls.default_attention_backends == ("triton", "flash_attn", "flashinfer", "torch")
    assert cls.auto_priority == 10
    assert set(cls.supported_dtypes) == {torch.bfloat16, torch.float16, torch.float32}


def test_rocm_fp8_dtype_by_architecture():
    assert _fp8_dtype("gfx942") == torch.float8_e4m3fnuz
    assert _fp8_dtype("gfx950") == torch.float8_e4m3fn
    assert _fp8_dtype("gfx90a") is None


@pytest.mark.gpu
def test_gpu_platform_memory_and_graph_replay():
    platform = PluginManager().platform("auto")
    assert platform.name in ("cuda", "rocm")
    platform.set_device(0)
    assert torch.cuda.get_device_name() in platform.describe()
    free, total = platform.memory_info()
    assert 0 < free <= total

    platform.reset_peak_memory_stats()
    x = torch.ones(1 << 20, device=platform.device())
    assert platform.peak_memory_allocated() >= x.numel() * 4
    with platform.graph_capture() as stream:
        y = x * 2 + 1  # warm up on the side stream before capture
        graph = platform.make_graph()
        with torch.cuda.graph(graph, stream=stream):
            y = x * 2 + 1
    x.fill_(3)
    graph.replay()
    platform.synchronize()
    assert torch.equal(y, torch.full_like(x, 7))
    del x, y, graph
    platform.empty_cache()


@pytest.mark.gpu
@pytest.mark.skipif(torch.version.hip is not None, reason="CUDA only")
def test_cuda_fp8_dtype_follows_compute_capability():
    platform = CudaPlatform()
    assert "compute capability" in platform.describe()
    has_fp8 = torch.cuda.get_device_capability() >= (8, 9)
    assert platform.fp8_dtype == (torch.float8_e4m3fn if has_fp8 else None)
