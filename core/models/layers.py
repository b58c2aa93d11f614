"""Layers of the Llama family, numerically identical to Hugging Face transformers.

``Linear`` holds its weights through a QuantMethod. Under tensor parallelism (see
loom.distributed) each rank holds a slice: column-parallel linears (q|k|v, gate|up) a slice of
the output rows and no communication, row-parallel ones (o, down) a slice of the input columns
and one all-reduce, the vocabulary-parallel embedding and LM head a slice of the vocabulary.
Each loads only its part of a checkpoint tensor. With one rank they are the plain layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loom import checkpoint, ops
from loom.distributed.group import TensorParallelGroup, current_group
from loom.quant import FusedInput, QuantMethod


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                quant: torch.dtype | None = None):
        """norm(x); with ``residual``: (norm(x + residual), x + residual). With ``quant`` (the
        next linear's ``input_quant``) the norm comes quantized per token (a QuantizedInput)."""
        fused = ops.active()
        if quant is not None:
            if residual is None:
                return fused.rms_norm_quant(x, self.weight, self.eps, quant)
            return fused.add_rms_norm_quant(x, residual, self.weight, self.eps, quant)
        if residual is None:
            return fused.rms_norm(x, self.weight, self.eps)
        return fused.add_rms_norm(x, residual, self.weight, self.eps)

    def before(self, linear: "Linear", x: torch.Tensor, residual: torch.Tensor | None):
        """(this norm of x (+ residual) as ``linear``'s input, x + residual or x): a FusedInput
        where the linear's kernel applies the norm itself (the sum lands in a new buffer when
        the linear runs), quantized where its method asks (input_quant), else the plain norm."""
        if linear.fuses_input("rms_norm", x):
            total = None if residual is None else torch.empty_like(x)
            return FusedInput("rms_norm", x, self.weight, self.eps, residual, total), (
                x if residual is None else total)
        quant = linear.input_quant()
        if residual is None:
            return self(x, quant=quant), x
        return self(x, residual, quant=quant)


class RotaryEmbedding(nn.Module):
    """Rotate-half (neox) rope over a float32 cos/sin cache of every position."""

    def __init__(self, head_dim: int, max_position: int, base: float,
                 rope_scaling: dict | None = None):
        super().__init__()
        inv_freq = _inv_freq(head_dim, base, rope_scaling)
        freqs = torch.arange(max_position, dtype=torch.float32, device="cpu")[:, None] * inv_freq
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D] and k [T, KVH, D] rotated by their token's position."""
        return ops.active().rotary(positions, q, k, self.cos_sin_cache)


def _inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base ** exponents)
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, medium ones interpolated."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class SiluAndMul(nn.Module):
    """silu(x[..., :n]) * x[..., n:] for x [..., 2n] (the fused gate|up output)."""

    def forward(self, x: torch.Tensor, quant: torch.dtype | None = None):
        if quant is not None:
            return ops.active().silu_and_mul_quant(x, quant)
        return ops.active().silu_and_mul(x)

    def before(self, linear: "Linear", x: torch.Tensor):
        """silu-and-mul of x as ``linear``'s input: a FusedInput where the linear's kernel
        applies it itself, quantized where its method asks, else the plain op."""
        if linear.fuses_input("silu_and_mul", x):
            return FusedInput("silu_and_mul", x)
        return self(x, linear.input_quant())


class VocabEmbedding(nn.Module):
    """Rows of the vocabulary split over the ranks, rank r holding ``rows`` of them from
    ``r * rows`` (the last rank's padded with zeros). An id outside a rank's rows looks up zero
    there; one all-reduce sums the ranks' lookups."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 tp: TensorParallelGroup | None = None):
        super().__init__()
        self.tp = tp or current_group()
        self.num_embeddings = num_embeddings
        self.rows = -(-num_embeddings // self.tp.size)
        self.start = self.tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim))

    def load(self, loaded) -> None:
        """This rank's rows of a checkpoint table [num_embeddings, embedding_dim]."""
        full = checkpoint.shape(loaded)
        if full != (self.num_embeddings, self.weight.shape[1]):
            raise ValueError(f"checkpoint shape {full} does not match the model's "
                             f"{(self.num_embeddings, self.weight.shape[1])}")
        end = min(self.start + self.rows, self.num_embeddings)
        self.weight.data[:end - self.start].copy_(
            checkpoint.read(loaded, {0: slice(self.start, end)}))
        self.weight.data[end - self.start:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class LMHead(VocabEmbedding):
    """The output projection hidden -> vocab logits; each rank computes its rows' logits, one
    all-gather puts the whole vocabulary on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather(logits)[..., :self.num_embeddings]


@dataclass(frozen=True)
class Partition:
    """The part of a linear's checkpoint weight [sum(output_sizes), input_size] that a layer
    holds: of fused shard i the rows from ``output_starts[i]`` (as many as the layer's
    ``output_sizes[i]``), and the input columns from ``input_start``."""
    input_size: int                    # the checkpoint's
    output_sizes: tuple[int, ...]      # the checkpoint's, per fused shard
    input_start: int = 0
    output_starts: tuple[int, ...] | None = None    # None: zeros
    rank: int = 0
    size: int = 1

    def starts(self) -> tuple[int, ...]:
        return self.output_starts or (0,) * len(self.output_sizes)

    def describe(self) -> str:
        return f"rank {self.rank} of tensor-parallel-size {self.size}"


class Linear(nn.Module):
    """y = x W^T + b, with W the concatenation of ``output_sizes`` shards (q|k|v, gate|up).

    The QuantMethod creates the parameters (``bias`` among them, or None) and does the matmul.
    ``partition`` says which part of the checkpoint's W the sizes are (default: all of it).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool,
                 quant_method: QuantMethod, params_dtype: torch.dtype | None = None,
                 partition: Partition | None = None, prefix: str = ""):
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.quant_method = quant_method
        self.partition = partition or Partition(input_size, tuple(output_sizes))
        self.prefix = prefix
        self.register_parameter("bias", None)
        try:
            quant_method.create_weights(self, input_size, self.output_sizes, bias,
                                        params_dtype or torch.get_default_dtype())
            if self.is_partitioned:
                self._check_partition()
        except ValueError as e:
            if not self.is_partitioned:
                raise
            raise ValueError(f"{prefix or 'a linear layer'}: cannot be sharded for "
                             f"{self.partition.describe()} (input columns {self._columns()}, "
                             f"output rows {self._rows()}): {e}") from None

    @property
    def is_partitioned(self) -> bool:
        p = self.partition
        return (p.input_size, p.output_sizes) != (self.input_size, tuple(self.output_sizes))

    def _columns(self) -> str:
        p = self.partition
        return f"[{p.input_start}, {p.input_start + self.input_size}) of {p.input_size}"

    def _rows(self) -> str:
        p = self.partition
        return ", ".join(f"[{s}, {s + n}) of {full}" for s, n, full in
                         zip(p.starts(), self.output_sizes, p.output_sizes))

    def _check_partition(self) -> None:
        """Every parameter's slice exists (packing and groups align with the rank's part)."""
        names = [n for n, t in [*self._parameters.items(), *self._buffers.items()]
                 if t is not None]
        for name in names:
            for shard_id in range(len(self.output_sizes)):
                self.quant_method.rank_index(self, name, shard_id)

    def load(self, param_name: str, loaded, shard_id: int | None) -> None:
        """Copy this layer's part of a checkpoint tensor (a tensor or a lazy safetensors slice)
        into ``param_name`` (shard ``shard_id`` when fused)."""
        if not self.is_partitioned:
            self.quant_method.load(self, param_name, checkpoint.read(loaded), shard_id)
            return
        parts = self.quant_method.rank_index(self, param_name, shard_id)
        try:
            self.quant_method.load(self, param_name, checkpoint.read(loaded, parts), shard_id)
        except ValueError as e:
            raise ValueError(f"{self.prefix}, {self.partition.describe()}: {e} (a quant method "
                             "marks the input axis of a parameter with input_dim for a "
                             "row-parallel rank to take its slice)") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def input_quant(self) -> torch.dtype | None:
        """The fp8 dtype the op before this layer should quantize its output to (per token), or
        None (see QuantMethod.input_quant)."""
        return self.quant_method.input_quant(self)

    def fuses_input(self, op: str, x: torch.Tensor) -> bool:
        """Whether this layer's kernel applies ``op`` to x itself (see QuantMethod.fuses_input)."""
        return self.quant_method.fuses_input(self, op, x)

    def fuses_output(self, op: str, x) -> bool:
        """Whether this layer's kernel applies ``op`` to its output (QuantMethod.fuses_output)."""
        return self.quant_method.fuses_output(self, op, x)

    def forward_fused_output(self, x, op: str) -> torch.Tensor:
        """op(self(x)) in the layer's kernel, where ``fuses_output`` said yes."""
        return self.quant_method.apply_fused_output(self, x, self.bias, op)


class ColumnParallelLinear(Linear):
    """Each fused shard's output rows split evenly: rank r computes its slice of y."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool,
                 quant_method: QuantMethod, prefix: str = "",
                 tp: TensorParallelGroup | None = None):
        tp = tp or current_group()
        for n in output_sizes:
            if n % tp.size:
                raise ValueError(f"{prefix}: {n} output rows do not split over "
                                 f"tensor-parallel-size {tp.size}")
        local = [n // tp.size for n in output_sizes]
        partition = Partition(input_size, tuple(output_sizes), 0,
                              tuple(tp.rank * n for n in local), tp.rank, tp.size)
        super().__init__(input_size, local, bias, quant_method, partition=partition,
                         prefix=prefix)


def local_head_counts(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(query heads, KV heads) of one rank: KV heads split when there are at least as many as
    ranks, else each rank keeps the one its query heads use (replicated)."""
    return num_heads // tp_size, max(1, num_kv_heads // tp_size)


class QKVParallelLinear(Linear):
    """q|k|v split by heads: rank r holds query heads [r * h, (r + 1) * h) and the KV heads
    they attend with (shared by several ranks when there are fewer KV heads than ranks)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool, quant_method: QuantMethod, prefix: str = "",
                 tp: TensorParallelGroup | None = None):
        tp = tp or current_group()
        heads, kv_heads = local_head_counts(num_heads, num_kv_heads, tp.size)
        first_kv = tp.rank * heads // (num_heads // num_kv_heads)
        full = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
        starts = (tp.rank * heads * head_dim, first_kv * head_dim, first_kv * head_dim)
        partition = Partition(hidden_size, full, 0, starts, tp.rank, tp.size)
        super().__init__(hidden_size, [heads * head_dim, kv_heads * head_dim,
                                       kv_heads * head_dim],
                         bias, quant_method, partition=partition, prefix=prefix)


class RowParallelLinear(Linear):
    """Input columns split evenly: rank r multiplies its slice of x by its columns of W; one
    all-reduce sums the partial products. Rank 0 alone adds the bias."""

    def __init__(self, input_size: int, output_size: int, bias: bool,
                 quant_method: QuantMethod, prefix: str = "",
                 tp: TensorParallelGroup | None = None):
        tp = tp or current_group()
        if input_size % tp.size:
            raise ValueError(f"{prefix}: {input_size} input columns do not split over "
                             f"tensor-parallel-size {tp.size}")
        local = input_size // tp.size
        partition = Partition(input_size, (output_size,), tp.rank * local, None, tp.rank, tp.size)
        super().__init__(local, [output_size], bias, quant_method, partition=partition,
                         prefix=prefix)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias if self.tp.rank == 0 else None)
        return self.tp.all_reduce(y)
