"""The AttentionBackend interface and the per-step metadata every backend receives.

The model runner lays a step's tokens out flat, decodes first: sequence i owns query tokens
``query_start_loc[i]:query_start_loc[i+1]`` and, after this step's K/V are written, its first
``seq_lens[i]`` cache slots (through ``block_tables[i]``). Its queries are the *last* tokens of
those ``seq_lens[i]`` positions, causal among themselves. A backend declares the shape of one
layer's KV cache; the core allocates it through the platform and hands the backend views.

An fp8 KV cache (``kv-cache-dtype: fp8``) holds K/V quantized per tensor: stored = x / scale,
clamped to the fp8 range; read back as stored * scale in fp32. The cache tensor's dtype says
which kind a backend got; its ``k_scale``/``v_scale`` are the scales.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from loom import ops

logger = logging.getLogger("loom")


@dataclass
class AttentionMetadata:
    num_seqs: int
    num_decodes: int             # sequences 0..num_decodes-1 have exactly one query token
    num_tokens: int              # real tokens; tensors may be padded past this (graphs)
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, on the device
    seq_lens: torch.Tensor         # [num_seqs] int32, on the device
    block_tables: torch.Tensor     # [num_seqs, max_blocks] int32, on the device
    slot_mapping: torch.Tensor     # [num_tokens(+pad)] int64; -1 = write nothing
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_size: int
    block_tables_cpu: torch.Tensor | None = None   # the host copy, where the runner has one

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


class AttentionBackend:
    """One attention implementation. Registered through the ``loom_attention_backends`` hook."""

    name: str = ""
    supported_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    required_block_size: int | None = None    # the core uses this block size when set
    supports_graphs: bool = False             # forward may be captured in a device graph
    supports_verify_graphs: bool = False      # ... also for (k+1)-token speculative verify steps
    unavailable: str | None = None            # set: registered only to say what is missing
    supported_kv_cache_dtypes: tuple[str, ...] = ("auto",)   # kv-cache-dtype values it takes

    @classmethod
    def is_supported(cls, platform) -> bool:
        """Whether this backend runs on ``platform`` (a loom.platform.Platform instance)."""
        return True

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_size: int) -> tuple[int, ...]:
        """The shape of one layer's KV cache."""
        raise NotImplementedError

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 dtype: torch.dtype, device: torch.device):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.dtype = dtype
        self.device = device
        self.k_scale = 1.0      # fp8 caches: stored K = K / k_scale (one scale for all layers)
        self.v_scale = 1.0

    def build_metadata(self, common: AttentionMetadata):
        """Per-step, outside any graph: turn the common metadata into what forward takes."""
        return common

    def build_graph_metadata(self, common: AttentionMetadata):
        """Once per captured batch size, before the capture: the metadata a decode graph holds.
        ``common``'s device tensors are the graph's persistent buffers."""
        return self.build_metadata(common)

    def plan_replay(self, graph_metadata, step: AttentionMetadata) -> None:
        """Before each replay of a captured decode graph, outside it: update what
        ``graph_metadata`` keeps beside the device buffers (host-side plans) for this step,
        whose host tensors (``seq_lens_cpu``, ``block_tables_cpu``) hold the padded batch.
        Backends that read only the device buffers need nothing here."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata) -> torch.Tensor:
        """Write k/v [T, num_kv_heads, D] into ``kv_cache`` by slot mapping, then attend.

        q is [T, num_heads, D]; returns [T, num_heads, D] in q's dtype. Every token's K/V must
        be written before any sequence attends: sequences of one step may share blocks that
        another sequence of the same step fills (n > 1 siblings, shared prefixes).
        """
        raise NotImplementedError

    def forward_rotary(self, positions: torch.Tensor, rotary_emb, q: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                       metadata) -> torch.Tensor:
        """``rotary_emb(positions, q, k)`` (a loom.models.layers.RotaryEmbedding), then
        ``forward``. A backend that rotates k as it writes the cache overrides this to save a
        kernel; q and k may be rotated in place either way."""
        q, k = rotary_emb(positions, q, k)
        return self.forward(q, k, v, kv_cache, metadata)


def is_fp8(kv_cache: torch.Tensor) -> bool:
    """Whether ``kv_cache`` holds fp8 values (quantized by the backend's scales)."""
    return kv_cache.dtype in FP8_DTYPES


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2)


def kv_cache_torch_dtype(kv_cache_dtype: str, dtype: torch.dtype, platform) -> torch.dtype:
    """The element type of the KV cache for the config's ``kv-cache-dtype``: the model dtype
    for "auto", the platform's fp8 type for "fp8"."""
    if kv_cache_dtype == "auto":
        return dtype
    assert kv_cache_dtype == "fp8" and platform.fp8_dtype is not None, kv_cache_dtype
    return platform.fp8_dtype


def unavailable_backend(name: str, reason: str) -> type[AttentionBackend]:
    """A placeholder registered under ``name`` by a plugin whose package does not import: it
    runs nowhere, and naming it in the config fails with ``reason`` (what is missing, how to
    install it)."""
    return type(f"Unavailable_{name}", (AttentionBackend,), {
        "name": name, "unavailable": reason,
        "is_supported": classmethod(lambda cls, platform: False)})


def fused_kv_writer(backend: AttentionBackend):
    """For backends that write the KV cache through the active fused ops: their ``write_kv``.
    When it syncs with the host (the torch twin), the backend's decode graphs are turned off,
    and a line says so."""
    fused = ops.active()
    if not fused.graph_safe_write_kv and backend.supports_graphs:
        backend.supports_graphs = False
        logger.info("%s: fused ops %r write the KV cache with a host sync; decode graphs are off",
                    backend.name, fused.name)
    return fused.write_kv
