"""What every scheme shares: parameters that know how the shards of a fused layer load, the
names a fused layer has in a checkpoint, platform checks, and the dense scheme for the layers a
checkpoint leaves unquantized."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.llama import STACKED_PARAMS
from loom.quant import QuantMethod

_PARTS: dict[str, list[str]] = {}
for _fused, _part, _ in STACKED_PARAMS:
    _PARTS.setdefault(_fused, []).append(_part)


def checkpoint_modules(prefix: str) -> list[str]:
    """The checkpoint's modules of a layer: model.layers.0.self_attn.qkv_proj ->
    [...q_proj, ...k_proj, ...v_proj]; an unfused layer is its own."""
    parent, _, last = prefix.rpartition(".")
    return [f"{parent}.{part}" for part in _PARTS.get(last, [])] or [prefix]


def same_for_all_parts(prefix: str, choose):
    """``choose(name)`` for each checkpoint module of the layer, which must all agree: a fused
    layer has one format."""
    names = checkpoint_modules(prefix)
    values = [choose(name) for name in names]
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"{prefix}: loom fuses {', '.join(names)} into one layer, but the "
                         f"checkpoint quantizes them differently ({values})")
    return values[0]


def checkpoint_config(method: type[QuantMethod], config: dict | None,
                      optional: bool = False) -> dict | None:
    """The quantization_config a method (named, or found by ``auto``) is built from: one it
    matches; None only where ``optional`` (a method that quantizes while loading)."""
    if not config:
        if optional:
            return None
        raise ValueError(f"quantization {method.name!r} needs a checkpoint quantized with it "
                         f"(a quantization_config that it matches)")
    if not method.matches(config):
        raise ValueError(f"quantization {method.name!r} cannot load this checkpoint: it is "
                         f"quantized with quant_method {config.get('quant_method')!r}; use 'auto'")
    return config


def check_kernels(method: str, platform, kind: str) -> None:
    """Raise if ``platform`` cannot run ``kind`` ("int4/int8 weight-only", "fp8", "fp8 block",
    "int8 W8A8") layers: the message names the method, the device and what would work."""
    device = platform.describe()
    if platform.device_type == "cpu":
        return
    if platform.device_type != "cuda":
        raise ValueError(f"quantization {method!r}: no {kind} kernel for {device}; it runs on the "
                         "cpu platform (dequantize-then-matmul) and on cuda/rocm")
    if kind.startswith("fp8") and platform.fp8_dtype is None:
        raise ValueError(
            f"quantization {method!r}: {device} has no fp8 matmul (NVIDIA needs compute "
            "capability 8.9+: Ada, Hopper, Blackwell; AMD needs MI300+); on this GPU use a "
            "weight-only int4/int8 checkpoint (gptq, awq, auto-round, compressed-tensors "
            "W4A16/W8A16), an int8 W8A8 one, or the unquantized model")
    triton_kernel = kind in ("int4/int8 weight-only", "fp8 block")
    if triton_kernel and importlib.util.find_spec("triton") is None:
        raise ValueError(f"quantization {method!r}: the {kind} GEMM on {device} is a Triton kernel "
                         "and triton is not installed; pip install 'loom[triton]', or run on the "
                         "cpu platform")


class CheckpointMethod(QuantMethod):
    """A method for checkpoints whose quantization_config names one of ``quant_methods``; its
    layers need ``kernel_kind`` kernels (see check_kernels)."""
    quant_methods: tuple[str, ...] = ()
    kernel_kind = "int4/int8 weight-only"

    @classmethod
    def matches(cls, quantization_config):
        return (bool(quantization_config)
                and quantization_config.get("quant_method") in cls.quant_methods)

    @classmethod
    def from_config(cls, quantization_config):
        return cls(checkpoint_config(cls, quantization_config))

    def check_platform(self, platform, dtype):
        check_kernels(self.name, platform, self.kernel_kind)


class Scheme(QuantMethod):
    """A QuantMethod for one layer. Parameters carry ``output_dim`` with ``shard_sizes`` (rows of
    each fused shard along it: output size / ``packed_factor``, rounded up with ``ceil`` for
    block scales, where a 64-row shard has one 128-row block), and ``input_dim`` with
    ``input_packed_factor`` where a row-parallel rank takes a slice of them; ``per_shard`` ones
    hold one row per shard (per-tensor scales, g_idx), which ``load`` fills from 0-d, [1] or
    [1, 1] tensors."""

    def new_param(self, layer: nn.Module, name: str, shape, dtype: torch.dtype,
                  output_dim: int | None = None, packed_factor: int = 1,
                  ceil: bool = False, input_dim: int | None = None,
                  input_packed_factor: int = 1) -> nn.Parameter:
        param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
        if output_dim is not None:
            param.output_dim = output_dim
            param.packed_factor = packed_factor
            param.shard_sizes = [-(-s // packed_factor) if ceil else s // packed_factor
                                 for s in layer.output_sizes]
        if input_dim is not None:
            param.input_dim, param.input_packed_factor = input_dim, input_packed_factor
        layer.register_parameter(name, param)
        return param

    def per_shard_param(self, layer: nn.Module, name: str, shape, dtype: torch.dtype,
                        parameter: bool = True, input_dim: int | None = None) -> torch.Tensor:
        """One row per shard; ``parameter=False`` makes it an optional buffer (a tensor some
        checkpoints have), filled with -1 until loaded. ``input_dim``: the axis of the row
        (of the checkpoint tensor) along the input columns (g_idx)."""
        shape = (len(layer.output_sizes), *shape)
        if parameter:
            tensor = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, tensor)
        else:
            tensor = torch.full(shape, -1, dtype=dtype)
            layer.register_buffer(name, tensor, persistent=False)
        tensor.per_shard = True
        if input_dim is not None:
            tensor.input_dim = input_dim
        return tensor

    def add_bias(self, layer: nn.Module, bias: bool, params_dtype: torch.dtype) -> None:
        if bias:
            self.new_param(layer, "bias", (layer.output_size,), params_dtype, output_dim=0)
        else:
            layer.register_parameter("bias", None)

    def load(self, layer, param_name, loaded, shard_id):
        param = getattr(layer, param_name)
        if getattr(param, "per_shard", False):
            row = param.data[shard_id or 0]
            if row.numel() != loaded.numel():
                raise ValueError(f"{param_name} shard {shard_id}: checkpoint shape "
                                 f"{tuple(loaded.shape)}, expected {tuple(row.shape)}")
            row.copy_(loaded.reshape(row.shape))
            return
        sizes = getattr(param, "shard_sizes", None)
        if shard_id is None or sizes is None:
            return super().load(layer, param_name, loaded, shard_id)
        target = param.data.narrow(param.output_dim, sum(sizes[:shard_id]), sizes[shard_id])
        if target.shape != loaded.shape:
            raise ValueError(f"{param_name} shard {shard_id}: checkpoint shape "
                             f"{tuple(loaded.shape)} does not match the model's "
                             f"{tuple(target.shape)}")
        target.copy_(loaded)

    def replace(self, layer: nn.Module, **tensors: torch.Tensor | None) -> None:
        """Drop the checkpoint's parameters for the tensors derived from them (buffers)."""
        for name in list(layer._parameters):
            if name != "bias":
                delattr(layer, name)
        for name in [n for n in layer._buffers if getattr(layer._buffers[n], "per_shard", False)]:
            delattr(layer, name)
        for name, tensor in tensors.items():
            layer.register_buffer(name, tensor, persistent=False)


class Dense(Scheme):
    """A layer the checkpoint leaves unquantized: a plain weight [out, in]."""

    name = "dense"

    def create_weights(self, layer, input_size, output_sizes, bias, params_dtype):
        self.new_param(layer, "weight", (sum(output_sizes), input_size), params_dtype, output_dim=0,
                       input_dim=1)
        self.add_bias(layer, bias, params_dtype)

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)
