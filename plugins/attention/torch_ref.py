"""torch_ref: paged attention in plain torch, on any device. The reference twin of every backend.

KV-cache layout of one layer: [2, num_blocks, block_size, num_kv_heads, head_size] (K then V).
An fp8 cache is dequantized (fp32 * scale) as it is gathered.
"""
from __future__ import annotations

import torch

from loom.attention import AttentionBackend, AttentionMetadata, is_fp8
from loom.hookspecs import hookimpl
from loom.ops import dequantize_fp8, write_kv


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int):
    """The first ``seq_len`` cached K and V of one sequence: two [seq_len, KVH, D] tensors."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0, blocks].reshape(-1, *kv_cache.shape[-2:])[:seq_len]
    v = kv_cache[1, blocks].reshape(-1, *kv_cache.shape[-2:])[:seq_len]
    return k, v


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Q, H, D] are the last Q positions of a sequence whose keys are k/v [S, KVH, D]."""
    num_q, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(seq_len - num_q, seq_len, device=q.device)[:, None]
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    scores.masked_fill_(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


class TorchRefAttention(AttentionBackend):
    name = "torch"
    supported_kv_cache_dtypes = ("auto", "fp8")

    @staticmethod
    def kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size):
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata):
        write_kv(kv_cache, k, v, metadata.slot_mapping, self.k_scale, self.v_scale)
        out = torch.zeros_like(q)
        starts = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        for i in range(metadata.num_seqs):
            start, end = starts[i], starts[i + 1]
            if end == start:
                continue
            keys, values = gather_kv(kv_cache, metadata.block_tables[i], seq_lens[i])
            if is_fp8(kv_cache):
                keys = dequantize_fp8(keys, self.k_scale)
                values = dequantize_fp8(values, self.v_scale)
            out[start:end] = attend_one(q[start:end], keys, values, self.scale)
        return out


@hookimpl
def loom_attention_backends():
    return [TorchRefAttention]
