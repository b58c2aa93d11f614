"""The triton attention backend against torch_ref: on a GPU when there is one, else through
triton's interpreter on the CPU (TRITON_INTERPRET=1, set before the kernels are defined)."""
import pytest
import torch

from loom.platform import Platform

from triton_interpreter import DEVICE, interpreter_bf16_dot, tl, triton  # noqa: F401

from attention_cases import (DECODE_BATCH, MIXED_BATCHES, TOLERANCE, build_metadata,  # noqa: E402
                             random_inputs, rel_err, run_with_ref)
from loom.plugins.attention.triton import TritonAttention  # noqa: E402
from loom.plugins.attention.triton.backend import num_kv_splits  # noqa: E402

# (num_heads, num_kv_heads): MHA, GQA 2 and 4.
HEADS = [(4, 4), (4, 2), (8, 2)]


def make_backend(num_heads, num_kv_heads, head_size=32, dtype=torch.float32, kv_splits=None):
    backend = TritonAttention(num_heads, num_kv_heads, head_size, head_size ** -0.5, dtype,
                              torch.device(DEVICE))
    backend.kv_splits = kv_splits
    return backend


def check(backend, batch, block_size, num_pad=0, max_blocks=None, seed=0):
    """Run ``batch`` through ``backend`` and torch_ref; assert outputs close, caches equal."""
    metadata, num_blocks = build_metadata(batch, block_size, DEVICE, num_pad, max_blocks, seed)
    inputs = random_inputs(metadata, num_blocks, backend.num_heads, backend.num_kv_heads,
                           backend.head_size, backend.dtype, DEVICE, seed)
    out, ref, cache, ref_cache = run_with_ref(backend, metadata, *inputs)
    num_tokens = metadata.num_tokens
    assert rel_err(out[:num_tokens], ref[:num_tokens]) < TOLERANCE[backend.dtype]
    assert torch.equal(cache, ref_cache)
    return out, metadata


@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("batch", MIXED_BATCHES.values(), ids=MIXED_BATCHES.keys())
def test_mixed_batch(batch, block_size, heads):
    check(make_backend(*heads), batch, block_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", MIXED_BATCHES.values(), ids=MIXED_BATCHES.keys())
def test_half_precision(batch, dtype):
    check(make_backend(8, 2, dtype=dtype), batch, 16)


@pytest.mark.parametrize("head_size", [64, 128, 80])
def test_head_sizes(head_size):
    check(make_backend(4, 2, head_size, torch.bfloat16), MIXED_BATCHES["decodes_and_chunks"], 16)
    check(make_backend(4, 2, head_size, torch.bfloat16, kv_splits=2), DECODE_BATCH, 16)


@pytest.mark.parametrize("heads", [(6, 2), (8, 1)], ids=str)
def test_uneven_and_wide_groups(heads):
    check(make_backend(*heads), MIXED_BATCHES["long_prefix"], 16)
    check(make_backend(*heads, kv_splits=4), DECODE_BATCH, 16)


@pytest.mark.parametrize("block_size", [1, 8])
def test_small_blocks(block_size):
    check(make_backend(4, 2), MIXED_BATCHES["decodes_and_chunks"], block_size)
    check(make_backend(4, 2, kv_splits=2), DECODE_BATCH, block_size)


@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_decode_matches_unsplit(dtype, heads):
    outs = [check(make_backend(*heads, dtype=dtype, kv_splits=s), DECODE_BATCH, 16)[0]
            for s in (1, 4, 16)]
    tol = TOLERANCE[dtype]
    assert rel_err(outs[1], outs[0]) < tol and rel_err(outs[2], outs[0]) < tol


@pytest.mark.parametrize("batch", ["decodes_and_chunks", "long_prefix"])
def test_split_decodes_in_mixed_batch(batch):
    check(make_backend(8, 2, kv_splits=4), MIXED_BATCHES[batch], 16)


def test_split_heuristic_from_block_table_width():
    backend = make_backend(4, 2)
    backend.num_sms = 132
    metadata, _ = build_metadata(DECODE_BATCH, 16, DEVICE, max_blocks=256)
    assert num_kv_splits(len(DECODE_BATCH) * 2, 256 * 16, 132) == 16
    check(backend, DECODE_BATCH, 16, max_blocks=256)


def test_num_kv_splits():
    assert num_kv_splits(8, 8192, 132) == 32          # one sequence, 8 KV heads, long context
    assert num_kv_splits(64, 8192, 132) == 8
    assert num_kv_splits(512, 8192, 132) == 1         # enough programs already
    assert num_kv_splits(8, 512, 132) == 2            # short contexts: no tiny splits
    assert num_kv_splits(8, 100, 132) == 1


@pytest.mark.parametrize("kv_splits", [1, 4])
def test_padded_decode_batch(kv_splits):
    out, metadata = check(make_backend(4, 2, kv_splits=kv_splits), DECODE_BATCH, 16, num_pad=3)
    assert torch.isfinite(out).all()
    assert not out[metadata.num_tokens:].any()


def test_decode_reads_no_host_values(monkeypatch):
    """A decode-only forward (graph-captured) must not depend on per-step host values."""
    backend = make_backend(4, 2, kv_splits=4)
    metadata, num_blocks = build_metadata(DECODE_BATCH, 16, DEVICE, num_pad=1)
    q, k, v, kv_cache = random_inputs(metadata, num_blocks, 4, 2, 32, torch.float32, DEVICE)
    _, ref, _, _ = run_with_ref(backend, metadata, q, k, v, kv_cache)
    metadata.query_start_loc_cpu = metadata.seq_lens_cpu = None
    metadata.max_seq_len = metadata.max_query_len = -1

    def no_sync(*_):
        raise AssertionError("host sync on the decode path")
    for name in ("item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    out = backend.forward(q, k, v, kv_cache.clone(), metadata)
    monkeypatch.undo()
    assert rel_err(out[:len(DECODE_BATCH)], ref[:len(DECODE_BATCH)]) < 1e-4


def verify_metadata(batch, num_pad: int):
    """A speculative verification batch laid out as its graph pads it: every sequence a chunk
    of q tokens over its prefix, then padding sequences of seq_len q that write nothing."""
    metadata, num_blocks = build_metadata(batch, 16, DEVICE)
    q = batch[0][1]
    qsl = torch.arange(len(batch) + num_pad + 1, dtype=torch.int32) * q
    lens = torch.cat([metadata.seq_lens_cpu, torch.full((num_pad,), q, dtype=torch.int32)])
    tables = torch.cat([metadata.block_tables.cpu(),
                        torch.zeros(num_pad, metadata.block_tables.shape[1], dtype=torch.int32)])
    slots = torch.cat([metadata.slot_mapping.cpu(), torch.full((num_pad * q,), -1)])
    total = (len(batch) + num_pad) * q
    padded = type(metadata)(
        num_seqs=len(batch) + num_pad, num_decodes=0, num_tokens=total, max_query_len=q,
        max_seq_len=metadata.max_seq_len, query_start_loc=qsl.to(DEVICE),
        seq_lens=lens.to(DEVICE), block_tables=tables.to(DEVICE), slot_mapping=slots.to(DEVICE),
        query_start_loc_cpu=qsl, seq_lens_cpu=lens, block_size=16)
    return padded, num_blocks, len(batch) * q


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=str)
def test_padded_verify_batch_reads_no_host_values(heads, monkeypatch):
    """Speculative verification under a graph: uniform 5-token chunks plus padding; the real
    rows equal torch_ref's, the cache gets exactly their K/V, and no per-step host value (no
    sync) is used."""
    backend = make_backend(*heads)
    metadata, num_blocks, real = verify_metadata([(17, 5), (40, 5), (3, 5)], num_pad=2)
    q, k, v, kv_cache = random_inputs(metadata, num_blocks, *heads, 32, torch.float32, DEVICE)
    _, ref, _, ref_cache = run_with_ref(backend, metadata, q, k, v, kv_cache)
    metadata.query_start_loc_cpu = metadata.seq_lens_cpu = None
    metadata.max_seq_len = -1

    def no_sync(*_):
        raise AssertionError("host sync on the verification path")
    for name in ("item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    cache = kv_cache.clone()
    out = backend.forward(q, k, v, cache, metadata)
    monkeypatch.undo()
    assert rel_err(out[:real], ref[:real]) < 1e-4
    assert torch.equal(cache, ref_cache)


@pytest.mark.parametrize("fused_ops", ["triton", "torch"])
@pytest.mark.parametrize("kv_splits", [1, 4])
def test_forward_rotary(fused_ops, kv_splits, monkeypatch):
    """forward_rotary (the rotary and the cache write in one kernel with the triton ops; the
    ops' rotary then forward otherwise) against torch_ref's forward on rotated q and k."""
    from loom import ops
    from loom.models.layers import RotaryEmbedding
    from loom.plugins.ops.triton import TritonFusedOps
    monkeypatch.setattr(ops, "_active", TritonFusedOps() if fused_ops == "triton" else
                        ops.FusedOps())
    backend = make_backend(8, 2, 64, kv_splits=kv_splits)
    metadata, num_blocks = build_metadata(MIXED_BATCHES["decodes_and_chunks"], 16, DEVICE)
    q, k, v, kv_cache = random_inputs(metadata, num_blocks, 8, 2, 64, torch.float32, DEVICE)
    positions = (metadata.seq_lens.repeat_interleave(
        metadata.query_start_loc.diff().long()) - 1).long()
    with torch.device(DEVICE):
        rotary = RotaryEmbedding(64, 4096, 10000.0)
    ref_q, ref_k = ops.FusedOps().rotary(positions, q.clone(), k.clone(), rotary.cos_sin_cache)
    _, ref, _, ref_cache = run_with_ref(backend, metadata, ref_q, ref_k, v, kv_cache)
    cache = kv_cache.clone()
    out = backend.forward_rotary(positions, rotary, q.clone(), k.clone(), v, cache, metadata)
    n = metadata.num_tokens
    assert rel_err(out[:n], ref[:n]) < 1e-4
    assert rel_err(cache, ref_cache) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
def test_cuda_graph_replay_with_new_metadata():
    """Capture a padded decode batch once, then replay it with other sequences' values written
    into the same tensors, as the model runner does."""
    backend = make_backend(8, 2, 64, torch.bfloat16)
    first, _ = build_metadata([(40, 1), (700, 1), (5, 1)], 16, DEVICE, num_pad=1, max_blocks=64)
    second, num_blocks = build_metadata([(1000, 1), (0, 1), (77, 1)], 16, DEVICE, num_pad=1,
                                        max_blocks=64, seed=1)
    q, k, v, kv_cache = random_inputs(second, num_blocks, 8, 2, 64, torch.bfloat16, DEVICE)
    _, ref, _, ref_cache = run_with_ref(backend, second, q, k, v, kv_cache)
    static = [t.clone() for t in (q, k, v)]
    cache = kv_cache.clone()
    backend.forward(*static, cache, first)               # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(*static, cache, first)
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        getattr(first, name).copy_(getattr(second, name))
    for dst, src in zip(static, (q, k, v)):
        dst.copy_(src)
    cache.copy_(kv_cache)
    graph.replay()
    assert rel_err(out[:3], ref[:3]) < 1e-2
    assert torch.equal(cache, ref_cache)


class _Platform(Platform):
    def __init__(self, device_type):
        self.device_type = device_type


def test_is_supported(monkeypatch):
    assert TritonAttention.is_supported(_Platform("cuda"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TritonAttention.is_supported(_Platform("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not TritonAttention.is_supported(_Platform("cpu"))


def test_refuses_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="multiple"):
        make_backend(6, 4)
