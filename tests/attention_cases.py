"""Shared attention-backend test cases, checked against torch_ref.

A batch is a list of (num_cached, num_new) pairs, one per sequence, decodes (num_new == 1)
first, as the model runner lays them out. ``build_metadata`` turns it into AttentionMetadata
over a paged cache whose blocks are a random permutation of the block ids.
"""
from __future__ import annotations

import torch

from loom.attention import AttentionMetadata
from loom.plugins.attention.torch_ref import TorchRefAttention

# name -> batch
MIXED_BATCHES = {
    "decodes_and_chunks": [(17, 1), (40, 1), (0, 13), (21, 9)],
    "long_prefix": [(5, 1), (150, 7), (93, 3)],
    "block_boundaries": [(31, 1), (16, 16), (0, 32)],
    "prefill_only": [(0, 1), (0, 23)],
}
DECODE_BATCH = [(0, 1), (15, 1), (63, 1), (130, 1), (300, 1)]


def build_metadata(batch, block_size: int, device="cpu", num_pad: int = 0,
                   max_blocks: int | None = None, seed: int = 0):
    """AttentionMetadata for ``batch`` and the number of blocks the cache needs.

    num_pad appends padding sequences (seq_len 0, one token with slot -1, as in a padded graph
    batch); max_blocks widens the block table (a static width, as under graphs); block ids are
    a random permutation, with spare blocks no sequence uses.
    """
    num_decodes = sum(1 for _, new in batch if new == 1)
    assert all(new == 1 for _, new in batch[:num_decodes]), "decodes go first"
    assert num_pad == 0 or num_decodes == len(batch), "padding is for decode-only batches"
    seq_lens = [cached + new for cached, new in batch]
    need = [-(-n // block_size) for n in seq_lens]
    width = max_blocks or max(need)
    num_blocks = sum(need) + 3
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_tables = torch.zeros(len(batch) + num_pad, width, dtype=torch.int32)
    slots, used = [], 0
    for i, (cached, new) in enumerate(batch):
        block_tables[i, :need[i]] = ids[used:used + need[i]]
        used += need[i]
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
        query_start_loc_cpu=qsl, seq_lens_cpu=lens, block_size=block_size)
    return metadata, num_blocks


def random_inputs(metadata: AttentionMetadata, num_blocks: int, num_heads: int,
                  num_kv_heads: int, head_size: int, dtype, device="cpu", seed: int = 0):
    """q [T, H, D] and k/v [T, KVH, D] as views of one fused qkv tensor (as the model passes
    them), and a cache of random values (the cached prefixes)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    num_tokens = metadata.slot_mapping.shape[0]
    sizes = [num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size]
    qkv = torch.randn(num_tokens, sum(sizes), generator=gen, device=device).to(dtype)
    q, k, v = qkv.split(sizes, dim=-1)
    shape = TorchRefAttention.kv_cache_shape(num_blocks, metadata.block_size, num_kv_heads,
                                             head_size)
    kv_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    return (q.view(num_tokens, num_heads, head_size), k.view(num_tokens, num_kv_heads, head_size),
            v.view(num_tokens, num_kv_heads, head_size), kv_cache)


def run_with_ref(backend, metadata: AttentionMetadata, q, k, v, kv_cache):
    """(out, ref_out, cache, ref_cache): ``backend`` and torch_ref on copies of one cache."""
    ref = TorchRefAttention(backend.num_heads, backend.num_kv_heads, backend.head_size,
                            backend.scale, backend.dtype, backend.device)
    cache, ref_cache = kv_cache.clone(), kv_cache.clone()
    out = backend.forward(q, k, v, cache, backend.build_metadata(metadata))
    ref_out = ref.forward(q, k, v, ref_cache, metadata)
    return out, ref_out, cache, ref_cache


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
