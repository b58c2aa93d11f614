"""The W4A16/W8A16 GEMV (loom.plugins.quant.triton.wna16_gemv) against dequantize-then-matmul, and
the scheme's choice of it: on a GPU when there is one, else through triton's interpreter on the CPU
(TRITON_INTERPRET=1, set before the kernels are defined). Fresh random inputs every run
(LOOM_TEST_SEED replays one)."""
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from triton_interpreter import DEVICE, interpreter_bf16_dot  # noqa: F401

from loom.models.layers import Linear  # noqa: E402
from loom.plugins.quant.schemes.wna16 import (GPTQLayout, WNA16Scheme, act_order_perm,  # noqa: E402
                                              dequantize, pack_cols, pack_rows)
from loom.plugins.quant.triton import wna16_gemv as gemv_module  # noqa: E402
from loom.plugins.quant.triton.wna16_gemv import (MAX_M, WNA16GemvConfig,  # noqa: E402
                                                  gemv_supported, wna16_gemv)

SEED = int(os.environ.get("LOOM_TEST_SEED", random.randrange(2**31)))
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SMALL = WNA16GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=2)  # dots of 16 int4


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(SEED + hash(request.node.name) % 1000)


def operands(m, n, k, bits, group_size, symmetric, with_perm, with_bias, dtype, gen, x_gain=1.0):
    """(x, w_q [N, K/pf], scales, zeros [N, G], perm, bias) and the float32 reference y."""
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).to(dtype)
    if symmetric:
        zeros = torch.full((n, groups), 2.0 ** (bits - 1), dtype=dtype)
    else:
        zeros = torch.randint(0, 2**bits, (n, groups), generator=gen).to(dtype)
    x = (torch.randn(m, k, generator=gen) * x_gain).to(dtype)
    perm = torch.randperm(k, generator=gen).to(torch.int32) if with_perm else None
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    w_q = pack_cols(codes, bits)
    w = dequantize(w_q, scales.float(), zeros.float(), None, bits, k // groups)
    xs = x.float() if perm is None else x.float()[:, perm.long()]
    ref = xs @ w.t() + (0 if bias is None else bias.float())
    return (x, w_q, scales, zeros, perm, bias), ref


def run(m, n, k, bits, group_size, symmetric=False, with_perm=False, with_bias=False,
        dtype=torch.float32, config=SMALL, gen=None, x_gain=1.0):
    (x, w_q, scales, zeros, perm, bias), ref = operands(
        m, n, k, bits, group_size, symmetric, with_perm, with_bias, dtype, gen, x_gain)
    on = [None if t is None else t.to(DEVICE) for t in (x, w_q, scales, zeros, perm, bias)]
    out = wna16_gemv(*on[:5], bits, k if group_size == -1 else group_size, bias=on[5],
                     config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    error = ((out.float().cpu() - ref).norm() / ref.norm()).item()
    assert error < TOLERANCE[dtype], (error, SEED)


# bits x group size, each with its own rows of x, symmetry and perm; splits of 1 to 4
@pytest.mark.parametrize("bits,group_size,m,symmetric,with_perm,split_k", [
    (4, 32, 1, False, False, 2), (4, 64, 3, True, True, 0), (4, 128, 1, False, True, 3),
    (4, -1, 6, False, False, 1), (8, 32, 2, False, True, 4), (8, 64, 1, True, False, 0),
    (8, 128, 8, True, False, 2), (8, -1, 1, False, True, 2)])
def test_bits_groups_symmetry_perm(bits, group_size, m, symmetric, with_perm, split_k, gen):
    config = WNA16GemvConfig(16, 16 * 32 // bits, 4, 2, split_k=split_k)   # the smallest dots
    run(m, 40, 512, bits, group_size, symmetric, with_perm, m % 2 == 1, config=config, gen=gen)


@pytest.mark.parametrize("m", [*range(1, 9), MAX_M])
def test_rows(m, gen):
    run(m, 24, 128, 4, 32, with_bias=True, gen=gen)


@pytest.mark.parametrize("n,k,bits,group_size", [
    (33, 200, 4, -1), (27, 104, 8, 8), (100, 136, 8, -1), (41, 96, 4, 32)])
def test_odd_shapes(n, k, bits, group_size, gen):
    """N and K not multiples of the blocks (bounds masks on), K a multiple of the packing."""
    for m in (1, 5):
        run(m, n, k, bits, group_size, with_perm=m == 5, gen=gen)


@pytest.mark.parametrize("config", [WNA16GemvConfig(32, 128, 4, 3), WNA16GemvConfig(16, 32, 2, 1),
                                    WNA16GemvConfig(64, 256, 8, 4, split_k=1)])
def test_configs(config, gen):
    """A step longer than a group (scales per word), as long, shorter (scales per step); rows
    of x that need dots only where the step makes int4 dots of 16 inputs."""
    for m in (1, 4) if config.block_k >= 128 else (1,):
        run(m, 64, 512, 4, 128, gen=gen, config=config)


def test_configs_too_small_for_dots_are_refused(gen):
    """Dots of fewer than 16 inputs compile in the interpreter, not for the GPU."""
    with pytest.raises(ValueError, match="block_k >= 128"):
        run(4, 64, 512, 4, 128, gen=gen, config=WNA16GemvConfig(16, 64, 4, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 7])
def test_half_dtypes_and_default_config(dtype, m, gen):
    run(m, 96, 512, 4, 128, with_perm=m == 7, with_bias=True, dtype=dtype, config=None, gen=gen)


@pytest.mark.parametrize("dtype,group_size,with_perm,n,k,x_gain", [
    (torch.bfloat16, 128, False, 64, 512, 1.0), (torch.bfloat16, 32, True, 33, 224, 3e3),
    (torch.float16, -1, False, 40, 256, 1e-4), (torch.float16, 64, True, 48, 384, 1e3)])
def test_int4_one_row_half_x(dtype, group_size, with_perm, n, k, x_gain, gen):
    """One row of bf16/fp16 x over int4: on a GPU the PTX path (fp16x2 products, x scaled by a
    power of two, so large and tiny activations keep their precision), else the fp32 planes."""
    run(1, n, k, 4, group_size, with_perm=with_perm, with_bias=True, dtype=dtype, gen=gen,
        x_gain=x_gain, config=WNA16GemvConfig(32, 64, 4, 2))


def test_split_counters_are_left_at_zero(gen):
    """The last split of each row block resets its counter, so the next call starts clean."""
    for _ in range(2):
        run(1, 40, 256, 4, 64, config=WNA16GemvConfig(16, 64, split_k=4), gen=gen)
        kept = [c for buffers in gemv_module._COUNTERS.values() for c in buffers]
        assert kept and all(not c.any() for c in kept)      # keyed by e.g. cuda:0


def test_supported():
    x = torch.zeros(4, 256)
    w_q = torch.zeros(40, 32, dtype=torch.int32)
    assert gemv_supported(x, w_q, 4, 128, None)
    assert gemv_supported(x[:1], w_q, 4, 256, None)
    assert not gemv_supported(x, w_q, 4, 128, torch.zeros(256, dtype=torch.int32))  # g_idx
    assert not gemv_supported(torch.zeros(MAX_M + 1, 256), w_q, 4, 128, None)
    assert not gemv_supported(torch.zeros(4, 512)[:, ::2], w_q, 4, 128, None)      # strided
    assert not gemv_supported(x, w_q, 4, 4, None)             # groups split the words
    assert not gemv_supported(x, torch.zeros(40, 16, dtype=torch.int32), 4, 128, None)
    s = torch.ones(40, 2)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        wna16_gemv(torch.zeros(MAX_M + 1, 256), w_q, s, s, None, 4, 128)
    with pytest.raises(ValueError, match="x has 128 inputs, w_q packs 256"):
        wna16_gemv(torch.zeros(1, 128), w_q, s, s, None, 4, 64)
    with pytest.raises(ValueError, match="group size 4 splits the 8-code words"):
        wna16_gemv(x, w_q, torch.ones(40, 64), torch.ones(40, 64), None, 4, 4)


def test_act_order_perm():
    g_idx = torch.tensor([1, 0, 2, 1, 0, 2], dtype=torch.int32)
    perm = act_order_perm(g_idx, 3)
    assert perm.tolist() == [1, 4, 0, 3, 2, 5]
    assert (g_idx[perm.long()] == torch.arange(6) // 2).all()
    assert act_order_perm(torch.tensor([1, 0, 1, 1], dtype=torch.int32), 2) is None


def gptq_layer(k: int, n: int, desc_act: bool, gen) -> tuple[Linear, torch.Tensor]:
    """A GPTQ 4-bit g32 layer (act order: a random g_idx with even groups) and its weight."""
    codes = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(0, 16, (k // 32, n), generator=gen, dtype=torch.int32)
    scales = torch.rand(k // 32, n, generator=gen) * 0.02 + 0.001
    g_idx = (torch.randperm(k, generator=gen) % (k // 32)).to(torch.int32)
    if not desc_act:
        g_idx = torch.arange(k, dtype=torch.int32) // 32
    layer = Linear(k, [n], True, GPTQLayout(4, 32, v1=False, desc_act=desc_act), torch.float32)
    layer.load("qweight", pack_rows(codes, 4), None)
    layer.load("qzeros", pack_rows(zeros.t(), 4).t(), None)
    layer.load("scales", scales, None)
    layer.load("g_idx", g_idx, None)
    layer.load("bias", torch.randn(n, generator=gen), None)
    layer.quant_method.process_after_loading(layer)
    return layer, ((codes - zeros[g_idx.long()]) * scales[g_idx.long()]).t()


def test_act_order_is_stored_sorted(gen):
    layer, weight = gptq_layer(128, 24, True, gen)
    assert layer.w_g_idx is None and layer.w_perm is not None and layer.group_size == 32
    assert torch.allclose(layer.quant_method.dequantize(layer), weight)


@pytest.mark.parametrize("desc_act", [False, True])
def test_scheme_takes_the_gemv_for_decode_rows(monkeypatch, desc_act, gen):
    """Up to MAX_M rows go through the GEMV (bias fused), more through the GEMM; both match the
    CPU twin."""
    layer, weight = gptq_layer(128, 24, desc_act, gen)
    calls = []

    def recording_gemv(x, *args):
        calls.append(x.shape[0])
        return wna16_gemv(x, *args)

    monkeypatch.setattr(gemv_module, "wna16_gemv", recording_gemv)
    if DEVICE == "cpu":
        monkeypatch.setattr(WNA16Scheme, "kernels_on_cpu", True)
    layer = layer.to(DEVICE)
    for m in (1, 5, MAX_M + 1):
        x = torch.randn(m, 128, generator=gen)
        ref = x @ weight.t() + layer.bias.cpu()
        out = layer(x.to(DEVICE)).cpu()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5, SEED
    assert calls == [1, 5]


COMPILE_FOR_HOPPER = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from loom.plugins.quant.triton.wna16_gemv import _gemv_kernel
    from loom.plugins.quant.triton.wna16 import _wna16_kernel

    def compile_sm90(fn, args, constexprs, num_warps):
        sig = {name: args.get(name, "constexpr") for name in fn.arg_names}
        constexprs = {name: value for name, value in constexprs.items() if name in sig}
        src = ASTSource(fn, sig, constexprs=constexprs)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    ptr = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16",
           "perm_ptr": "*i32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*i32"}
    gemv_args = {**ptr, "part_ptr": "*fp32", "count_ptr": "*i32", **{n: "i32" for n in (
        "M", "N", "K", "k_words", "k_chunk", "splits", "magic", "stride_xm", "stride_wn",
        "stride_sn", "stride_ym")}}
    variants = [(1, 4, True, False, True, False), (1, 8, False, True, False, False),
                (16, 4, True, True, True, False), (16, 8, False, False, True, False),
                (1, 4, True, False, True, True), (1, 4, False, True, False, True)]
    for rows, bits, per_step, perm, even, fast in variants:   # fast: the PTX int4 path
        for x_type in ("*bf16", "*fp16") if fast else ("*bf16",):
            compile_sm90(_gemv_kernel, {**gemv_args, "x_ptr": x_type}, dict(
                BITS=bits, GROUP=128 if per_step else 32, ROWS=rows, BLOCK_N=64, BLOCK_K=128,
                STAGES=3, SCALE_PER_STEP=per_step, HAS_PERM=perm, HAS_BIAS=True, EVEN=even,
                SPLIT=True, FAST=fast), 4)
    gemm_args = {**ptr, **{n: "i32" for n in (
        "M", "N", "K", "group_size", "k_chunk", "stride_xm", "stride_wn", "stride_sn",
        "stride_ys", "stride_ym")}}
    compile_sm90(_wna16_kernel, gemm_args, dict(BITS=4, HAS_G_IDX=True, HAS_PERM=False,
                                                BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4)
    print("compiled")
""")


def test_kernels_compile_for_hopper():
    """The interpreter accepts code the compiler does not: compile the GEMV's paths and the GEMM
    for sm_90 (no GPU needed) in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the kernels for sm_90 took over 300 s")
    if "ModuleNotFoundError" in done.stderr and "backends.nvidia" in done.stderr:
        pytest.skip("triton without its NVIDIA backend")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only CI's stand-in for the benchmark, "
                    "which a GPU runs for real (on the H200's triton 3.6 its interpreter run "
                    "failed inside the interpreter, run 26)")
def test_benchmark_runs_tiny_on_the_cpu(tmp_path):
    """benchmarks/kernels_quant.py's GEMV sweep, its code paths on tiny shapes through the
    interpreter (float32: the interpreter's bf16 dot is wrong)."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "kernels_quant.py")
    out = tmp_path / "gemv.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, script, "--gemv-only", "--tiny", "--device", "cpu",
                           "--dtype", "float32", "--configs", "default", "n64k128", "--linears",
                           "down", "--rows", "1", "3", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert {(r["method"], r["m"], r["config"]) for r in record["gemv"]} == {
        (method, m, config) for method in ("w4a16 g128", "w4a16 g128 g_idx", "w8a16 channel")
        for m in (1, 3) for config in ("default", "n64k128")}
    assert all(r["rel_err"] < 1e-5 and r["us"] > 0 for r in record["gemv"])
    assert len(record["gemv_best"]) == 6 and record["ceilings"]["copy_gbs"] > 0
