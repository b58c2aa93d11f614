"""Conformance of a platform (--loom-platform NAME): device, memory, dist backend, dtypes,
graphs, and defaults that resolve to registered plugins."""
from __future__ import annotations

import pytest
import torch

MiB = 1 << 20


def test_declares_itself(loom_platform_under_test):
    p = type(loom_platform_under_test)
    assert isinstance(p.name, str) and p.name
    assert p.is_available() is True
    assert isinstance(p.device_type, str) and p.device_type
    assert isinstance(p.auto_priority, int)
    assert isinstance(loom_platform_under_test.describe(), str)


def test_device(loom_platform_under_test):
    device = loom_platform_under_test.device(0)
    assert isinstance(device, torch.device)
    assert device.type == loom_platform_under_test.device_type
    loom_platform_under_test.set_device(0)
    x = torch.arange(16, device=device, dtype=torch.float32)
    assert (x * 2).sum().item() == 240.0
    loom_platform_under_test.synchronize()
    loom_platform_under_test.empty_cache()


def test_memory_info(loom_platform_under_test):
    free, total = loom_platform_under_test.memory_info(0)
    assert isinstance(free, int) and isinstance(total, int), "memory_info: two ints (bytes)"
    assert 0 < free <= total, f"memory_info: free {free}, total {total}"


def test_memory_accounting(loom_platform_under_test):
    """Without default_kv_cache_gb the engine sizes the KV cache by profiling: allocation and
    peak counters must see a tensor come and go."""
    p = loom_platform_under_test
    if p.default_kv_cache_gb is not None:
        assert p.default_kv_cache_gb > 0
        pytest.skip(f"{p.name} sizes the KV cache by default_kv_cache_gb, not by profiling")
    p.synchronize()
    p.reset_peak_memory_stats()
    before = p.memory_allocated()
    x = torch.empty(64 * MiB, dtype=torch.uint8, device=p.device(0))
    p.synchronize()
    assert p.memory_allocated() - before >= 64 * MiB
    assert p.peak_memory_allocated() >= before + 64 * MiB
    del x
    p.empty_cache()
    assert p.memory_allocated() - before < 64 * MiB


def test_dtypes(loom_platform_under_test):
    p = loom_platform_under_test
    assert p.supported_dtypes, "supported_dtypes is empty"
    for dtype in p.supported_dtypes:
        a = torch.ones(8, 8, dtype=dtype, device=p.device(0))
        assert (a @ a).float().sum().item() == 8 * 8 * 8, f"matmul in {dtype}"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert p.preferred_dtype(dtype) in p.supported_dtypes


def test_fp8_dtype(loom_platform_under_test):
    p = loom_platform_under_test
    if p.fp8_dtype is None:
        pytest.skip(f"{p.name} declares no fp8 dtype")
    assert p.fp8_dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2,
                           torch.float8_e5m2fnuz)
    x = torch.tensor([0.5, -1.0, 2.0], device=p.device(0))
    assert torch.equal(x.to(p.fp8_dtype).float(), x)


def test_dist_backend(loom_platform_under_test, tmp_path):
    """A one-process group of ``dist_backend`` all-reduces a tensor on the device."""
    import torch.distributed as dist

    p = loom_platform_under_test
    assert dist.is_available()
    assert dist.is_backend_available(p.dist_backend), (
        f"dist_backend {p.dist_backend!r} is not available in this torch build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(p.dist_backend, store=store, rank=0, world_size=1)
    try:
        x = torch.ones(4, device=p.device(0))
        dist.all_reduce(x)
        p.synchronize()
        assert x.tolist() == [1.0] * 4
    finally:
        dist.destroy_process_group()


def test_graphs(loom_platform_under_test):
    p = loom_platform_under_test
    if not p.supports_graphs:
        pytest.skip(f"{p.name} does not claim supports_graphs")
    device = p.device(0)
    x = torch.ones(8, device=device)
    pool = p.graph_pool()
    with p.graph_capture() as stream:
        y = x * 2                                           # warm-up
        graph = p.make_graph()
        with p.capture(graph, pool, stream):
            y = x * 2
    p.synchronize()
    x.fill_(3.0)
    graph.replay()
    p.synchronize()
    assert y.tolist() == [6.0] * 8


def test_defaults_resolve(loom_platform_under_test, loom_kit):
    """``auto`` finds an attention backend and fused ops among the platform's defaults."""
    p = loom_platform_under_test
    assert p.default_attention_backends and p.default_fused_ops
    backend = loom_kit.pm.attention_backend("auto", p)
    assert backend.name in p.default_attention_backends
    assert loom_kit.pm.fused_ops("auto", p).name in p.default_fused_ops
