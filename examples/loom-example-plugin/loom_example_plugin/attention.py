"""An attention backend wrapping torch's scaled_dot_product_attention over gathered blocks.

It declares its own KV-cache layout, [num_blocks, 2, num_kv_heads, block_size, head_size]
(K and V of a block side by side, heads outermost, as SDPA wants them), unlike torch_ref's;
the core allocates what ``kv_cache_shape`` says and hands it to ``forward``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loom.attention import AttentionBackend, AttentionMetadata


class SdpaAttention(AttentionBackend):
    name = "example-sdpa"
    supported_dtypes = (torch.float32, torch.bfloat16, torch.float16)

    @classmethod
    def is_supported(cls, platform) -> bool:
        return platform.device_type in ("cpu", "cuda")

    @staticmethod
    def kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size):
        return (num_blocks, 2, num_kv_heads, block_size, head_size)

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata):
        self._write(kv_cache, k, v, metadata.slot_mapping)
        out = torch.zeros_like(q)
        starts = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        for i in range(metadata.num_seqs):
            start, end = starts[i], starts[i + 1]
            if end > start and seq_lens[i]:
                out[start:end] = self._attend(q[start:end], kv_cache, metadata.block_tables[i],
                                              seq_lens[i])
        return out

    @staticmethod
    def _write(kv_cache, k, v, slot_mapping):
        """K/V [T, KVH, D] of each token into its slot (block * block_size + offset); -1: none."""
        slots = slot_mapping[:k.shape[0]]
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
        block_size = kv_cache.shape[3]
        blocks, offsets = slots // block_size, slots % block_size
        kv_cache[blocks, 0, :, offsets] = k.to(kv_cache.dtype)
        kv_cache[blocks, 1, :, offsets] = v.to(kv_cache.dtype)

    def _attend(self, q, kv_cache, block_table, seq_len):
        """q [Q, H, D]: the last Q of a sequence's seq_len positions, causal."""
        block_size = kv_cache.shape[3]
        blocks = block_table[:-(-seq_len // block_size)].long()
        kv = kv_cache[blocks]                                   # [n, 2, KVH, bs, D]
        k = kv[:, 0].transpose(0, 1).flatten(1, 2)[:, :seq_len]  # [KVH, S, D]
        v = kv[:, 1].transpose(0, 1).flatten(1, 2)[:, :seq_len]
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        num_q = q.shape[0]
        q_pos = torch.arange(seq_len - num_q, seq_len, device=q.device)[:, None]
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask,
                                             scale=self.scale)
        return out.transpose(0, 1)
