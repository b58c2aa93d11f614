"""The QuantMethod interface: how a linear layer holds its weights, loads them and multiplies.

Every linear layer of a model owns one QuantMethod instance (the unquantized method is a plugin
like the others). A linear may be *fused*: its output is the concatenation of ``output_sizes``
shards (q|k|v, gate|up), each loaded from its own checkpoint tensor with a ``shard_id``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class QuantizedInput:
    """x [M, K] quantized per token upstream, by a fused op (a norm or an activation) that a
    method's ``input_quant`` asked for: ``data`` in that fp8 dtype, ``scale`` fp32 [M, 1], x ~
    data * scale. What the method's own per-token quantization of x would have given."""
    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype      # of x before quantization: the layer's output dtype


@dataclass
class FusedInput:
    """The op before a linear, left to the linear's own kernel to apply to x as it reads it
    (where the method's ``fuses_input`` said it would), saving that op's kernel:

    - ``"rms_norm"``: rms_norm(x) * weight, or with ``residual`` rms_norm(x + residual) * weight,
      where x + residual (added in x's dtype) also goes to ``residual_out`` (the caller's buffer,
      never residual itself: every block of the kernel reads residual);
    - ``"silu_and_mul"``: silu(x[:, :K]) * x[:, K:] for x [M, 2K].

    ``evaluate()`` is the reference: the input the unfused ops give, residual_out filled."""
    op: str
    x: torch.Tensor
    weight: torch.Tensor | None = None
    eps: float = 0.0
    residual: torch.Tensor | None = None
    residual_out: torch.Tensor | None = None

    OPS = ("rms_norm", "silu_and_mul")

    def __post_init__(self):
        if self.op not in self.OPS:
            raise ValueError(f"FusedInput op must be one of {self.OPS}, got {self.op!r}")
        if (self.residual is None) != (self.residual_out is None):
            raise ValueError("FusedInput: residual and residual_out come together")

    def evaluate(self) -> torch.Tensor:
        from loom import ops        # ops imports this module
        fused = ops.active()
        if self.op == "silu_and_mul":
            return fused.silu_and_mul(self.x)
        if self.residual is None:
            return fused.rms_norm(self.x, self.weight, self.eps)
        out, total = fused.add_rms_norm(self.x, self.residual, self.weight, self.eps)
        self.residual_out.copy_(total)
        return out


class QuantMethod:
    """A weight format. Registered through the ``loom_quant_methods`` hook."""

    name: str = ""

    @classmethod
    def matches(cls, quantization_config: dict | None) -> bool:
        """For ``quantization: auto``: does this checkpoint's quantization_config describe us?"""
        return False

    @classmethod
    def from_config(cls, quantization_config: dict | None) -> "QuantMethod":
        """Build from the checkpoint's ``quantization_config`` (None for unquantized ones)."""
        return cls()

    def check_platform(self, platform, dtype: torch.dtype) -> None:
        """Raise ValueError naming the method, the device and what would work, if unsupported."""

    def for_layer(self, prefix: str) -> "QuantMethod":
        """The method used for the linear at ``prefix`` (layers excluded from quantization get
        the unquantized method; per-layer overrides a different one)."""
        return self

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       bias: bool, params_dtype: torch.dtype) -> None:
        """Register the layer's parameters. Each parameter may carry ``output_dim`` (the axis
        along which fused shards are concatenated) and ``packed_factor`` (output rows per element
        along that axis); ``load`` uses them. For tensor parallelism, ``input_dim`` (the axis of
        the checkpoint tensor along the weight's input columns) and ``input_packed_factor``
        (input columns per element there: the packing, or the group size of grouped scales); a
        parameter without ``input_dim`` is the same on every rank of a row-parallel layer."""
        raise NotImplementedError

    def rank_index(self, layer: nn.Module, param_name: str,
                   shard_id: int | None) -> dict[int, slice]:
        """The part of checkpoint tensor ``param_name`` (shard ``shard_id``) that a partitioned
        layer holds, as {axis: slice}; a ValueError when the packing or the groups do not align
        with the layer's part. The default reads ``output_dim``/``packed_factor`` and
        ``input_dim``/``input_packed_factor``."""
        p, param = layer.partition, getattr(layer, param_name)
        parts = {}
        output_dim = getattr(param, "output_dim", None)
        if output_dim is not None and p.output_sizes != tuple(layer.output_sizes):
            shard = shard_id or 0
            parts[output_dim] = _entries(
                f"{param_name} output rows", p.starts()[shard], layer.output_sizes[shard],
                p.output_sizes[shard], getattr(param, "packed_factor", 1))
        input_dim = getattr(param, "input_dim", None)
        if input_dim is not None and p.input_size != layer.input_size:
            parts[input_dim] = _entries(
                f"{param_name} input columns", p.input_start, layer.input_size, p.input_size,
                getattr(param, "input_packed_factor", 1))
        return parts

    def load(self, layer: nn.Module, param_name: str, loaded: torch.Tensor,
             shard_id: int | None) -> None:
        """Copy one checkpoint tensor into ``layer.<param_name>`` (shard ``shard_id`` of a fused
        layer, or the whole parameter when None)."""
        param = getattr(layer, param_name)
        output_dim = getattr(param, "output_dim", None)
        if shard_id is None or output_dim is None:
            if param.shape != loaded.shape:
                raise ValueError(f"{param_name}: checkpoint shape {tuple(loaded.shape)} does not "
                                 f"match the model's {tuple(param.shape)}")
            param.data.copy_(loaded)
            return
        factor = getattr(param, "packed_factor", 1)
        sizes = [s // factor for s in layer.output_sizes]
        offset = sum(sizes[:shard_id])
        target = param.data.narrow(output_dim, offset, sizes[shard_id])
        if target.shape != loaded.shape:
            raise ValueError(f"{param_name} shard {shard_id}: checkpoint shape "
                             f"{tuple(loaded.shape)} does not match the model's {tuple(target.shape)}")
        target.copy_(loaded)

    def process_after_loading(self, layer: nn.Module) -> None:
        """Repack or convert once every tensor of ``layer`` is loaded (e.g. for a fast kernel)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x @ W^T (+ bias) for x [..., input_size] (a QuantizedInput where ``input_quant``
        asked for one, a FusedInput where ``fuses_input`` said yes)."""
        raise NotImplementedError

    def fuses_input(self, layer: nn.Module, op: str, x: torch.Tensor) -> bool:
        """Whether ``apply`` takes a FusedInput of ``op`` (see FusedInput.OPS) over an input
        like x [M, K] (for silu_and_mul [M, 2K]) and applies the op in its own kernel. Decided
        from shapes, dtype and device alone, so a captured graph stays valid. Default: False."""
        return False

    def fuses_output(self, layer: nn.Module, op: str, x) -> bool:
        """Whether ``apply_fused_output`` applies ``op`` to this layer's output in its own kernel
        for an input like x (a tensor, or a FusedInput this method takes). The one op:
        ``"silu_and_mul"``, silu(y[:, :N/2]) * y[:, N/2:] of y = x W^T + b (a fused gate|up
        projection and its activation). Decided from shapes, dtype and device alone, so a
        captured graph stays valid. Default: False."""
        return False

    def apply_fused_output(self, layer: nn.Module, x, bias: torch.Tensor | None,
                           op: str) -> torch.Tensor:
        """op(x @ W^T (+ bias)) where ``fuses_output`` said yes; the reference is ``apply``
        followed by the op (loom.ops), rounded as they round."""
        raise NotImplementedError(f"{type(self).__name__} does not fuse {op!r} into its output")

    def input_quant(self, layer: nn.Module) -> torch.dtype | None:
        """The fp8 dtype this method quantizes x to, one scale per token, before its matmul, when
        the op before the layer (its norm, its activation) should do that in the same kernel
        and hand over a QuantizedInput; None (the default): plain x."""
        return None

    def checkpoint_names(self) -> tuple[str, ...]:
        """Suffixes of the checkpoint tensors of one linear (e.g. weight, qweight, scales)."""
        return ("weight", "bias")

    # The conformance kit's view of the format (API 1.1). The defaults describe the dense
    # layout of the default checkpoint_names(); a method with its own layout overrides them.
    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """This format's checkpoint tensors for one float weight [out, in] (one shard of a fused
        layer), by checkpoint name: what an offline quantizer writes (round-to-nearest is
        enough). The kit loads them through ``load`` and ``process_after_loading``."""
        if type(self).checkpoint_names is not QuantMethod.checkpoint_names:
            raise NotImplementedError(f"quant method {self.name!r} does not implement quantize()")
        return {"weight": weight}

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The float weight [out, in] that ``apply`` multiplies by, once loaded and processed.
        Optional: without it the kit compares ``apply`` with the weight it quantized, at
        quantization-error tolerance, instead of with the exact dequantized matmul."""
        weight = getattr(layer, "weight", None)
        if (type(self).checkpoint_names is QuantMethod.checkpoint_names
                and isinstance(weight, torch.Tensor) and weight.dtype in _DENSE_DTYPES
                and tuple(weight.shape) == (layer.output_size, layer.input_size)):
            return weight
        raise NotImplementedError(f"quant method {self.name!r} does not implement dequantize()")


_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _entries(what: str, start: int, size: int, full: int, factor: int) -> slice:
    """Elements [start, start + size) of an axis holding ``factor`` of them per entry."""
    if start % factor or (size % factor and start + size != full):
        raise ValueError(f"{what} [{start}, {start + size}) do not align with its {factor} per "
                         f"stored element")
    return slice(start // factor, -(-(start + size) // factor))
