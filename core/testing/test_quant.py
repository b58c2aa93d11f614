"""Conformance of a quant method (--loom-quant NAME) on its own checkpoint layout against
dequantize-then-matmul (see loom.testing.quant_cases)."""
from __future__ import annotations

import pytest
import torch

from loom.testing.quant_cases import (OUTPUT_SIZES, PREFIXES, ROWS, TOLERANCE, WEIGHT_TOLERANCE,
                                      build_linear, load_quantized, quantize, random_input,
                                      random_shards, reference_weight, rel_err)


@pytest.fixture
def method(loom_quant, loom_quant_config):
    """An instance from --loom-quant-config (none: an unquantized checkpoint)."""
    try:
        return loom_quant.from_config(loom_quant_config)
    except Exception as exc:  # noqa: BLE001 - the kit reports what to pass instead
        pytest.fail(f"{loom_quant.name}.from_config({loom_quant_config!r}) failed: {exc!r}; "
                    f"give the checkpoint's quantization_config with --loom-quant-config JSON",
                    pytrace=False)


def checked_dtypes(method, kit, platform) -> list[torch.dtype]:
    """The selected dtypes the platform supports and ``check_platform`` accepts."""
    accepted = []
    for dtype in kit.dtypes(kit.platform.supported_dtypes):
        try:
            method.check_platform(platform, dtype)
        except ValueError:
            continue
        accepted.append(dtype)
    return accepted


def test_declares_itself(loom_quant, method, loom_quant_config):
    assert isinstance(loom_quant.name, str) and loom_quant.name
    names = method.checkpoint_names()
    assert names and all(isinstance(n, str) for n in names), f"checkpoint_names(): {names}"
    assert isinstance(loom_quant.matches(loom_quant_config), bool)
    if loom_quant_config:
        assert loom_quant.matches(loom_quant_config), (
            f"{loom_quant.name}.matches() refuses the quantization_config it is built from: "
            f"`quantization: auto` would not find it")
    elif loom_quant.name != "none":
        assert not loom_quant.matches(None), (
            f"{loom_quant.name}.matches(None) is true: `quantization: auto` on an unquantized "
            f"checkpoint would be ambiguous with 'none'")


def test_check_platform_accepts_a_dtype(method, loom_kit, loom_platform):
    if not checked_dtypes(method, loom_kit, loom_platform):
        pytest.fail(f"check_platform refuses every selected dtype on {loom_platform.name}",
                    pytrace=False)


def layer_method(method, platform, dtype, layer: str):
    """The method a model's linear gets, as the engine and the model ask for it."""
    method.check_platform(platform, dtype)
    return method.for_layer(PREFIXES[layer])


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("layer", OUTPUT_SIZES, ids=OUTPUT_SIZES.keys())
def test_apply_matches_dequantized_matmul(method, loom_kit, loom_platform, loom_device, layer,
                                          bias):
    """Every selected dtype, decode-sized and prefill-sized inputs."""
    shards = OUTPUT_SIZES[layer]
    for dtype in checked_dtypes(method, loom_kit, loom_platform):
        lm = layer_method(method, loom_platform, dtype, layer)
        linear = build_linear(lm, shards, bias, dtype, loom_device)
        weights, biases = random_shards(shards, bias, loom_device)
        load_quantized(linear, lm, weights, biases, dtype)
        full = torch.cat(weights)
        dequantized = reference_weight(lm, linear)
        if dequantized is not None:
            assert tuple(dequantized.shape) == tuple(full.shape), (
                f"dequantize() returned {tuple(dequantized.shape)}, expected [out, in] "
                f"{tuple(full.shape)}")
            err = rel_err(dequantized, full)
            assert err < WEIGHT_TOLERANCE, (
                f"{dtype}: the dequantized weight is off the weight quantize() was given by "
                f"{err:.3g}: quantize, load or dequantize disagree on the layout")
        for what, rows in ROWS.items():
            x = random_input(rows, dtype, loom_device)
            y = lm.apply(linear, x, linear.bias)
            expected = (rows, sum(shards))
            assert tuple(y.shape) == expected and y.dtype == dtype, (
                f"apply returned {tuple(y.shape)} {y.dtype}, expected {expected} {dtype}")
            b = torch.cat(biases).float() if bias else 0
            if dequantized is not None:
                ref, tol = x.float() @ dequantized.T + b, TOLERANCE[dtype]
            else:
                ref, tol = x.float() @ full.T + b, WEIGHT_TOLERANCE
            err = rel_err(y, ref)
            assert err < tol, (f"{dtype}, {what} input ({rows} rows): apply is off x @ W^T "
                               f"by {err:.3g} (tolerance {tol:g})")


def test_load_refuses_a_wrongly_shaped_tensor(method, loom_kit, loom_platform, loom_device):
    dtypes = checked_dtypes(method, loom_kit, loom_platform)
    if not dtypes:
        pytest.skip("no dtype to check")
    lm = layer_method(method, loom_platform, dtypes[0], "fused")
    linear = build_linear(lm, OUTPUT_SIZES["fused"], False, dtypes[0], loom_device)
    weights, _ = random_shards([128], False, loom_device)     # shard 0 is 256 rows
    name, tensor = next(iter(quantize(lm, weights[0]).items()))
    with pytest.raises(ValueError):
        linear.load(name, tensor, 0)
