"""The ``flash_attn`` attention backend: FlashAttention-2's paged kernels on NVIDIA GPUs.

KV-cache layout of one layer: [2, num_blocks, block_size, num_kv_heads, head_size]; K and V are
each FlashAttention's paged [num_blocks, page_size, num_kv_heads, head_size]. Its paged path
needs a page size that is a multiple of 256, so the backend declares ``required_block_size``.
Decodes run ``flash_attn_with_kvcache`` (graph-safe: it reads lengths and tables on the
device); prefill chunks, with or without a cached prefix, ``flash_attn_varlen_func`` over the
block tables (causal, aligned to the end of each sequence). New K/V go in through the active
fused ops' ``write_kv``.

Registered only when ``import flash_attn`` works; otherwise a placeholder says what is missing.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from loom.attention import (AttentionBackend, AttentionMetadata, fused_kv_writer,
                            unavailable_backend)
from loom.hookspecs import hookimpl

try:
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
except ImportError as exc:
    flash_attn_varlen_func = flash_attn_with_kvcache = None
    MISSING = (f"the flash_attn package does not import ({exc}); install it with "
               f"`pip install flash-attn --no-build-isolation` (see docs/attention.md)")

PAGE_SIZE = 256


class FlashAttnAttention(AttentionBackend):
    name = "flash_attn"
    supported_dtypes = (torch.float16, torch.bfloat16)
    supported_kv_cache_dtypes = ("auto",)     # no fp8 KV cache in this version
    required_block_size = PAGE_SIZE
    supports_graphs = True
    supports_verify_graphs = True

    @classmethod
    def is_supported(cls, platform) -> bool:
        return platform.name == "cuda"

    @staticmethod
    def kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size):
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def __init__(self, num_heads, num_kv_heads, head_size, scale, dtype, device):
        super().__init__(num_heads, num_kv_heads, head_size, scale, dtype, device)
        self.write_kv = fused_kv_writer(self)

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata):
        self.write_kv(kv_cache, k, v, metadata.slot_mapping)
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        nd = metadata.num_decodes
        if nd:
            out[:nd] = flash_attn_with_kvcache(
                q[:nd].unsqueeze(1), kv_cache[0], kv_cache[1],
                cache_seqlens=metadata.seq_lens[:nd], block_table=metadata.block_tables[:nd],
                softmax_scale=self.scale, causal=True).squeeze(1)
        if nd < metadata.num_seqs:
            self._prefill(out, q, kv_cache, metadata)
        return out

    def _prefill(self, out, q, kv_cache, metadata: AttentionMetadata) -> None:
        """The sequences after the decodes; eager, so it may use host values."""
        nd, end = metadata.num_decodes, metadata.num_tokens
        qsl = metadata.query_start_loc[nd:] - metadata.query_start_loc[nd]
        seq_lens = metadata.seq_lens[nd:metadata.num_seqs]
        cu_k = F.pad(torch.cumsum(seq_lens, 0, dtype=torch.int32), (1, 0))
        out[nd:end] = flash_attn_varlen_func(
            q[nd:end], kv_cache[0], kv_cache[1], cu_seqlens_q=qsl.to(torch.int32),
            cu_seqlens_k=cu_k, max_seqlen_q=metadata.max_query_len,
            max_seqlen_k=metadata.max_seq_len, softmax_scale=self.scale, causal=True,
            block_table=metadata.block_tables[nd:metadata.num_seqs])


@hookimpl
def loom_attention_backends():
    if flash_attn_varlen_func is None:
        return [unavailable_backend("flash_attn", MISSING)]
    return [FlashAttnAttention]
