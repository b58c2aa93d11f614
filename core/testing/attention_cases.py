"""Attention test cases, checked against torch_ref: one copy for loom's tests and the kit.

A batch is a list of (num_cached, num_new) pairs, one per sequence, decodes (num_new == 1)
first, as the model runner lays them out. ``build_metadata`` turns it into AttentionMetadata
over a paged cache whose blocks are a random permutation of the block ids.

``check_against_ref`` runs a batch through a backend and through torch_ref. A backend whose
declared KV-cache shape is torch_ref's must also use its layout: both start from one random
cache and must end with equal caches. Any other layout is filled by the backend itself: a first
step writes every sequence's cached prefix, and the second must read it back through the block
tables. Either way the step may change only its own tokens' slots.
"""
from __future__ import annotations

import math

import torch

from loom.attention import AttentionMetadata

# name -> batch
MIXED_BATCHES = {
    "decodes_and_chunks": [(17, 1), (40, 1), (0, 13), (21, 9)],
    "long_prefix": [(5, 1), (150, 7), (93, 3)],
    "block_boundaries": [(31, 1), (16, 16), (0, 32)],
    "prefill_only": [(0, 1), (0, 23)],
}
DECODE_BATCH = [(0, 1), (15, 1), (63, 1), (130, 1), (300, 1)]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def reference_backend():
    """torch_ref's class, reached like any plugin: through the PluginManager."""
    from loom.plugin_manager import get_plugin_manager
    return get_plugin_manager().get("attention_backend", "torch")


def build_metadata(batch, block_size: int, device="cpu", num_pad: int = 0,
                   max_blocks: int | None = None, seed: int = 0,
                   block_tables: torch.Tensor | None = None):
    """AttentionMetadata for ``batch`` and the number of blocks the cache needs.

    num_pad appends padding sequences (seq_len 0, one token with slot -1, as in a padded graph
    batch); max_blocks widens the block table (a static width, as under graphs); block ids are
    a random permutation, with spare blocks no sequence uses. ``block_tables`` (CPU) reuses
    the tables of an earlier step instead.
    """
    num_decodes = sum(1 for _, new in batch if new == 1)
    assert all(new == 1 for _, new in batch[:num_decodes]), "decodes go first"
    assert num_pad == 0 or num_decodes == len(batch), "padding is for decode-only batches"
    seq_lens = [cached + new for cached, new in batch]
    need = [-(-n // block_size) for n in seq_lens]
    if block_tables is None:
        width = max_blocks or max(need)
        num_blocks = sum(need) + 3
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
        block_tables = torch.zeros(len(batch) + num_pad, width, dtype=torch.int32)
        used = 0
        for i in range(len(batch)):
            block_tables[i, :need[i]] = ids[used:used + need[i]]
            used += need[i]
    else:
        block_tables = block_tables.cpu().to(torch.int32)
        num_blocks = int(block_tables.max()) + 1
    slots = []
    for i, (cached, new) in enumerate(batch):
        pos = torch.arange(cached, cached + new)
        slots.append(block_tables[i, pos // block_size].long() * block_size + pos % block_size)
    slots.append(torch.full((num_pad,), -1, dtype=torch.long))
    query_lens = [new for _, new in batch] + [1] * num_pad
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(query_lens).cumsum(0)
    lens = torch.tensor(seq_lens + [0] * num_pad, dtype=torch.int32)
    metadata = AttentionMetadata(
        num_seqs=len(query_lens), num_decodes=num_decodes + num_pad,
        num_tokens=sum(new for _, new in batch), max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_start_loc=qsl.to(device), seq_lens=lens.to(device),
        block_tables=block_tables.to(device), slot_mapping=torch.cat(slots).to(device),
        query_start_loc_cpu=qsl, seq_lens_cpu=lens, block_size=block_size,
        block_tables_cpu=block_tables)
    return metadata, num_blocks


def prefix_metadata(batch, metadata: AttentionMetadata, device="cpu"):
    """The step that wrote ``batch``'s cached prefixes, each as one prefill chunk, over the
    same block tables; None when no sequence has a prefix."""
    rows = sorted((i for i, (cached, _) in enumerate(batch) if cached),
                  key=lambda i: batch[i][0] != 1)
    if not rows:
        return None
    tables = metadata.block_tables.cpu()[rows]
    return build_metadata([(0, batch[i][0]) for i in rows], metadata.block_size, device,
                          block_tables=tables)[0]


def random_qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_size: int, dtype,
               device="cpu", seed: int = 0):
    """q [T, H, D] and k/v [T, KVH, D] as views of one fused qkv tensor (as the model passes
    them)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sizes = [num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size]
    qkv = torch.randn(num_tokens, sum(sizes), generator=gen, device=device).to(dtype)
    q, k, v = qkv.split(sizes, dim=-1)
    return (q.view(num_tokens, num_heads, head_size), k.view(num_tokens, num_kv_heads, head_size),
            v.view(num_tokens, num_kv_heads, head_size))


def random_cache(shape, dtype, device="cpu", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.randn(tuple(shape), generator=gen, device=device).to(dtype)


def random_inputs(metadata: AttentionMetadata, num_blocks: int, num_heads: int,
                  num_kv_heads: int, head_size: int, dtype, device="cpu", seed: int = 0):
    """random_qkv for the step's (padded) tokens, and a torch_ref-layout cache of random
    values (the cached prefixes)."""
    q, k, v = random_qkv(metadata.slot_mapping.shape[0], num_heads, num_kv_heads, head_size,
                         dtype, device, seed)
    shape = reference_backend().kv_cache_shape(num_blocks, metadata.block_size, num_kv_heads,
                                               head_size)
    return q, k, v, random_cache(shape, dtype, device, seed)


def make_like(cls, backend):
    """An instance of ``cls`` with ``backend``'s heads, scale, dtype and device."""
    return cls(backend.num_heads, backend.num_kv_heads, backend.head_size, backend.scale,
               backend.dtype, backend.device)


def run_with_ref(backend, metadata: AttentionMetadata, q, k, v, kv_cache, ref_cls=None):
    """(out, ref_out, cache, ref_cache): ``backend`` and torch_ref on copies of one cache."""
    ref = make_like(ref_cls or reference_backend(), backend)
    cache, ref_cache = kv_cache.clone(), kv_cache.clone()
    out = backend.forward(q, k, v, cache, backend.build_metadata(metadata))
    ref_out = ref.forward(q, k, v, ref_cache, metadata)
    return out, ref_out, cache, ref_cache


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype, what: str) -> None:
    err = rel_err(out, ref)
    assert math.isfinite(err) and err < TOLERANCE[dtype], (
        f"{what}: relative error {err:.3g} against torch_ref (tolerance {TOLERANCE[dtype]:g})")


def count_written(before: torch.Tensor, after: torch.Tensor) -> int:
    """How many cache elements a step changed."""
    return int((before != after).sum())


def check_against_ref(backend, batch, block_size: int, *, ref_cls=None, num_pad: int = 0,
                      max_blocks: int | None = None, seed: int = 0):
    """Run ``batch`` through ``backend`` and torch_ref (see the module docstring); assert the
    outputs close, the slots written exactly the new tokens', and, in torch_ref's layout,
    equal caches. Returns (out, ref_out, metadata)."""
    device, dtype = backend.device, backend.dtype
    kvh, dim = backend.num_kv_heads, backend.head_size
    ref = make_like(ref_cls or reference_backend(), backend)
    metadata, num_blocks = build_metadata(batch, block_size, device, num_pad, max_blocks, seed)
    shape = tuple(backend.kv_cache_shape(num_blocks, block_size, kvh, dim))
    ref_shape = tuple(ref.kv_cache_shape(num_blocks, block_size, kvh, dim))
    same_layout = shape == ref_shape
    ref_cache = random_cache(ref_shape, dtype, device, seed)
    cache = ref_cache.clone() if same_layout else random_cache(shape, dtype, device, seed + 7)
    where = f"batch {batch}, block size {block_size}, heads {backend.num_heads}/{kvh}, {dtype}"
    if not same_layout:
        prefix = prefix_metadata(batch, metadata, device)
        if prefix is not None:
            q, k, v = random_qkv(prefix.num_tokens, backend.num_heads, kvh, dim, dtype, device,
                                 seed + 3)
            out = backend.forward(q, k, v, cache, backend.build_metadata(prefix))
            ref_out = ref.forward(q, k, v, ref_cache, prefix)
            assert_close(out, ref_out, dtype, f"writing the cached prefixes of {where}")
    q, k, v = random_qkv(metadata.slot_mapping.shape[0], backend.num_heads, kvh, dim, dtype,
                         device, seed)
    before = cache.clone()
    out = backend.forward(q, k, v, cache, backend.build_metadata(metadata))
    ref_out = ref.forward(q, k, v, ref_cache, metadata)
    assert tuple(out.shape) == tuple(q.shape) and out.dtype == q.dtype, (
        f"forward returned {tuple(out.shape)} {out.dtype}; expected q's {tuple(q.shape)} {q.dtype}")
    num_tokens = metadata.num_tokens
    assert_close(out[:num_tokens], ref_out[:num_tokens], dtype, where)
    assert tuple(cache.shape) == shape, "forward replaced the KV cache instead of writing into it"
    expected = num_tokens * 2 * kvh * dim
    written = count_written(before, cache)
    assert 0.9 * expected <= written <= expected, (
        f"{where}: the step changed {written} cache elements; its {num_tokens} new tokens' "
        f"K and V are {expected}: it must write those slots (slot_mapping) and nothing else")
    if same_layout:
        assert torch.equal(cache, ref_cache), (
            f"{where}: the KV cache differs from torch_ref's; a backend declaring torch_ref's "
            f"shape {ref_shape} must use its layout [2, num_blocks, block_size, kv_heads, head]")
    return out, ref_out, metadata
