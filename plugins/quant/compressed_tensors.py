"""compressed-tensors checkpoints (``quant_method: compressed-tensors``, written by
llm-compressor): int8 W8A8 (int-quantized: per-channel or per-tensor weights; activations dynamic
per token, or static per tensor with an optional zero point), weight-only W4A16/W8A16
(pack-quantized: grouped or per-channel, symmetric or with zero points, optional g_idx) and FP8
(float-quantized: tensor, channel or block weights; static, per-token, per-group or no activation
quantization). Each ``config_groups`` entry targets layers by module name, ``re:`` regular
expression or class (Linear); ``ignore`` (names or ``re:`` patterns) stays unquantized."""
from __future__ import annotations

import re

import torch

from loom.hookspecs import hookimpl
from loom.plugins.quant.schemes.base import (Dense, check_kernels, checkpoint_config,
                                             same_for_all_parts)
from loom.plugins.quant.schemes.fp8 import Fp8Scheme
from loom.plugins.quant.schemes.int8 import Int8W8A8
from loom.plugins.quant.schemes.wna16 import PackQuantizedLayout
from loom.quant import QuantMethod

LAYER_CLASSES = ("Linear",)


def matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def describe(weights: dict, acts: dict | None, fmt: str) -> str:
    a = "none" if acts is None else (
        f"{acts.get('type')}{acts.get('num_bits')} {acts.get('strategy')}")
    return (f"format {fmt!r}, weights {weights.get('type')}{weights.get('num_bits')} "
            f"{weights.get('strategy')}, activations {a}")


class CompressedTensors(QuantMethod):
    name = "compressed-tensors"

    def __init__(self, config: dict):
        self.format = config.get("format")
        self.groups = config.get("config_groups") or {}
        self.ignore = list(config.get("ignore") or [])
        self.fp8_dtype = torch.float8_e4m3fn
        if config.get("kv_cache_scheme"):
            raise ValueError("compressed-tensors: kv_cache_scheme is not supported")
        if config.get("sparsity_config"):
            raise ValueError("compressed-tensors: sparse checkpoints are not supported")
        if config.get("quantization_status", "compressed") != "compressed":
            raise ValueError(f"compressed-tensors: quantization_status "
                             f"{config['quantization_status']!r} is not supported (compressed)")
        self.schemes = {name: self.scheme(group) for name, group in self.groups.items()}

    @classmethod
    def matches(cls, quantization_config):
        return (bool(quantization_config)
                and quantization_config.get("quant_method") == "compressed-tensors")

    @classmethod
    def from_config(cls, quantization_config):
        return cls(checkpoint_config(cls, quantization_config))

    def check_platform(self, platform, dtype):
        for scheme in self.schemes.values():
            if isinstance(scheme, Fp8Scheme):
                check_kernels(self.name, platform, "fp8 block" if scheme.block else "fp8")
                scheme.fp8_dtype = platform.fp8_dtype or scheme.fp8_dtype
            elif isinstance(scheme, Int8W8A8):
                check_kernels(self.name, platform, "int8 W8A8")
            else:
                check_kernels(self.name, platform, "int4/int8 weight-only")

    def for_layer(self, prefix):
        group = same_for_all_parts(prefix, self.group_of)
        return Dense() if group is None else self.schemes[group]

    def group_of(self, name: str) -> str | None:
        """The config group quantizing a checkpoint module (a name or regex target before a
        class target), None if it is ignored or targeted by none."""
        if any(matches(t, name) for t in self.ignore):
            return None
        for by_class in (False, True):
            for group_name, group in self.groups.items():
                for target in group.get("targets", []):
                    is_class = target in LAYER_CLASSES
                    if is_class == by_class and (is_class or matches(target, name)):
                        return group_name
        return None

    def scheme(self, group: dict):
        weights, acts = group.get("weights"), group.get("input_activations")
        fmt = group.get("format") or self.format
        if weights is None:
            raise ValueError("compressed-tensors: activation-only quantization is not supported")
        if weights.get("type") == "int" and acts is None and fmt == "pack-quantized":
            return self.weight_only(weights)
        if (weights.get("type") == "int" and acts and acts.get("type") == "int"
                and weights.get("num_bits") == acts.get("num_bits") == 8
                and weights.get("symmetric", True) and fmt in ("int-quantized", "naive-quantized")):
            return Int8W8A8(weights.get("strategy"), static=not acts.get("dynamic"),
                            symmetric=acts.get("symmetric", True))
        if (weights.get("type") == "float" and weights.get("num_bits") == 8
                and fmt in ("float-quantized", "naive-quantized")):
            return self.fp8(weights, acts)
        raise ValueError(f"compressed-tensors: unsupported scheme ({describe(weights, acts, fmt)})")

    def weight_only(self, weights: dict) -> PackQuantizedLayout:
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise ValueError(f"compressed-tensors: pack-quantized {strategy!r} weights are not "
                             "supported (group, channel)")
        group_size = weights["group_size"] if strategy == "group" else -1
        return PackQuantizedLayout(weights["num_bits"], group_size,
                                   symmetric=weights.get("symmetric", True),
                                   has_g_idx=weights.get("actorder") in ("group", "dynamic"))

    def fp8(self, weights: dict, acts: dict | None) -> Fp8Scheme:
        strategy = weights.get("strategy")
        block = tuple(weights["block_structure"]) if strategy == "block" else None
        if acts is None:
            act = None
        elif not acts.get("dynamic"):
            act = "static"
        else:
            act = {"token": "token", "group": "group"}.get(acts.get("strategy"))
            if act == "group" and (block is None or acts.get("group_size") != block[1]):
                raise ValueError("compressed-tensors: fp8 per-group activations need block "
                                 "weights with the same K block")
        if act is None and acts is not None:
            raise ValueError(f"compressed-tensors: fp8 activations {acts.get('strategy')!r} are "
                             "not supported (tensor, token, group)")
        return Fp8Scheme(strategy, act, block, "weight_scale", self.fp8_dtype)


@hookimpl
def loom_quant_methods():
    return [CompressedTensors]
