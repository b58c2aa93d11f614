"""The unquantized method: a plain dense weight [out, in] in the model dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.hookspecs import hookimpl
from loom.quant import QuantMethod


class Unquantized(QuantMethod):
    name = "none"

    @classmethod
    def matches(cls, quantization_config):
        return not quantization_config

    def create_weights(self, layer, input_size, output_sizes, bias, params_dtype):
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype),
                              requires_grad=False)
        weight.output_dim = 0
        layer.register_parameter("weight", weight)
        if bias:
            b = nn.Parameter(torch.zeros(sum(output_sizes), dtype=params_dtype), requires_grad=False)
            b.output_dim = 0
            layer.register_parameter("bias", b)
        else:
            layer.register_parameter("bias", None)

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)


@hookimpl
def loom_quant_methods():
    return [Unquantized]
