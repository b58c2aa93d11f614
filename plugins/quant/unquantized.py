"""The unquantized method: a plain dense weight [out, in] in the model dtype."""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from loom.hookspecs import hookimpl
from loom.quant import QuantMethod


class Unquantized(QuantMethod):
    name = "none"
    gemv_on_cpu = False  # tests: take the GEMV path on the CPU too (needs TRITON_INTERPRET=1)

    @classmethod
    def matches(cls, quantization_config):
        return not quantization_config

    def create_weights(self, layer, input_size, output_sizes, bias, params_dtype):
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype),
                              requires_grad=False)
        weight.output_dim, weight.input_dim = 0, 1
        layer.register_parameter("weight", weight)
        if bias:
            b = nn.Parameter(torch.zeros(sum(output_sizes), dtype=params_dtype), requires_grad=False)
            b.output_dim = 0
            layer.register_parameter("bias", b)
        else:
            layer.register_parameter("bias", None)

    def apply(self, layer, x, bias):
        """A Triton GEMV for a few rows of x (decode), where cuBLAS streams W below bandwidth."""
        if x.is_cuda or self.gemv_on_cpu:
            kernels = _gemv_kernels()
            if kernels is not None and kernels.gemv_preferred(x, layer.weight):
                return kernels.gemv(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)


@functools.cache
def _gemv_kernels():
    """The GEMV module, imported on first use; None without triton (an optional dependency)."""
    if importlib.util.find_spec("triton") is None:
        return None
    from loom.plugins.quant.triton import gemv
    return gemv


@hookimpl
def loom_quant_methods():
    return [Unquantized]
