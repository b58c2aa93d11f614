"""Decode steps as captured device graphs (CUDA graphs; HIP graphs on ROCm, same torch API).

One graph per batch-size bucket, captured once over persistent input buffers. A decode-only
step of n sequences copies its inputs into the buffers, pads to the next bucket (padding
sequences have seq_len 0 and slot -1: they read and write nothing), and replays the graph.

A set of graphs serves one query length: 1 for plain decodes, k + 1 for speculative
verification (every sequence brings its last token and k drafts, a short chunk over its cached
prefix, which the attention backend runs like any prefill chunk). Padding sequences of a
verification graph have seq_len k + 1 (no cached prefix: no negative key positions) and write
nothing; their outputs are never read.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from loom.attention import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:
    from loom.model_runner import HostBatch, ModelRunner

logger = logging.getLogger("loom")
DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", sizes: list[int] | None, query_len: int = 1):
        limit = min(runner.config.max_num_seqs, runner.max_num_batched_tokens // query_len)
        chosen = sorted({s for s in (sizes or DEFAULT_SIZES) if s <= limit})
        if not sizes and limit > 0 and (not chosen or chosen[-1] < limit):
            chosen.append(limit)            # default buckets always cover max-num-seqs
        self.sizes = chosen
        self.runner = runner
        self.query_len = q = query_len
        self.max_size = chosen[-1] if chosen else 0
        max_blocks = -(-runner.max_model_len // runner.block_size)
        dev = runner.device
        n = self.max_size
        self.input_ids = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n * q, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n * q,), -1, dtype=torch.int64, device=dev)
        # Captured with every sequence a padding one (see the module docstring).
        self.seq_lens = torch.full((n,), 0 if q == 1 else q, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=dev)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev) * q
        # Pinned host staging: one asynchronous copy per buffer per step.
        pin = dev.type == "cuda"
        self.host = {name: torch.zeros(t.shape, dtype=t.dtype, pin_memory=pin)
                     for name, t in self._buffers().items()}
        self.copied = torch.Event(device=dev)     # the last step's copies out of staging
        self.graphs: dict[int, tuple[object, torch.Tensor, object]] = {}
        # Only backends that plan on the host need the step's host metadata before a replay.
        self.plans = type(runner.attn).plan_replay is not AttentionBackend.plan_replay

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "positions": self.positions,
                "slot_mapping": self.slot_mapping, "seq_lens": self.seq_lens,
                "block_tables": self.block_tables}

    def _common(self, size: int, seq_lens_cpu: torch.Tensor,
                block_tables_cpu: torch.Tensor | None) -> AttentionMetadata:
        r = self.runner
        q = self.query_len
        return AttentionMetadata(
            num_seqs=size, num_decodes=size if q == 1 else 0, num_tokens=size * q,
            max_query_len=q, max_seq_len=r.max_model_len,
            query_start_loc=self.query_start[:size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size * q],
            query_start_loc_cpu=torch.arange(size + 1, dtype=torch.int32) * q,
            seq_lens_cpu=seq_lens_cpu, block_size=r.block_size, block_tables_cpu=block_tables_cpu)

    def _forward(self, size: int, metadata) -> torch.Tensor:
        r = self.runner
        tokens = size * self.query_len
        return r.model(self.input_ids[:tokens], self.positions[:tokens], r.kv_caches, metadata)

    @torch.inference_mode()
    def capture(self) -> None:
        platform = self.runner.platform
        start = time.perf_counter()
        pool = platform.graph_pool()
        with platform.graph_capture() as stream:
            for size in reversed(self.sizes):      # largest first: later ones reuse its pool
                # Host values as a graph sees them: placeholders, replayed with other values.
                metadata = self.runner.attn.build_graph_metadata(
                    self._common(size, torch.zeros(size, dtype=torch.int32), None))
                self._forward(size, metadata)      # warm-up: kernels compiled, workspaces made
                graph = platform.make_graph()
                with platform.capture(graph, pool, stream):
                    out = self._forward(size, metadata)
                self.graphs[size] = (graph, out, metadata)
        platform.synchronize()
        kind = "decode" if self.query_len == 1 else f"{self.query_len}-token verify"
        logger.info("captured %d %s graphs (batch sizes %s) in %.1f s", len(self.graphs), kind,
                    ",".join(map(str, self.sizes)), time.perf_counter() - start)

    def can_run(self, hb: "HostBatch") -> bool:
        if not 0 < hb.num_seqs <= self.max_size:
            return False
        if self.query_len == 1:
            return hb.decode_only
        return (len(hb.input_ids) == hb.num_seqs * self.query_len
                and bool((np.diff(hb.query_start) == self.query_len).all()))

    def run(self, hb: "HostBatch") -> torch.Tensor:
        n = hb.num_seqs
        size = next(s for s in self.sizes if s >= n)
        tokens, padded = n * self.query_len, size * self.query_len
        self.copied.synchronize()                  # staging is free to overwrite
        h = self.host
        h["input_ids"][:tokens] = torch.from_numpy(hb.input_ids)
        h["positions"][:tokens] = torch.from_numpy(hb.positions)
        h["slot_mapping"][:tokens] = torch.from_numpy(hb.slot_mapping)
        h["slot_mapping"][tokens:padded] = -1
        h["seq_lens"][:n] = torch.from_numpy(hb.seq_lens)
        h["seq_lens"][n:size] = 0 if self.query_len == 1 else self.query_len
        width = hb.block_table.shape[1]
        h["block_tables"][:n, :width] = torch.from_numpy(hb.block_table)
        rows = {"input_ids": padded, "positions": padded, "slot_mapping": padded,
                "seq_lens": size, "block_tables": n}
        for name, buf in self._buffers().items():
            buf[:rows[name]].copy_(h[name][:rows[name]], non_blocking=True)
        self.copied.record()
        self.runner.fill_placeholders(self.input_ids, hb)
        graph, out, metadata = self.graphs[size]
        if self.plans:
            step = self._common(size, h["seq_lens"][:size], h["block_tables"][:size, :width])
            self.runner.attn.plan_replay(metadata, step)
        graph.replay()
        return out[:tokens]
