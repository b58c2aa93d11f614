"""The ``flashinfer`` attention backend: FlashInfer's paged-KV wrappers on NVIDIA GPUs.

KV-cache layout of one layer: [2, num_blocks, block_size, num_kv_heads, head_size], handed to
FlashInfer as the (K, V) pair of its "NHD" layout. Decodes (the batch's first num_decodes
sequences) run BatchDecodeWithPagedKVCacheWrapper, prefill chunks with or without a cached
prefix BatchPrefillWithPagedKVCacheWrapper (causal, aligned to the end of each sequence).

Planning happens on the host once per step, outside any graph: ``build_metadata`` for eager
steps, ``plan_replay`` before each replay of a captured decode graph, whose wrapper (one per
batch size) keeps its page tables in fixed device buffers. New K/V go in through the active
fused ops' ``write_kv`` (slot mapping), which must be graph-safe for graphs to be used.

Registered only when ``import flashinfer`` works; otherwise a placeholder says what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.attention import (AttentionBackend, AttentionMetadata, fused_kv_writer,
                            unavailable_backend)
from loom.hookspecs import hookimpl

try:
    import flashinfer
except ImportError as exc:          # the package, or one of its own dependencies, is missing
    flashinfer = None
    MISSING = (f"the flashinfer package does not import ({exc}); install it with "
               f"`pip install flashinfer-python` (see docs/attention.md)")

WORKSPACE_BYTES = 256 * 1024 * 1024     # FlashInfer's split-KV scratch, shared by the wrappers


@dataclass
class PagedKV:
    """One group of sequences in FlashInfer's page-table form (host tensors)."""
    indptr: torch.Tensor          # [n + 1] int32: sequence i owns indices[indptr[i]:indptr[i+1]]
    indices: torch.Tensor         # [total pages] int32: block ids
    last_page_len: torch.Tensor   # [n] int32: tokens in each sequence's last page (1..block)


def paged_kv(seq_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int,
             pad_empty: bool = False) -> PagedKV:
    """The page table of sequences with ``seq_lens`` tokens over ``block_tables`` (host).
    ``pad_empty`` gives a sequence of length 0 (graph padding) block 0's first slot, so the
    kernel reads one finite value instead of an empty range."""
    seq_lens = seq_lens.to(torch.int32)
    empty = seq_lens == 0
    if pad_empty:
        seq_lens = torch.where(empty, 1, seq_lens)
    pages = (seq_lens + block_size - 1) // block_size
    indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    torch.cumsum(pages, 0, out=indptr[1:])
    width = int(pages.max()) if len(pages) else 0
    table = torch.where(empty[:, None], 0, block_tables[:, :width]).to(torch.int32)
    used = torch.arange(width)[None, :] < pages[:, None]
    return PagedKV(indptr, table[used], seq_lens - (pages - 1) * block_size)


@dataclass
class FlashInferMetadata:
    common: AttentionMetadata
    decode: object | None         # a planned BatchDecodeWithPagedKVCacheWrapper
    prefill: object | None        # a planned BatchPrefillWithPagedKVCacheWrapper


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"
    supported_dtypes = (torch.float16, torch.bfloat16)
    supported_kv_cache_dtypes = ("auto",)     # no fp8 KV cache in this version
    supports_graphs = True

    @classmethod
    def is_supported(cls, platform) -> bool:
        return platform.name == "cuda"

    @staticmethod
    def kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size):
        return (2, num_blocks, block_size, num_kv_heads, head_size)

    def __init__(self, num_heads, num_kv_heads, head_size, scale, dtype, device):
        super().__init__(num_heads, num_kv_heads, head_size, scale, dtype, device)
        self.write_kv = fused_kv_writer(self)
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace,
                                                                              "NHD")

    def _plan_args(self) -> dict:
        return dict(num_qo_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                    head_dim=self.head_size, q_data_type=self.dtype, kv_data_type=self.dtype,
                    sm_scale=self.scale)

    def _plan_decode(self, wrapper, kv: PagedKV, block_size: int) -> None:
        wrapper.plan(kv.indptr, kv.indices.to(self.device), kv.last_page_len,
                     page_size=block_size, **self._plan_args())

    def build_metadata(self, common: AttentionMetadata) -> FlashInferMetadata:
        nd, bs = common.num_decodes, common.block_size
        tables = (common.block_tables_cpu if common.block_tables_cpu is not None
                  else common.block_tables.cpu())
        decode = prefill = None
        if nd:
            kv = paged_kv(common.seq_lens_cpu[:nd], tables[:nd], bs, pad_empty=True)
            self._plan_decode(self.decode_wrapper, kv, bs)
            decode = self.decode_wrapper
        if nd < common.num_seqs:
            kv = paged_kv(common.seq_lens_cpu[nd:], tables[nd:common.num_seqs], bs)
            qo = common.query_start_loc_cpu[nd:] - common.query_start_loc_cpu[nd]
            args = self._plan_args()
            args["head_dim_qk"] = args.pop("head_dim")
            self.prefill_wrapper.plan(qo, kv.indptr, kv.indices.to(self.device),
                                      kv.last_page_len, page_size=bs, causal=True, **args)
            prefill = self.prefill_wrapper
        return FlashInferMetadata(common, decode, prefill)

    def build_graph_metadata(self, common: AttentionMetadata) -> FlashInferMetadata:
        """A decode wrapper of this batch size over fixed page-table buffers, planned for
        placeholder sequences of one token; plan_replay re-plans it for every step."""
        size = common.num_seqs
        max_pages = size * common.block_tables.shape[1]
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True,
            paged_kv_indptr_buffer=torch.zeros(size + 1, dtype=torch.int32, device=self.device),
            paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device=self.device),
            paged_kv_last_page_len_buffer=torch.zeros(size, dtype=torch.int32,
                                                      device=self.device))
        placeholder = torch.zeros(size, common.block_tables.shape[1], dtype=torch.int32)
        self._plan_decode(wrapper, paged_kv(torch.ones(size), placeholder, common.block_size),
                          common.block_size)
        return FlashInferMetadata(common, wrapper, None)

    def plan_replay(self, graph_metadata: FlashInferMetadata, step: AttentionMetadata) -> None:
        kv = paged_kv(step.seq_lens_cpu, step.block_tables_cpu, step.block_size, pad_empty=True)
        self._plan_decode(graph_metadata.decode, kv, step.block_size)

    def forward(self, q, k, v, kv_cache, metadata: FlashInferMetadata):
        common = metadata.common
        self.write_kv(kv_cache, k, v, common.slot_mapping)
        cache = (kv_cache[0], kv_cache[1])
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        nd = common.num_decodes
        if metadata.decode is not None:
            metadata.decode.run(q[:nd].contiguous(), cache, out=out[:nd])
        if metadata.prefill is not None:
            end = common.num_tokens
            metadata.prefill.run(q[nd:end].contiguous(), cache, out=out[nd:end])
        return out


@hookimpl
def loom_attention_backends():
    if flashinfer is None:
        return [unavailable_backend("flashinfer", MISSING)]
    return [FlashInferAttention]
