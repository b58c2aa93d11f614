"""The ``triton`` attention backend: paged KV cache, mixed prefill/decode batches, split-KV decode.

KV-cache layout of one layer: [2, num_blocks, block_size, num_kv_heads, head_size] (K then V),
the same as torch_ref's, so the two can be checked against each other slot for slot.

Decodes (the batch's first num_decodes sequences) run the decode kernel, split-KV when the
batch has too few (sequence, KV head) programs to fill the device; the rest run the prefill
kernel. Graph safety: for a decode-only batch the grids and constexprs depend only on
num_decodes, the model's shapes, the block size and the *width* of the block table (which bounds
the context, and is a fixed buffer when a graph is captured); no host values (max_seq_len,
max_query_len, the *_cpu tensors) are read and nothing syncs. Other batches run eagerly.
An fp8 cache (kv-cache-dtype: fp8) is quantized by write_kv and read back inside the kernels.
"""
from __future__ import annotations


import torch

from loom import ops
from loom.attention import AttentionBackend, AttentionMetadata

# Launch configuration: first tuned on an H200 (bf16, 32 heads / 8 KV heads, head size 128).
# Keyed by the cache's bytes per value: an fp8 cache (1) moves half the bytes per key, so its
# tiles take more keys to keep as many bytes in flight.
DECODE_TILE = {2: 64, 4: 64, 1: 128}     # keys per inner-loop step of the decode kernel
DECODE_WARPS = {2: 2, 4: 2, 1: 4}
DECODE_STAGES = {2: 3, 4: 3, 1: 3}       # software-pipeline depth of the decode loop
# fp8 caches and batches of at least LARGE_DECODE_PROGRAMS_PER_SM (sequence, KV head) programs
# per SM: smaller programs (64 keys, one warp, 4 stages), 88% of the copy bandwidth at 256 x 8k
# against 78% (H200 run 22); they lose at small batches.
LARGE_FP8_DECODE = (64, 1, 4)
LARGE_DECODE_PROGRAMS_PER_SM = 8
PREFILL_TILE = 64         # keys per inner-loop step of the prefill kernel
PREFILL_BLOCK_M = {2: 64, 4: 64, 1: 128}  # query rows (tokens x group heads) per prefill
#                                          program, long chunks
MIN_BLOCK_M = 16          # ... short chunks (e.g. speculative tokens)
PREFILL_WARPS = 4
PROGRAMS_PER_SM = 4       # split-KV decode aims at this many programs per SM
MIN_SPLIT_TOKENS = 256    # no split covers less than this much of the longest possible context
MAX_SPLITS = 32


def num_kv_splits(num_programs: int, max_context: int, num_sms: int) -> int:
    """KV splits per sequence of a decode batch of num_programs (sequences x KV heads): about
    PROGRAMS_PER_SM programs per SM, none shorter than MIN_SPLIT_TOKENS of max_context, at most
    MAX_SPLITS; a power of two."""
    want = min(PROGRAMS_PER_SM * num_sms // num_programs, max_context // MIN_SPLIT_TOKENS,
               MAX_SPLITS)
    return 1 << (max(want, 1).bit_length() - 1)


class TritonAttention(AttentionBackend):
    name = "triton"
    supports_graphs = True
    supports_verify_graphs = True
    supported_kv_cache_dtypes = ("auto", "fp8")

    @classmethod
    def is_supported(cls, platform) -> bool:
        return platform.supports_triton()

    @staticmethod
    def kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size):
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(num_heads, num_kv_heads, head_size, scale, dtype, device)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of "
                             f"num_kv_heads {num_kv_heads}")
        # Imported here, not at module level: triton.jit picks compiled or interpreted
        # (TRITON_INTERPRET) when the kernels are defined.
        from loom.plugins.attention.triton import kernels
        from loom.plugins.ops.triton import kernels as ops_kernels
        self.kernels = kernels
        self.write_kv = ops_kernels.write_kv      # the one cache-write kernel, shared with ops
        device = torch.device(device)
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device.type == "cuda" else 1)
        self.kv_splits: int | None = None    # fixed split count (a power of two); None: heuristic

    def forward(self, q, k, v, kv_cache, metadata: AttentionMetadata):
        self.write_kv(kv_cache, k, v, metadata.slot_mapping, self.k_scale, self.v_scale)
        return self._attend(q, kv_cache, metadata)

    def forward_rotary(self, positions, rotary_emb, q, k, v, kv_cache, metadata):
        """With graph-safe fused ops (the triton ops), their one-kernel rotary and cache write;
        otherwise the rotary by the fused ops, then forward."""
        fused = ops.active()
        if not fused.graph_safe_write_kv:
            return super().forward_rotary(positions, rotary_emb, q, k, v, kv_cache, metadata)
        q = fused.rotary_write_kv(positions, q, k, v, rotary_emb.cos_sin_cache, kv_cache,
                                  metadata.slot_mapping, self.k_scale, self.v_scale)
        return self._attend(q, kv_cache, metadata)

    def _attend(self, q, kv_cache, metadata: AttentionMetadata):
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if metadata.num_decodes:
            self._decode(out, q, kv_cache, metadata)
        if metadata.num_decodes < metadata.num_seqs:
            self._prefill(out, q, kv_cache, metadata)
        return out

    def _decode(self, out, q, kv_cache, metadata: AttentionMetadata) -> None:
        """The leading decodes; graph-safe (see the module docstring)."""
        num_decodes = metadata.num_decodes
        max_context = metadata.block_tables.shape[1] * kv_cache.shape[2]
        splits = self.kv_splits or num_kv_splits(num_decodes * self.num_kv_heads, max_context,
                                                  self.num_sms)
        tile, warps, stages = self.decode_config(kv_cache.element_size(), num_decodes * splits)
        self.kernels.decode_attention(out, q, kv_cache, metadata.block_tables, metadata.seq_lens,
                                      num_decodes, self.scale, splits, tile, warps,
                                      self.k_scale, self.v_scale, num_stages=stages)

    def decode_config(self, value_bytes: int, num_seq_splits: int) -> tuple[int, int, int]:
        """(tile, warps, stages) of the decode kernel for a cache of value_bytes per value and a
        grid of num_seq_splits x num_kv_heads programs."""
        programs = num_seq_splits * self.num_kv_heads
        if value_bytes == 1 and programs >= LARGE_DECODE_PROGRAMS_PER_SM * self.num_sms:
            return LARGE_FP8_DECODE
        return DECODE_TILE[value_bytes], DECODE_WARPS[value_bytes], DECODE_STAGES[value_bytes]

    def _prefill(self, out, q, kv_cache, metadata: AttentionMetadata) -> None:
        """The sequences after the decodes; eager, so it may size its launch by host values."""
        group = self.num_heads // self.num_kv_heads
        long_chunks = metadata.max_query_len * group > MIN_BLOCK_M
        num_decodes = metadata.num_decodes
        out[metadata.num_tokens:].zero_()                 # padding tokens past the batch
        self.kernels.prefill_attention(
            out, q, kv_cache, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
            num_decodes, metadata.num_seqs, metadata.num_tokens - num_decodes, self.scale,
            PREFILL_BLOCK_M[kv_cache.element_size()] if long_chunks else MIN_BLOCK_M,
            PREFILL_TILE, PREFILL_WARPS,
            self.k_scale, self.v_scale)
