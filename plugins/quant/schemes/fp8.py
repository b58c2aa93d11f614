"""FP8 (e4m3) weights: per-tensor, per-channel or block scales; activations quantized statically
(one input scale per tensor), dynamically per token, per token and 128-wide K group (block
checkpoints), or not at all (weight-only); or weights quantized while loading (``online``).

After loading, the weight is ``w_fp8`` [N, K] with ``w_scale`` [N] (per-tensor scales of fused
shards become per-channel ones, so shards keep their own scale exactly), or ``w_block_scale``
[N, K/bk] (each block scale repeated over its rows). On CUDA: torch._scaled_mm (tensor-wise or
row-wise) or the Triton block-scaled GEMM; elsewhere the reference twin dequantizes both operands
(activations quantized exactly as on the GPU) and multiplies in the activation dtype.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from loom.ops import quantize_per_token
from loom.plugins.quant.schemes.base import Scheme
from loom.quant import QuantizedInput

WEIGHTS = ("tensor", "channel", "block", "online")
ACTIVATIONS = ("static", "token", "group", None)


def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = fp8_max(dtype)
    return (x.float() / scale).clamp(-m, m).to(dtype)


def quantize_act(x: torch.Tensor, mode: str, dtype: torch.dtype, static_scale=None,
                 group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 x, fp32 scale): scalar (static), [M, 1] (token) or [M, ceil(K/group)]."""
    if mode == "static":
        return quantize(x, static_scale, dtype), static_scale
    if mode == "token":
        q = quantize_per_token(x, dtype)
        return q.data, q.scale
    k = x.shape[-1]
    padded = F.pad(x, (0, -k % group)).view(x.shape[0], -1, group)
    scale = padded.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / fp8_max(dtype)
    return quantize(padded, scale, dtype).view(x.shape[0], -1)[:, :k], scale.squeeze(-1)


def to_fnuz(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn -> e4m3fnuz (MI300): the same bits are worth half, and -0 is fnuz's NaN."""
    bits = weight.view(torch.int8).clone()
    bits[bits == -128] = 0
    return bits.view(torch.float8_e4m3fnuz), scale * 2


@functools.cache
def _per_token_quant():
    """The fused Triton kernel, or the torch twin where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return lambda x, dtype: quantize_act(x, "token", dtype)
    from loom.plugins.quant.triton.per_token_quant import per_token_quant_fp8
    return per_token_quant_fp8


@functools.cache
def _block_gemm():
    from loom.plugins.quant.triton.fp8_block import fp8_block_gemm
    return fp8_block_gemm


class Fp8Scheme(Scheme):
    """``weight``: tensor | channel | block | online; ``act``: static | token | group | None.
    ``scale_name`` is the checkpoint's name of the weight scale (weight_scale_inv for block fp8
    checkpoints, a multiplier despite its name)."""

    name = "fp8"

    # Hopper's FP8 tensor-core sums without the periodic fp32 promotion, as vLLM's CUTLASS FP8
    # kernels (FP8FastAccum) do: 10-14% faster at prefill sizes on the H200, relative error of a
    # product 2.1e-3 (K = 4096) / 3.3e-3 (K = 14336) against 1.7e-3 without, far below fp8's own
    # rounding (benchmarks/results/kernels_fp8_gemm_h200_run*.json).
    fast_accum = True

    def __init__(self, weight: str, act: str | None, block: tuple[int, int] | None = None,
                 scale_name: str = "weight_scale", fp8_dtype: torch.dtype = torch.float8_e4m3fn):
        if weight not in WEIGHTS or act not in ACTIVATIONS:
            raise ValueError(f"fp8: unsupported weight scales {weight!r} / activations {act!r}")
        if act is not None and (weight == "block") != (act == "group"):
            raise ValueError("fp8: block weight scales go with per-group activations, and only "
                             "they do")
        self.weight, self.act, self.block = weight, act, block
        self.scale_name, self.fp8_dtype = scale_name, fp8_dtype

    def create_weights(self, layer, input_size, output_sizes, bias, params_dtype):
        n, k = sum(output_sizes), input_size
        self.add_bias(layer, bias, params_dtype)
        if self.weight == "online":
            self.new_param(layer, "weight", (n, k), params_dtype, output_dim=0, input_dim=1)
            return
        self.new_param(layer, "weight", (n, k), torch.float8_e4m3fn, output_dim=0, input_dim=1)
        if self.weight == "tensor":
            self.per_shard_param(layer, self.scale_name, (), torch.float32)
        elif self.weight == "channel":
            self.new_param(layer, self.scale_name, (n, 1), torch.float32, output_dim=0)
        else:
            bn, bk = self.block
            rows = sum(-(-s // bn) for s in output_sizes)
            self.new_param(layer, self.scale_name, (rows, -(-k // bk)), torch.float32,
                           output_dim=0, packed_factor=bn, ceil=True, input_dim=1,
                           input_packed_factor=bk)
        if self.act == "static":
            self.per_shard_param(layer, "input_scale", (), torch.float32)

    def checkpoint_names(self):
        return ("weight", self.scale_name, "input_scale", "bias")

    def quantize(self, weight):
        """What an offline quantizer writes for the conformance kit; a static input scale
        covers inputs up to 16."""
        if self.weight == "online":
            return {"weight": weight}
        w, fp8 = weight.float(), torch.float8_e4m3fn
        if self.weight == "block":
            (bn, bk), (n, k) = self.block, w.shape
            blocks = F.pad(w, (0, -k % bk, 0, -n % bn)).view(-(-n // bn), bn, -1, bk)
            scale = blocks.abs().amax((1, 3)).clamp(min=1e-12) / fp8_max(fp8)
            full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
            tensors = {"weight": quantize(w, full, fp8), self.scale_name: scale}
        else:
            dims = {"tensor": None, "channel": 1}[self.weight]
            scale = (w.abs().amax() if dims is None else w.abs().amax(1, keepdim=True))
            scale = scale.clamp(min=1e-12) / fp8_max(fp8)
            tensors = {"weight": quantize(w, scale, fp8), self.scale_name: scale}
        if self.act == "static":
            tensors["input_scale"] = torch.tensor(16 / fp8_max(fp8), device=weight.device)
        return tensors

    def process_after_loading(self, layer):
        weight, scale = self.weight_and_scale(layer)
        if self.fp8_dtype == torch.float8_e4m3fnuz:
            weight, scale = to_fnuz(weight, scale)
        a_scale = None
        if self.act == "static":
            a_scale = layer.input_scale.data.max().float()
            if self.fp8_dtype == torch.float8_e4m3fnuz:
                a_scale = a_scale * 2
        name = "w_block_scale" if self.weight == "block" else "w_scale"
        self.replace(layer, w_fp8=weight, a_scale=a_scale, **{name: scale.contiguous()})
        layer.tensor_wise = self.act == "static" and bool((scale == scale.view(-1)[0]).all())

    def weight_and_scale(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp8 weight [N, K] and its fp32 scale, [N] or [N, K/bk]."""
        if self.weight == "online":
            w = layer.weight.data
            scale = w.abs().amax(1).float().clamp(min=1e-12) / fp8_max(torch.float8_e4m3fn)
            return quantize(w, scale[:, None], torch.float8_e4m3fn), scale
        scale = getattr(layer, self.scale_name).data.float()
        sizes = torch.tensor(layer.output_sizes, device=scale.device)
        if self.weight == "tensor":
            return layer.weight.data, scale.repeat_interleave(sizes)
        if self.weight == "channel":
            return layer.weight.data, scale.view(-1)
        bn = self.block[0]
        shards = scale.split([-(-s // bn) for s in layer.output_sizes])
        rows = [s.repeat_interleave(bn, 0)[:n] for s, n in zip(shards, layer.output_sizes)]
        return layer.weight.data, torch.cat(rows)

    def input_quant(self, layer):
        """Per-token activations on CUDA (row-wise or tensor-wise _scaled_mm, not the block GEMM):
        the norm or activation before the layer quantizes its output in the same kernel."""
        if self.act == "token" and self.weight != "block" and layer.w_fp8.is_cuda:
            return self.fp8_dtype
        return None

    def apply(self, layer, x, bias):
        if isinstance(x, QuantizedInput):    # quantized upstream, as apply_cuda would have
            if x.data.is_cuda:
                return self.scaled_mm(layer, x.data, x.scale, bias, x.dtype)
            xd = (x.data.float() * x.scale).to(x.dtype)      # the CPU twin: dequantized
            return F.linear(xd, self.dequantized_weight(layer, x.dtype), bias)
        x2 = x.reshape(-1, x.shape[-1])
        if x.is_cuda:
            y = self.apply_cuda(layer, x2, bias)
        else:
            y = F.linear(self.fake_quant_act(layer, x2), self.dequantized_weight(layer, x.dtype),
                         bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    def fake_quant_act(self, layer, x: torch.Tensor) -> torch.Tensor:
        """x after the round trip through fp8 that the GPU path makes."""
        if self.act is None:
            return x
        xq, scale = quantize_act(x, self.act, self.fp8_dtype, layer.a_scale, self.group_k)
        if self.act == "group":
            scale = scale.repeat_interleave(self.group_k, 1)[:, :x.shape[1]]
        return (xq.float() * scale).to(x.dtype)

    def dequantized_weight(self, layer, dtype: torch.dtype) -> torch.Tensor:
        w = layer.w_fp8.float()
        if self.weight == "block":
            scale = layer.w_block_scale.repeat_interleave(self.group_k, 1)[:, :w.shape[1]]
        else:
            scale = layer.w_scale[:, None]
        return (w * scale).to(dtype)

    @property
    def group_k(self) -> int:
        return self.block[1] if self.block else 128

    def apply_cuda(self, layer, x: torch.Tensor, bias) -> torch.Tensor:
        if self.act is None:
            return F.linear(x, self.dequantized_weight(layer, x.dtype), bias)
        if self.act == "token":       # one Triton kernel; its twin is quantize_act
            xq, x_scale = _per_token_quant()(x, self.fp8_dtype)
        else:
            xq, x_scale = quantize_act(x, self.act, self.fp8_dtype, layer.a_scale, self.group_k)
        return self.scaled_mm(layer, xq, x_scale, bias, x.dtype)

    def scaled_mm(self, layer, xq: torch.Tensor, x_scale: torch.Tensor, bias,
                  out_dtype: torch.dtype) -> torch.Tensor:
        """y = dequant(xq) @ dequant(W)^T (+ bias) in out_dtype, on CUDA."""
        if self.weight == "block":
            y = _block_gemm()(xq, x_scale, layer.w_fp8, layer.w_block_scale, self.group_k,
                              out_dtype)
            return y if bias is None else y + bias
        if layer.tensor_wise:
            return torch._scaled_mm(xq, layer.w_fp8.t(), scale_a=x_scale,
                                    scale_b=layer.w_scale[0], bias=bias, out_dtype=out_dtype,
                                    use_fast_accum=self.fast_accum)
        # row-wise scaling: one scale per row of x and per column of y; bf16 out only
        row_scale = x_scale.expand(xq.shape[0], 1).contiguous()
        y = torch._scaled_mm(xq, layer.w_fp8.t(), scale_a=row_scale,
                             scale_b=layer.w_scale[None, :], out_dtype=torch.bfloat16,
                             use_fast_accum=self.fast_accum).to(out_dtype)
        return y if bias is None else y + bias
