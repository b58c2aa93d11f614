"""Weight-only int4/int8 (W4A16, W8A16) in the GPTQ, AWQ and compressed-tensors pack-quantized
layouts.

After loading, every layout is repacked into one: ``w_q`` int32 [N, K/pf], each row of W packed
along its inputs, the code of input k in bits (k % pf) * bits of word k // pf (pf = 32 / bits:
GPTQ's packing, transposed so that each output row streams contiguously), ``w_scales`` and
``w_zeros`` [N, G] in the activation dtype, w = (q - zero) * scale. Act order (a g_idx that puts
input rows in any group) is sorted away where it can be: when every group holds the same number of
inputs, the inputs are stored in group order, ``w_perm`` [K] names the input each stored one is
(x is read through it) and the groups are the default k // group_size again. ``w_g_idx`` [K], the
group of each stored input, remains only where the groups are uneven (a row-parallel rank's share
of an act-order layer); otherwise it is None. CUDA multiplies with the Triton kernels, which
dequantize in registers: the GEMV for up to 16 rows of x (int4 over 1-4 rows of bf16/fp16 x: the
native one of csrc/wna16_gemv.cu, native/wna16_gemv.py; else triton/wna16_gemv.py), the GEMM
(triton/wna16.py) beyond; elsewhere the weight is dequantized, then multiplied (the reference
twin).

Tensor parallelism: a column-parallel rank takes whole packed words and its columns of the
scales and zeros. A row-parallel rank takes its input rows and the groups they fall in; with
act order (a g_idx) its rows may use any group, so it keeps every group and its slice of g_idx.
"""
from __future__ import annotations

import functools

import torch

from loom.plugins.quant.schemes.base import Scheme
from loom.quant import FusedInput

AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)   # column c of 8 sits in nibble AWQ_ORDER[c]
AWQ_NIBBLES = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_NIBBLES[i]


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R / pf, C] -> codes [R, C]: row r in bits (r % pf) * bits of word r // pf."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)
    return codes.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C / pf] -> codes [R, C], packed along the last dim."""
    return unpack_rows(packed.t(), bits).t()


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [R, C] (C a multiple of pf) -> int32 [R, C / pf], the inverse of unpack_cols."""
    return pack_rows(codes.t(), bits).t().contiguous()


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [R, C] (R a multiple of pf) -> int32 [R / pf, C], the inverse of unpack_rows."""
    grouped = codes.to(torch.int32).reshape(-1, 32 // bits, codes.shape[1])
    words = torch.zeros_like(grouped[:, 0])
    for i in range(32 // bits):
        words |= grouped[:, i] << (bits * i)
    return words


def dequantize(w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """The weight [N, K] of the canonical tensors in the dtype of ``scales``, inputs in their
    stored order (with a perm, stored input i is input perm[i])."""
    codes = unpack_cols(w_q, bits)
    groups = g_idx if g_idx is not None else (
        torch.arange(codes.shape[1], device=codes.device) // group_size)
    return (codes.to(scales.dtype) - zeros[:, groups]) * scales[:, groups]


def act_order_perm(g_idx: torch.Tensor, groups: int) -> torch.Tensor | None:
    """The inputs in group order (a stable sort of g_idx) when every group holds the same number
    of them, so that the sorted groups are k // group_size; else None."""
    k = g_idx.numel()
    counts = torch.bincount(g_idx.long(), minlength=groups)
    if k % groups or (counts != k // groups).any():
        return None
    return torch.sort(g_idx, stable=True).indices.to(torch.int32)


def default_g_idx(k: int, groups: int, device) -> torch.Tensor:
    return torch.arange(k, dtype=torch.int32, device=device) // (k // groups)


def round_to_nearest(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """A float weight [N, K] as unsigned codes [N, K], scales and zeros [N, G], w ~ (q - z) * s
    per group of K: what an offline quantizer writes, for the conformance kit."""
    n, k = weight.shape
    w = weight.float().view(n, -1, k if group_size == -1 else group_size)
    top = 2**bits - 1
    if symmetric:
        scale = w.abs().amax(-1).clamp(min=1e-8) / (top // 2)
        zero = torch.full_like(scale, (top + 1) // 2)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = ((hi - lo) / top).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
    codes = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, top)
    return codes.view(n, k).to(torch.int32), scale, zero.to(torch.int32)


@functools.cache
def _kernels():
    """(the native int4 GEMV module, the Triton GEMV module, the GEMM), imported on first use."""
    from loom.plugins.quant.native import wna16_gemv as native_gemv
    from loom.plugins.quant.triton import wna16_gemv
    from loom.plugins.quant.triton.wna16 import wna16_gemm
    return native_gemv, wna16_gemv, wna16_gemm


class WNA16Scheme(Scheme):
    """Shared by the layouts: the canonical tensors, the matmul. Subclasses create the
    checkpoint's parameters (``create_quantized``) and read them back (``canonical``: codes
    [K, N], scales and zeros [G, N], g_idx per shard or None). ``act_order``: the checkpoint's
    g_idx may put input rows in any group."""

    act_order = False
    kernels_on_cpu = False   # tests: the Triton kernels on the CPU too (needs TRITON_INTERPRET=1)

    def __init__(self, bits: int, group_size: int):
        if bits not in (4, 8):
            raise ValueError(f"{self.name}: {bits}-bit weights are not supported (4 or 8)")
        if group_size == 0 or group_size < -1:
            raise ValueError(f"{self.name}: group size {group_size} is not supported (a group "
                             "size, or -1 for one group per column)")
        self.bits, self.group_size = bits, group_size
        self.pack = 32 // bits

    def create_weights(self, layer, input_size, output_sizes, bias, params_dtype):
        self.check_shape(input_size, output_sizes)
        self.params_dtype = params_dtype
        self.add_bias(layer, bias, params_dtype)
        self.create_quantized(layer, input_size, sum(output_sizes), params_dtype)

    def groups(self, input_size: int) -> int:
        return 1 if self.group_size in (-1, input_size) else input_size // self.group_size

    def group_layout(self, layer) -> tuple[int, int | None]:
        """(groups the layer holds, input columns per group when a row-parallel rank holds
        its slice of the checkpoint's groups; None: it holds them all)."""
        full = layer.partition.input_size
        if layer.input_size == full:
            return self.groups(full), None
        if self.groups(full) == 1 or self.act_order:
            return self.groups(full), None
        return self.groups(layer.input_size), self.group_size

    def group_offset(self, layer) -> int:
        """The first checkpoint group a row-parallel rank holds (0 when it holds them all)."""
        _, per_group = self.group_layout(layer)
        return layer.partition.input_start // per_group if per_group else 0

    def check_shape(self, input_size: int, output_sizes: list[int]) -> None:
        gs = self.group_size
        if input_size % self.pack or (gs > 0 and input_size % gs):
            raise ValueError(f"{self.name}: input size {input_size} is not a multiple of the "
                             f"packing ({self.pack}) and group size ({gs})")
        if any(n % self.pack for n in output_sizes):
            raise ValueError(f"{self.name}: output sizes {output_sizes} are not multiples of "
                             f"the packing ({self.pack})")

    def process_after_loading(self, layer):
        codes, scales, zeros, g_idx = self.canonical(layer)
        k, groups, dtype = codes.shape[0], scales.shape[0], self.params_dtype
        perm = None
        if g_idx is not None:
            g_idx = self.shared_g_idx(g_idx - self.group_offset(layer), k, groups)
        if g_idx is not None:
            perm = act_order_perm(g_idx, groups)
        if perm is not None:
            codes, g_idx = codes[perm.long()], None
        self.replace(layer, w_q=pack_cols(codes.t(), self.bits),
                     w_scales=scales.t().to(dtype).contiguous(),
                     w_zeros=zeros.t().to(dtype).contiguous(), w_g_idx=g_idx, w_perm=perm)
        layer.group_size = k // groups
        if self.bits == 4 and layer.w_q.is_cuda:
            _kernels()[0].warm_up()

    def shared_g_idx(self, g_idx: torch.Tensor, k: int, groups: int) -> torch.Tensor | None:
        """One g_idx for all shards (the same input gives them the same act order); None if
        it is the default k // group_size."""
        if (g_idx[1:] != g_idx[0]).any():
            raise ValueError(f"{self.name}: the shards of a fused layer have different g_idx "
                             f"(act orders); loom needs one per fused layer")
        g_idx = g_idx[0].to(torch.int32)
        if g_idx.min() < 0 or g_idx.max() >= groups:
            raise ValueError(f"{self.name}: g_idx out of range [0, {groups})")
        if groups != self.groups(k):     # a row-parallel rank holding every group
            return g_idx.contiguous()
        default = default_g_idx(k, groups, g_idx.device)
        return None if torch.equal(g_idx, default) else g_idx.contiguous()

    def dequantize(self, layer):
        w = dequantize(layer.w_q, layer.w_scales, layer.w_zeros, layer.w_g_idx, self.bits,
                       layer.group_size)
        if layer.w_perm is None:
            return w
        return torch.empty_like(w).index_copy_(1, layer.w_perm.long(), w)

    def fuses_input(self, layer, op, x):
        """The native int4 GEMV applies the norm / SiLU-and-mul itself (1-4 rows on CUDA)."""
        return x.is_cuda and x.dim() == 2 and self.native_applies(layer, x, op)

    def native_applies(self, layer, x, op=None) -> bool:
        """Whether the native int4 GEMV takes x (with ``op`` applied first) for this layer."""
        native, _, _ = _kernels()
        return native.applies(x, layer.w_q, layer.w_scales, self.bits, layer.group_size,
                              layer.w_g_idx, op)

    def apply(self, layer, x, bias):
        if isinstance(x, FusedInput):
            if self.native_applies(layer, x.x, x.op):
                native, _, _ = _kernels()
                return native.int4_gemv(x, layer.w_q, layer.w_scales, layer.w_zeros,
                                        layer.w_perm, layer.group_size, bias)
            x = x.evaluate()
        x2 = x.reshape(-1, x.shape[-1])
        if x.is_cuda or self.kernels_on_cpu:
            y = self.triton_matmul(layer, x2, bias)
        else:
            w = dequantize(layer.w_q, layer.w_scales.to(x.dtype), layer.w_zeros.to(x.dtype),
                           layer.w_g_idx, self.bits, layer.group_size)
            xs = x2 if layer.w_perm is None else x2[:, layer.w_perm.long()]
            y = xs @ w.t() if bias is None else torch.addmm(bias, xs, w.t())
        return y.view(*x.shape[:-1], y.shape[-1])

    def fuses_output(self, layer, op, x):
        """The native int4 GEMV applies SiLU-and-mul to its output (1-4 rows on CUDA, an even
        number of output rows), x plain or a FusedInput it takes."""
        t, before = (x.x, x.op) if isinstance(x, FusedInput) else (x, None)
        if not (isinstance(t, torch.Tensor) and t.is_cuda and t.dim() == 2):
            return False
        native, _, _ = _kernels()
        return native.applies(t, layer.w_q, layer.w_scales, self.bits, layer.group_size,
                              layer.w_g_idx, before, epilogue=op)

    def apply_fused_output(self, layer, x, bias, op):
        native, _, _ = _kernels()
        return native.int4_gemv(x, layer.w_q, layer.w_scales, layer.w_zeros, layer.w_perm,
                                layer.group_size, bias, epilogue=op)

    def triton_matmul(self, layer, x2, bias):
        """The GEMV (bias fused) for the rows of a decode step: the native int4 one where it
        applies, else Triton's; the GEMM beyond."""
        native, gemv, gemm = _kernels()
        args = (layer.w_q, layer.w_scales, layer.w_zeros)
        if self.native_applies(layer, x2):
            return native.int4_gemv(x2, *args, layer.w_perm, layer.group_size, bias)
        if gemv.gemv_supported(x2, layer.w_q, self.bits, layer.group_size, layer.w_g_idx):
            return gemv.wna16_gemv(x2, *args, layer.w_perm, self.bits, layer.group_size, bias)
        y = gemm(x2, *args, layer.w_g_idx, self.bits, layer.group_size, perm=layer.w_perm)
        return y if bias is None else y + bias


class GPTQLayout(WNA16Scheme):
    """GPTQ: ``qweight`` int32 [K/pf, N] packed along the input dim, ``qzeros`` int32 [G, N/pf]
    along the output dim, ``scales`` [G, N], optional ``g_idx`` [K]. v1 checkpoints (gptq) store
    zero - 1 (GPTQModel subtracts 1 from every packed code at once, borrows included; adding it
    back the same way inverts that exactly), v2 (gptq_v2) the zero itself."""

    name = "gptq"

    def __init__(self, bits: int, group_size: int, v1: bool, desc_act: bool = False):
        super().__init__(bits, group_size)
        self.v1, self.desc_act = v1, desc_act
        self.act_order = desc_act

    def create_quantized(self, layer, k, n, dtype):
        g, per_group = self.group_layout(layer)
        by_group = {"input_dim": 0 if per_group else None, "input_packed_factor": per_group or 1}
        self.new_param(layer, "qweight", (k // self.pack, n), torch.int32, output_dim=1,
                       input_dim=0, input_packed_factor=self.pack)
        self.new_param(layer, "qzeros", (g, n // self.pack), torch.int32, output_dim=1,
                       packed_factor=self.pack, **by_group)
        self.new_param(layer, "scales", (g, n), dtype, output_dim=1, **by_group)
        self.per_shard_param(layer, "g_idx", (k,), torch.int32, parameter=False, input_dim=0)

    def canonical(self, layer):
        qzeros = layer.qzeros.data
        if self.v1:
            qzeros = qzeros + sum(1 << (self.bits * i) for i in range(self.pack))
        zeros = unpack_cols(qzeros, self.bits)
        loaded = (layer.g_idx >= 0).all(dim=1)
        if not loaded.all() and (loaded.any() or self.desc_act):
            raise ValueError("gptq: the checkpoint lacks g_idx for some shards"
                             + (" (desc_act is true)" if self.desc_act else ""))
        g_idx = layer.g_idx if loaded.all() else None
        return unpack_rows(layer.qweight.data, self.bits), layer.scales.data, zeros, g_idx

    def quantize(self, weight):
        codes, scales, zeros = round_to_nearest(weight, self.bits, self.group_size, False)
        qzeros = pack_cols(zeros.t(), self.bits)
        if self.v1:
            qzeros = qzeros - sum(1 << (self.bits * i) for i in range(self.pack))
        tensors = {"qweight": pack_rows(codes.t(), self.bits), "qzeros": qzeros,
                   "scales": scales.t().contiguous()}
        if self.desc_act:
            k = weight.shape[1]
            tensors["g_idx"] = default_g_idx(k, self.groups(k), weight.device)
        return tensors

    def checkpoint_names(self):
        return ("qweight", "qzeros", "scales", "g_idx", "bias")


class AWQLayout(WNA16Scheme):
    """AWQ (GEMM): ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [G, N/8] packed along the
    output dim in the order AWQ_ORDER, zeros stored as they are, ``scales`` [G, N]."""

    name = "awq"

    def __init__(self, bits: int, group_size: int):
        if bits != 4:
            raise ValueError(f"awq: {bits}-bit weights are not supported (4)")
        super().__init__(bits, group_size)

    def create_quantized(self, layer, k, n, dtype):
        g, per_group = self.group_layout(layer)
        by_group = {"input_dim": 0 if per_group else None, "input_packed_factor": per_group or 1}
        self.new_param(layer, "qweight", (k, n // self.pack), torch.int32, output_dim=1,
                       packed_factor=self.pack, input_dim=0)
        self.new_param(layer, "qzeros", (g, n // self.pack), torch.int32, output_dim=1,
                       packed_factor=self.pack, **by_group)
        self.new_param(layer, "scales", (g, n), dtype, output_dim=1, **by_group)

    def awq_unpack(self, packed: torch.Tensor) -> torch.Tensor:
        codes = unpack_cols(packed, self.bits)
        return codes.view(codes.shape[0], -1, 8)[..., list(AWQ_ORDER)].reshape(codes.shape)

    def canonical(self, layer):
        zeros = self.awq_unpack(layer.qzeros.data)
        return self.awq_unpack(layer.qweight.data), layer.scales.data, zeros, None

    def awq_pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_cols(codes.view(codes.shape[0], -1, 8)[..., list(AWQ_NIBBLES)]
                         .reshape(codes.shape), self.bits)

    def quantize(self, weight):
        codes, scales, zeros = round_to_nearest(weight, self.bits, self.group_size, False)
        return {"qweight": self.awq_pack(codes.t()), "qzeros": self.awq_pack(zeros.t()),
                "scales": scales.t().contiguous()}

    def checkpoint_names(self):
        return ("qweight", "qzeros", "scales", "bias")


class PackQuantizedLayout(WNA16Scheme):
    """compressed-tensors pack-quantized: ``weight_packed`` int32 [N, K/pf] of offset-binary
    codes (q + 2^(bits-1)) packed along the input dim, ``weight_scale`` [N, G], ``weight_shape``
    [2] per shard, ``weight_zero_point`` int32 [N/pf, G] packed along the output dim when
    asymmetric, ``weight_g_idx`` [K] with group act order."""

    name = "compressed-tensors"

    def __init__(self, bits: int, group_size: int, symmetric: bool, has_g_idx: bool):
        super().__init__(bits, group_size)
        self.symmetric, self.has_g_idx = symmetric, has_g_idx
        self.act_order = has_g_idx

    def create_quantized(self, layer, k, n, dtype):
        g, per_group = self.group_layout(layer)
        by_group = {"input_dim": 1 if per_group else None, "input_packed_factor": per_group or 1}
        self.new_param(layer, "weight_packed", (n, k // self.pack), torch.int32, output_dim=0,
                       input_dim=1, input_packed_factor=self.pack)
        self.new_param(layer, "weight_scale", (n, g), dtype, output_dim=0, **by_group)
        self.per_shard_param(layer, "weight_shape", (2,), torch.int64)
        if not self.symmetric:
            self.new_param(layer, "weight_zero_point", (n // self.pack, g), torch.int32,
                           output_dim=0, packed_factor=self.pack, **by_group)
        if self.has_g_idx:
            self.per_shard_param(layer, "weight_g_idx", (k,), torch.int32, input_dim=0)

    def canonical(self, layer):
        p = layer.partition      # weight_shape is the checkpoint's, not a rank's part
        expected = torch.tensor([[n, p.input_size] for n in p.output_sizes])
        if not torch.equal(layer.weight_shape.data.cpu(), expected):
            raise ValueError(f"compressed-tensors: weight_shape {layer.weight_shape.tolist()} "
                             f"does not match the layer's {expected.tolist()}")
        codes = unpack_cols(layer.weight_packed.data, self.bits).t()
        scales = layer.weight_scale.data.t()
        if self.symmetric:
            zeros = torch.full_like(scales, 1 << (self.bits - 1))
        else:
            zeros = unpack_rows(layer.weight_zero_point.data, self.bits).t()
        g_idx = layer.weight_g_idx.data if self.has_g_idx else None
        return codes, scales, zeros, g_idx

    def quantize(self, weight):
        n, k = weight.shape
        codes, scales, zeros = round_to_nearest(weight, self.bits, self.group_size,
                                                self.symmetric)
        tensors = {"weight_packed": pack_cols(codes, self.bits), "weight_scale": scales,
                   "weight_shape": torch.tensor([n, k], device=weight.device)}
        if not self.symmetric:
            tensors["weight_zero_point"] = pack_rows(zeros, self.bits)
        if self.has_g_idx:
            tensors["weight_g_idx"] = default_g_idx(k, self.groups(k), weight.device)
        return tensors

    def checkpoint_names(self):
        return ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                "weight_g_idx", "bias")
