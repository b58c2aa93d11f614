"""The quantized GEMMs (loom.plugins.quant.triton) against dequantize-then-matmul, on a GPU when
there is one, else through triton's interpreter on the CPU (TRITON_INTERPRET=1, set before the
kernels are defined). Fresh random inputs every run (LOOM_TEST_SEED replays one), odd shapes,
g_idx, split K; and each layout's repacked checkpoint tensors through the kernel against the
scheme's CPU twin."""
import os
import random

import pytest
import torch

from triton_interpreter import DEVICE, interpreter_bf16_dot  # noqa: F401

from loom.models.layers import Linear  # noqa: E402
from loom.plugins.quant.schemes.fp8 import Fp8Scheme, quantize_act  # noqa: E402
from loom.plugins.quant.schemes.wna16 import (AWQ_ORDER, AWQLayout, GPTQLayout,  # noqa: E402
                                              PackQuantizedLayout, dequantize, pack_cols,
                                              pack_rows)
from loom.plugins.quant.triton.fp8_block import Fp8BlockConfig, fp8_block_gemm  # noqa: E402
from loom.plugins.quant.triton.wna16 import WNA16Config, wna16_gemm  # noqa: E402

SEED = int(os.environ.get("LOOM_TEST_SEED", random.randrange(2**31)))
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
SMALL = WNA16Config(16, 32, 32, 4, 2)   # small tiles: several programs even on small shapes


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(SEED + hash(request.node.name) % 1000)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    error = ((out.float().cpu() - ref.float().cpu()).norm() / ref.float().norm()).item()
    return error < TOLERANCE[dtype]


def int_weights(k: int, n: int, bits: int, group_size: int, with_g_idx: bool, dtype, gen):
    """Random weights in the canonical layout: (w_q [N, K/pf], scales, zeros [N, G], g_idx)."""
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).to(dtype)
    zeros = torch.randint(0, 2**bits, (n, groups), generator=gen).to(dtype)
    g_idx = None
    if with_g_idx:
        g_idx = (torch.randperm(k, generator=gen) % groups).to(torch.int32)
    return pack_cols(codes, bits), scales, zeros, g_idx


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("with_g_idx", [False, True])
@pytest.mark.parametrize("m,n,k,group_size,split_k", [
    (1, 72, 256, 32, 1), (3, 104, 192, 64, 3), (5, 40, 128, 128, 2), (17, 24, 256, -1, 1),
    (2, 136, 320, 32, 4)])
def test_wna16_gemm(bits, with_g_idx, m, n, k, group_size, split_k, gen):
    w_q, scales, zeros, g_idx = int_weights(k, n, bits, group_size, with_g_idx, torch.float32, gen)
    x = torch.randn(m, k, generator=gen)
    gs = k if group_size == -1 else group_size
    ref = x @ dequantize(w_q, scales, zeros, g_idx, bits, gs).t()
    out = wna16_gemm(*on_device(x, w_q, scales, zeros, g_idx), bits, gs, config=SMALL,
                     split_k=split_k)
    assert out.shape == (m, n) and close(out, ref, torch.float32), SEED


@pytest.mark.parametrize("bits", [4, 8])
def test_wna16_gemm_reads_x_through_a_perm(bits, gen):
    w_q, scales, zeros, _ = int_weights(256, 40, bits, 64, False, torch.float32, gen)
    perm = torch.randperm(256, generator=gen).to(torch.int32)
    x = torch.randn(3, 256, generator=gen)
    ref = x[:, perm.long()] @ dequantize(w_q, scales, zeros, None, bits, 64).t()
    out = wna16_gemm(*on_device(x, w_q, scales, zeros), None, bits, 64,
                     perm=on_device(perm)[0], config=SMALL, split_k=2)
    assert close(out, ref, torch.float32), SEED


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 70])
def test_wna16_gemm_half_dtypes_and_default_configs(dtype, m, gen):
    w_q, scales, zeros, g_idx = int_weights(256, 88, 4, 64, m == 7, dtype, gen)
    x = torch.randn(m, 256, generator=gen).to(dtype)
    ref = x.float() @ dequantize(w_q, scales, zeros, g_idx, 4, 64).float().t()
    out = wna16_gemm(*on_device(x, w_q, scales, zeros, g_idx), 4, 64)
    assert out.dtype == dtype and close(out, ref, dtype), SEED


def test_wna16_gemm_rejects_a_group_smaller_than_the_k_step(gen):
    w_q, scales, zeros, _ = int_weights(128, 16, 4, 32, False, torch.float32, gen)
    with pytest.raises(ValueError, match="group size 48"):
        wna16_gemm(*on_device(torch.randn(2, 128), w_q, scales, zeros), None, 4, 48,
                   config=WNA16Config(16, 32, 32))


def fp8_operands(m: int, n: int, k: int, block: int, gen):
    fp8 = torch.float8_e4m3fn
    kb = -(-k // block)
    a = (torch.randn(m, k, generator=gen) * 50).to(fp8)
    b = (torch.randn(n, k, generator=gen) * 50).to(fp8)
    a_scale = torch.rand(m, kb, generator=gen) + 0.01
    b_scale = torch.rand(n, kb, generator=gen) + 0.01
    ref = ((a.float() * a_scale.repeat_interleave(block, 1)[:, :k])
           @ (b.float() * b_scale.repeat_interleave(block, 1)[:, :k]).T)
    return a, a_scale, b, b_scale, ref


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,split_k", [(1, 100, 256, 1), (5, 72, 200, 2), (33, 40, 384, 3)])
def test_fp8_block_gemm(out_dtype, m, n, k, split_k, gen):
    a, a_scale, b, b_scale, ref = fp8_operands(m, n, k, 128, gen)
    out = fp8_block_gemm(*on_device(a, a_scale, b, b_scale), 128, out_dtype,
                         config=Fp8BlockConfig(16, 32, 64, 4, 2), split_k=split_k)
    assert out.dtype == out_dtype and close(out, ref, out_dtype), SEED


def test_fp8_block_gemm_default_config(gen):
    a, a_scale, b, b_scale, ref = fp8_operands(3, 136, 256, 128, gen)
    assert close(fp8_block_gemm(*on_device(a, a_scale, b, b_scale), 128, torch.float32),
                 ref, torch.float32), SEED


# ---- checkpoint layouts through the kernel, against the schemes' CPU twin --------------------
def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """codes [R, C] -> int32 [R, C/8], column c of each 8 in nibble AWQ_ORDER[c]."""
    words = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
    for c, nibble in enumerate(AWQ_ORDER):
        words |= codes[:, c::8].to(torch.int64) << (4 * nibble)
    return (words - (words >= 2**31) * 2**32).to(torch.int32)


def layer_with(scheme, k: int, sizes: list[int], tensors: dict, shard_tensors: dict = ()):
    layer = Linear(k, sizes, False, scheme, torch.float32)
    for name, tensor in tensors.items():
        layer.load(name, tensor, None)
    for name, per_shard in dict(shard_tensors).items():
        for shard, tensor in enumerate(per_shard):
            layer.load(name, tensor, shard)
    scheme.process_after_loading(layer)
    return layer


def layouts(gen):
    """(name, layer, reference weight [K, N]) for each layout, made from the same random codes,
    fused [40, 24, 24] over K = 128."""
    k, sizes, n, bits, gs = 128, [40, 24, 24], 88, 4, 32
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // gs, n), generator=gen, dtype=torch.int32)
    scales = torch.rand(k // gs, n, generator=gen) * 0.02 + 0.001
    g_idx = (torch.randperm(k, generator=gen) % (k // gs)).to(torch.int32)
    weight = (codes - zeros[torch.arange(k) // gs]) * scales[torch.arange(k) // gs]
    yield "gptq", layer_with(GPTQLayout(bits, gs, v1=False, desc_act=True), k, sizes, {
        "qweight": pack_rows(codes, bits), "qzeros": pack_rows(zeros.t(), bits).t(),
        "scales": scales}, {"g_idx": [g_idx] * 3}), (codes - zeros[g_idx]) * scales[g_idx]
    yield "awq", layer_with(AWQLayout(bits, gs), k, sizes, {
        "qweight": awq_pack(codes), "qzeros": awq_pack(zeros), "scales": scales}), weight
    pack_quantized = PackQuantizedLayout(bits, gs, symmetric=False, has_g_idx=False)
    yield "pack-quantized", layer_with(pack_quantized, k, sizes, {
        "weight_packed": pack_rows(codes, bits).t().contiguous(),
        "weight_scale": scales.t().contiguous(),
        "weight_zero_point": pack_rows(zeros.t().contiguous(), bits)},
        {"weight_shape": [torch.tensor([s, k]) for s in sizes]}), weight


@pytest.mark.parametrize("m", [1, 5])
def test_layouts_through_the_kernel(m, gen):
    x = torch.randn(m, 128, generator=gen)
    for name, layer, weight in layouts(gen):
        twin = layer.quant_method.apply(layer, x, None)
        assert close(twin, x @ weight, torch.float32), (name, SEED)
        out = wna16_gemm(*on_device(x, layer.w_q, layer.w_scales, layer.w_zeros, layer.w_g_idx),
                         4, layer.group_size, perm=on_device(layer.w_perm)[0], config=SMALL)
        assert close(out, twin, torch.float32), (name, SEED)


@pytest.mark.parametrize("m", [1, 6])
def test_fp8_block_scheme_through_the_kernel(m, gen):
    """A fused fp8 block layer whose shards (40, 24, 24 rows) are not multiples of the
    128-row block: the kernel on the scheme's tensors against its CPU twin."""
    scheme = Fp8Scheme("block", "group", (128, 128), "weight_scale_inv")
    sizes, k = [40, 24, 24], 200
    layer = Linear(k, sizes, False, scheme, torch.float32)
    for shard, rows in enumerate(sizes):
        layer.load("weight", (torch.randn(rows, k, generator=gen) * 100).to(torch.float8_e4m3fn),
                   shard)
        layer.load("weight_scale_inv", torch.rand(1, 2, generator=gen) * 0.01, shard)
    scheme.process_after_loading(layer)
    x = torch.randn(m, k, generator=gen)
    twin = scheme.apply(layer, x, None)
    xq, x_scale = quantize_act(x, "group", torch.float8_e4m3fn)
    out = fp8_block_gemm(*on_device(xq, x_scale, layer.w_fp8, layer.w_block_scale), 128,
                         torch.float32, config=Fp8BlockConfig(16, 32, 64, 4, 2))
    assert close(out, twin, torch.float32), SEED
