"""Conformance of an attention backend (--loom-attention NAME) against torch_ref."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from loom.testing.attention_cases import (DECODE_BATCH, MIXED_BATCHES, TOLERANCE, build_metadata,
                                          check_against_ref, make_like, prefix_metadata,
                                          random_cache, random_qkv, rel_err)

# (num_heads, num_kv_heads): multi-head, grouped-query (4 per KV head), multi-query
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (8, 1)}
HEAD_SIZE = 64
# Reads of a tensor's values into Python: a captured graph replays none of them.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


def block_sizes(cls) -> list[int]:
    return [cls.required_block_size] if cls.required_block_size else [16, 32]


def static_width(batch, block_size: int) -> int:
    """A block-table width past the longest sequence's, as the runner's graph buffers have."""
    return -(-max(c + n for c, n in batch) // block_size) + 4


@pytest.fixture
def dtype(loom_attention, loom_kit) -> torch.dtype:
    """The dtype of the checks that are not about dtypes: float32 when it is checked."""
    checked = loom_kit.dtypes(loom_attention.supported_dtypes)
    if not checked:
        pytest.skip("none of the backend's dtypes is selected and supported on this platform")
    return torch.float32 if torch.float32 in checked else checked[0]


def make(cls, heads, device, dtype, head_size=HEAD_SIZE):
    num_heads, num_kv_heads = heads
    return cls(num_heads, num_kv_heads, head_size, head_size ** -0.5, dtype, device)


def test_declares_itself(loom_attention, loom_platform):
    cls = loom_attention
    assert isinstance(cls.name, str) and cls.name
    assert cls.is_supported(loom_platform) is True
    assert cls.supported_dtypes and all(isinstance(d, torch.dtype) for d in cls.supported_dtypes)
    assert cls.required_block_size is None or (isinstance(cls.required_block_size, int)
                                               and cls.required_block_size > 0)
    assert isinstance(cls.supports_graphs, bool)


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_kv_cache_shape_is_declared(loom_attention, heads):
    """A tuple of ints, linear in the number of blocks, with room for K and V of every slot."""
    _, kvh = heads
    for block_size in block_sizes(loom_attention):
        shapes = [loom_attention.kv_cache_shape(n, block_size, kvh, HEAD_SIZE) for n in (1, 2, 7)]
        for shape in shapes:
            assert all(isinstance(d, int) and d > 0 for d in shape), f"kv_cache_shape: {shape}"
        sizes = [math.prod(s) for s in shapes]
        assert sizes[1] == 2 * sizes[0] and sizes[2] == 7 * sizes[0], (
            f"kv_cache_shape must grow linearly with num_blocks (the core sizes the cache by "
            f"one block's bytes): {shapes}")
        assert sizes[0] >= 2 * block_size * kvh * HEAD_SIZE, (
            f"kv_cache_shape(1, {block_size}, {kvh}, {HEAD_SIZE}) = {shapes[0]} cannot hold K "
            f"and V of one block")


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("batch", MIXED_BATCHES.values(), ids=MIXED_BATCHES.keys())
def test_mixed_batch(loom_attention, loom_device, dtype, batch, heads):
    """Decodes and prefill chunks in one batch, prefixes across block boundaries, GQA/MQA."""
    for block_size in block_sizes(loom_attention):
        check_against_ref(make(loom_attention, heads, loom_device, dtype), batch, block_size)


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_decode_batch(loom_attention, loom_device, dtype, heads):
    """Decodes only, contexts from 1 token to many blocks."""
    check_against_ref(make(loom_attention, heads, loom_device, dtype), DECODE_BATCH,
                      block_sizes(loom_attention)[0])


def test_dtypes(loom_attention, loom_device, loom_kit):
    checked = loom_kit.dtypes(loom_attention.supported_dtypes)
    if not checked:
        pytest.skip("none of the backend's dtypes is selected and supported on this platform")
    for dtype in checked:
        backend = make(loom_attention, HEADS["gqa"], loom_device, dtype)
        check_against_ref(backend, MIXED_BATCHES["decodes_and_chunks"],
                          block_sizes(loom_attention)[0])


def test_head_size_128(loom_attention, loom_device, dtype):
    backend = make(loom_attention, HEADS["gqa"], loom_device, dtype, head_size=128)
    check_against_ref(backend, MIXED_BATCHES["long_prefix"], block_sizes(loom_attention)[0])


def test_padded_decode_batch(loom_attention, loom_device, dtype):
    """Padding sequences (seq_len 0, slot -1), as in a graph bucket, read and write nothing."""
    block_size = block_sizes(loom_attention)[0]
    out, _, metadata = check_against_ref(make(loom_attention, HEADS["gqa"], loom_device, dtype),
                                         DECODE_BATCH, block_size, num_pad=3,
                                         max_blocks=static_width(DECODE_BATCH, block_size))
    assert torch.isfinite(out[metadata.num_tokens:]).all(), "padding rows are not finite"


def _decode_case(cls, ref_cls, device, dtype, batch=DECODE_BATCH, width=None, seed=0):
    """A backend, its reference, a primed cache pair and the step's inputs, for a decode batch
    padded by one sequence, its block table of a static width (as under graphs)."""
    backend = make(cls, HEADS["gqa"], device, dtype)
    ref = make_like(ref_cls, backend)
    block_size = block_sizes(cls)[0]
    width = width or static_width(batch, block_size)
    metadata, num_blocks = build_metadata(batch, block_size, device, 1, width, seed)
    kvh, dim = backend.num_kv_heads, backend.head_size
    cache = random_cache(cls.kv_cache_shape(num_blocks, block_size, kvh, dim), backend.dtype,
                         device, seed)
    ref_cache = random_cache(ref.kv_cache_shape(num_blocks, block_size, kvh, dim), backend.dtype,
                             device, seed)
    prefix = prefix_metadata(batch, metadata, device)
    q, k, v = random_qkv(prefix.num_tokens, backend.num_heads, kvh, dim, backend.dtype, device)
    backend.forward(q, k, v, cache, backend.build_metadata(prefix))
    ref.forward(q, k, v, ref_cache, prefix)
    inputs = random_qkv(metadata.slot_mapping.shape[0], backend.num_heads, kvh, dim,
                        backend.dtype, device, seed + 1)
    return backend, ref, metadata, cache, ref_cache, inputs


def as_captured(metadata):
    """The metadata as the model runner passes it to build_graph_metadata before capturing a
    decode graph: the device tensors are the step's, the host values placeholders (the replayed
    steps have others). Returns it and the step with its true host values, for plan_replay."""
    step = dataclasses.replace(metadata)
    n = metadata.num_seqs
    metadata.query_start_loc_cpu = torch.arange(n + 1, dtype=torch.int32)
    metadata.seq_lens_cpu = torch.zeros(n, dtype=torch.int32)
    metadata.block_tables_cpu = None
    metadata.max_seq_len = metadata.block_tables.shape[1] * metadata.block_size
    metadata.max_query_len = 1
    return metadata, step


def test_graph_safe_decode(loom_attention, loom_reference_attention, loom_device, dtype,
                           monkeypatch):
    """A backend claiming supports_graphs: the forward of a decode-only step, given the metadata
    of build_graph_metadata (placeholder host values) and planned by plan_replay, reads no device
    value on the host and uses no per-step host value: the runner captures it once and replays
    it after plan_replay."""
    if not loom_attention.supports_graphs:
        pytest.skip(f"{loom_attention.name} does not claim supports_graphs")
    backend, ref, metadata, cache, ref_cache, (q, k, v) = _decode_case(
        loom_attention, loom_reference_attention, loom_device, dtype)
    if not backend.supports_graphs:
        pytest.skip(f"{loom_attention.name} turned graphs off here (see its log line)")
    ref_out = ref.forward(q, k, v, ref_cache, metadata)
    captured, step = as_captured(metadata)
    graph_metadata = backend.build_graph_metadata(captured)
    backend.plan_replay(graph_metadata, step)

    def host_read(*_args, **_kwargs):
        raise AssertionError("the decode path reads a tensor's values into Python (a captured "
                             "graph replays none of that)")
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, host_read)
    sync_mode = _sync_debug_mode(loom_device, "error")
    try:
        out = backend.forward(q, k, v, cache, graph_metadata)
    finally:
        _sync_debug_mode(loom_device, sync_mode)
        monkeypatch.undo()
    n = len(DECODE_BATCH)
    err = rel_err(out[:n], ref_out[:n])
    assert err < TOLERANCE[backend.dtype], (
        f"with the host values a graph capture sees, the decode output is off by {err:.3g}: "
        f"it must not depend on seq_lens_cpu, query_start_loc_cpu or max_seq_len")


def _sync_debug_mode(device, mode):
    if device.type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    if mode is not None:
        torch.cuda.set_sync_debug_mode(mode)
    return previous


def test_graph_capture_and_replay(loom_attention, loom_reference_attention, loom_platform,
                                  loom_device, dtype):
    """On a platform with graphs: capture a padded decode step once, then replay it with other
    sequences' metadata written into the same tensors, as the model runner does."""
    if not loom_attention.supports_graphs:
        pytest.skip(f"{loom_attention.name} does not claim supports_graphs")
    if not loom_platform.supports_graphs:
        pytest.skip(f"platform {loom_platform.name} has no device graphs")
    first = [(40, 1), (700, 1), (5, 1)]
    second = [(1000, 1), (0, 1), (77, 1)]
    width = static_width(second, block_sizes(loom_attention)[0])
    backend, ref, md, cache, ref_cache, (q, k, v) = _decode_case(
        loom_attention, loom_reference_attention, loom_device, dtype, second, width, seed=1)
    if not backend.supports_graphs:
        pytest.skip(f"{loom_attention.name} turned graphs off here (see its log line)")
    ref_out = ref.forward(q, k, v, ref_cache.clone(), md)
    captured, _ = build_metadata(first, md.block_size, loom_device, 1, width)
    static = [t.clone() for t in (q, k, v)]
    replay_cache = cache.clone()
    graph_metadata = backend.build_graph_metadata(as_captured(captured)[0])
    pool = loom_platform.graph_pool()
    with loom_platform.graph_capture() as stream:
        backend.forward(*static, replay_cache.clone(), graph_metadata)     # warm-up
        graph = loom_platform.make_graph()
        with loom_platform.capture(graph, pool, stream):
            out = backend.forward(*static, replay_cache, graph_metadata)
    loom_platform.synchronize()
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        getattr(captured, name).copy_(getattr(md, name))
    backend.plan_replay(graph_metadata, md)
    for dst, src in zip(static, (q, k, v)):
        dst.copy_(src)
    replay_cache.copy_(cache)
    graph.replay()
    loom_platform.synchronize()
    assert rel_err(out[:3], ref_out[:3]) < TOLERANCE[backend.dtype]
