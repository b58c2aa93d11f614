"""The figures of docs/distributed.md: Llama-3-70B in bf16 placed with tensor parallelism on
4 x H200 and on 2 machines x 8 H200, computed from the model's shape and the stated assumptions.

    python benchmarks/tp_placement.py        # prints the markdown tables of the document
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
GB = 1e9


@dataclass(frozen=True)
class Model:
    """Llama-3-70B (config.json of meta-llama/Meta-Llama-3-70B)."""
    hidden: int = 8192
    layers: int = 80
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 128
    mlp: int = 28672
    vocab: int = 128256
    dtype_bytes: int = 2          # bf16

    def layer_params(self, tp: int) -> int:
        """One decoder layer's parameters held by one rank of ``tp``."""
        h, d = self.hidden, self.head_dim
        kv_local = max(1, self.kv_heads // tp)            # replicated below kv_heads ranks
        q_o = 2 * h * self.heads * d // tp
        k_v = 2 * h * kv_local * d
        mlp = 3 * h * self.mlp // tp
        return q_o + k_v + mlp + 2 * h                     # + the two RMSNorm weights

    def params(self, tp: int = 1, layers: int | None = None, embeddings: int = 2) -> int:
        """Parameters one rank holds: its layers, and its rows of the embedding and LM head."""
        layers = self.layers if layers is None else layers
        table = -(-self.vocab // tp) * self.hidden
        return layers * self.layer_params(tp) + embeddings * table + self.hidden

    def kv_bytes_per_token(self, tp: int, layers: int | None = None) -> int:
        """K and V of one token, in the rank's layers and KV heads."""
        layers = self.layers if layers is None else layers
        return 2 * layers * max(1, self.kv_heads // tp) * self.head_dim * self.dtype_bytes


# ---- assumptions --------------------------------------------------------------------------
USABLE = 139 * GiB            # an H200 as the CUDA allocator sees it (141 GB on the box)
UTILIZATION = 0.9             # loom's default gpu-memory-utilization
RESERVE = 4 * GiB             # activations of an 8192-token step, logits, CUDA graphs, NCCL
NVLINK = 450 * GB             # NVLink 4 on H200: 900 GB/s bidirectional = 450 GB/s each way
NETWORK = 400e9 / 8           # one 400 Gb/s NIC: 50 GB/s each way
LATENCY_US = (10, 25)         # assumed per-collective latency, NVLink / network, microseconds


def ring_seconds(size_bytes: float, ranks: int, bandwidth: float) -> float:
    """Bandwidth term of a ring all-reduce: each rank sends 2(N-1)/N of the buffer."""
    return 2 * (ranks - 1) / ranks * size_bytes / bandwidth


def placement_rows(m: Model) -> list[tuple]:
    rows = []
    for name, tp, pp in (("4 x H200, TP 4", 4, 1), ("8 x H200, TP 8 (one machine)", 8, 1),
                         ("2 x 8 H200, TP 16", 16, 1), ("2 x 8 H200, TP 8 x PP 2", 8, 2)):
        layers = m.layers // pp
        weights = m.params(tp, layers, embeddings=1 if pp > 1 else 2) * m.dtype_bytes
        kv_budget = USABLE * UTILIZATION - weights - RESERVE
        per_token = m.kv_bytes_per_token(tp, layers)
        rows.append((name, weights / GiB, kv_budget / GiB, per_token, kv_budget // per_token))
    return rows


def allreduce_rows(m: Model) -> list[tuple]:
    """(step, tokens, bytes per all-reduce, all-reduces per step, bytes per step)."""
    per_step = 2 * m.layers + 1          # o and down of every layer, and the embedding
    rows = []
    for step, tokens in (("decode, batch 1", 1), ("decode, 256 sequences", 256),
                         ("prefill chunk of 2048 tokens", 2048)):
        size = tokens * m.hidden * m.dtype_bytes
        rows.append((step, tokens, size, per_step, size * per_step))
    return rows


def main() -> None:
    m = Model()
    print(f"parameters: {m.params():,} = {m.params() * m.dtype_bytes / GB:.1f} GB "
          f"({m.params() * m.dtype_bytes / GiB:.1f} GiB) in bf16; KV cache "
          f"{m.kv_bytes_per_token(1):,} bytes per token\n")
    print("| placement | weights per rank (GiB) | KV budget per rank (GiB) | KV bytes per token "
          "per rank | KV tokens per rank |")
    print("|---|---:|---:|---:|---:|")
    for name, w, kv, per_token, tokens in placement_rows(m):
        print(f"| {name} | {w:.1f} | {kv:.1f} | {per_token:,} | {tokens / 1e6:.2f} M |")
    print("\n| step | bytes per all-reduce | all-reduces | bytes per step | TP 4 NVLink | "
          "TP 8 NVLink | TP 16 at 400 Gb/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for step, _, size, count, total in allreduce_rows(m):
        times = [ring_seconds(total, 4, NVLINK), ring_seconds(total, 8, NVLINK),
                 ring_seconds(total, 16, NETWORK)]
        print(f"| {step} | {fmt_bytes(size)} | {count} | {fmt_bytes(total)} | "
              + " | ".join(fmt_time(t) for t in times) + " |")
    count = 2 * m.layers + 1
    print(f"\nlatency floor: {count} all-reduces x {LATENCY_US[0]} us = "
          f"{count * LATENCY_US[0] / 1e3:.2f} ms (NVLink), x {LATENCY_US[1]} us = "
          f"{count * LATENCY_US[1] / 1e3:.2f} ms (network)")
    boundary = [(t, t * m.hidden * m.dtype_bytes) for t in (1, 256, 2048)]
    print("pipeline boundary (hidden + residual as one tensor, once per step): " + ", ".join(
        f"{t} tokens {fmt_bytes(b)} = {fmt_time(b / NETWORK)}" for t, b in boundary))
    weights_rank = m.params(4) * m.dtype_bytes
    print(f"decode weight read per rank, TP 4: {weights_rank / GB:.1f} GB = "
          f"{fmt_time(weights_rank / 4.8e12)} at 4.8 TB/s HBM3e")


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_time(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


if __name__ == "__main__":
    main()
