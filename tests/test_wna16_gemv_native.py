"""The native int4 GEMV (csrc/wna16_gemv.cu, loom.plugins.quant.native.wna16_gemv) against
dequantize-then-matmul in float32 and against its twin, the Triton GEMV; the scheme's choice of it;
and, on any machine, the fallback when it cannot be built. Fresh random inputs every run
(LOOM_TEST_SEED replays one)."""
import logging

import pytest
import torch

from test_wna16_gemv import SEED, gen, gptq_layer, operands  # noqa: F401

import loom.csrc
from loom.plugins.quant.native import wna16_gemv as native
from loom.plugins.quant.schemes.wna16 import dequantize
from loom.plugins.quant.triton.wna16_gemv import wna16_gemv
from loom.quant import FusedInput

CUDA = torch.cuda.is_available() and torch.version.hip is None
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU")
TOLERANCE = {torch.bfloat16: 5e-3, torch.float16: 2e-3}
BUILT = sorted(native.BUILT[1])


def check(m, n, k, group_size, dtype, gen, symmetric=False, with_perm=False, with_bias=False,
          x_gain=1.0, config=None):
    (x, w_q, scales, zeros, perm, bias), ref = operands(
        m, n, k, 4, group_size, symmetric, with_perm, with_bias, dtype, gen, x_gain)
    on = [None if t is None else t.cuda() for t in (x, w_q, scales, zeros, perm, bias)]
    gs = k if group_size == -1 else group_size
    assert native.applies(on[0], on[1], on[2], 4, gs, None)
    out = native.int4_gemv(*on[:5], gs, on[5], config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    error = ((out.float().cpu() - ref).norm() / ref.norm()).item()
    twin = wna16_gemv(*on[:5], 4, gs, bias=on[5])
    twin_error = ((twin.float().cpu() - ref).norm() / ref.norm()).item()
    assert error < TOLERANCE[dtype], (error, twin_error, SEED)
    return error, twin_error


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size,symmetric,with_perm,with_bias", [
    (32, False, False, True), (64, True, True, False), (128, False, True, True),
    (-1, False, False, False)])
def test_against_reference(dtype, m, group_size, symmetric, with_perm, with_bias, gen):
    check(m, 333, 1024, group_size, dtype, gen, symmetric, with_perm, with_bias)


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k,group_size", [
    (1, 32, -1), (7, 96, 32), (130, 160, 32), (257, 1056, 32), (64, 4096, 128),
    (4096, 14336, 128), (6144, 4096, 128), (129, 3072, 64)])
def test_odd_shapes(n, k, group_size, gen):
    """K below one lane's share, K not a multiple of a warp's loads, N not a multiple of a tile,
    group counts that are not powers of two; the Llama-3-8B down and qkv shapes."""
    for m in (1, 3):
        check(m, n, k, group_size, torch.bfloat16, gen, with_bias=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("rows,loads", BUILT)
@pytest.mark.parametrize("blocks_per_sm,prefetch", [(1, 0), (3, 2), (2, 5)])
def test_configs(rows, loads, blocks_per_sm, prefetch, gen):
    """Every built tile, with the grid both covering the tiles and looping over them, with and
    without L2 prefetches (some beyond the block's last step)."""
    cfg = native.NativeGemvConfig(rows, loads, blocks_per_sm, prefetch)
    check(1, 4099, 2048, 128, torch.float16, gen, with_perm=True, config=cfg)
    if (rows, loads) in ((1, 4), (2, 4)):
        check(4, 1000, 2048, 64, torch.bfloat16, gen, config=cfg)


@gpu
@needs_cuda
@pytest.mark.parametrize("x_gain", [1e4, 1e-4])
def test_large_and_tiny_activations(x_gain, gen):
    """x is scaled per 32 inputs into fp16's range: |x| up to 1e4 neither overflows the fp16 sums
    (a bf16 input beyond 65504 would) nor do inputs of 1e-4 lose their precision."""
    check(1, 512, 4096, 128, torch.bfloat16, gen, x_gain=x_gain)
    check(2, 512, 4096, 128, torch.bfloat16, gen, x_gain=x_gain)


@gpu
@needs_cuda
def test_zero_and_mixed_chunks(gen):
    """Rows of x with all-zero chunks next to large ones."""
    (x, w_q, scales, zeros, perm, bias), _ = operands(2, 256, 1024, 4, 128, False, False,
                                                      False, torch.bfloat16, gen)
    x[0, :512] = 0
    x[1, 32:64] *= 3000
    ref = x.float() @ dequantize(w_q, scales.float(), zeros.float(), None, 4, 128).t()
    out = native.int4_gemv(x.cuda(), w_q.cuda(), scales.cuda(), zeros.cuda(), None, 128)
    assert ((out.float().cpu() - ref).norm() / ref.norm()).item() < 5e-3


MMA = native.NativeGemvConfig(mma=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group_size,symmetric,with_perm,with_bias", [
    (333, 1024, 128, False, True, True), (16, 128, -1, True, False, False),
    (200, 768, 256, False, False, True), (4096, 14336, 128, False, False, False),
    (6144, 4096, 128, True, True, False), (40, 2048, -1, False, True, True)])
def test_mma_against_reference(dtype, n, k, group_size, symmetric, with_perm, with_bias, gen):
    """The tensor-core path: N not a multiple of its 16-row tiles, K from one 128-input step to
    112 (not a multiple of the 8 warps' 4-step batches), one group, groups of two steps, act
    order; the Llama-3-8B down and qkv shapes."""
    check(1, n, k, group_size, dtype, gen, symmetric, with_perm, with_bias, config=MMA)


@gpu
@needs_cuda
@pytest.mark.parametrize("x_gain", [1e4, 1e-4])
def test_mma_large_and_tiny_activations(x_gain, gen):
    """x staged with one power of two per 128 inputs: no overflow at 1e4, no lost precision at
    1e-4."""
    check(1, 512, 4096, 128, torch.bfloat16, gen, x_gain=x_gain, config=MMA)


@gpu
@needs_cuda
@pytest.mark.parametrize("op,with_residual", [("rms_norm", True), ("silu_and_mul", False)])
def test_mma_fused_input(op, with_residual, gen):
    check_fused(op, 1, 333, 1024, 128, torch.bfloat16, gen, with_residual, config=MMA)


def test_default_config_takes_the_tensor_core_path_where_it_applies():
    assert native.default_config(4096, 4096, 1, 132, 128, mma=True).mma
    assert native.default_config(4096, 4096, 1, 132, 4096, mma=True).mma    # one group
    assert not native.default_config(4096, 4096, 1, 132, 128, mma=False).mma
    assert not native.default_config(4096, 4096, 1, 132, 64, mma=True).mma
    assert not native.default_config(4096, 4096, 2, 132, 128, mma=True).mma
    assert not native.default_config(4096, 4000, 1, 132, -1, mma=True).mma  # K % 128


def fused_operands(op, m, k, dtype, gen, with_residual):
    """Two identical FusedInputs on the GPU (one for the kernel, one for the reference)."""
    def cuda(t):
        return None if t is None else t.cuda()
    if op == "silu_and_mul":
        gate_up = cuda((torch.randn(m, 2 * k, generator=gen) * 2).to(dtype))
        return FusedInput(op, gate_up), FusedInput(op, gate_up)
    x = cuda((torch.randn(m, k, generator=gen) * 3).to(dtype))
    weight = cuda((torch.rand(k, generator=gen) + 0.5).to(dtype))
    residual = cuda(torch.randn(m, k, generator=gen).to(dtype)) if with_residual else None

    def out():
        return None if residual is None else torch.full_like(residual, float("nan"))
    return (FusedInput(op, x, weight, 1e-5, residual, out()),
            FusedInput(op, x, weight, 1e-5, residual, out()))


def check_fused(op, m, n, k, group_size, dtype, gen, with_residual=False, with_perm=False,
                config=None):
    """The kernel's op + GEMV against the reference ops (FusedInput.evaluate, in x's dtype)
    followed by the float32 dequantized matmul; the residual sum bit-equal."""
    (_, w_q, scales, zeros, perm, bias), _ = operands(m, n, k, 4, group_size, False, with_perm,
                                                      True, dtype, gen)
    fused, twin = fused_operands(op, m, k, dtype, gen, with_residual)
    staged = twin.evaluate().float().cpu()
    xs = staged if perm is None else staged[:, perm.long()]
    ref = xs @ dequantize(w_q, scales.float(), zeros.float(), None, 4, group_size).t() + bias.float()
    on = [None if t is None else t.cuda() for t in (w_q, scales, zeros, perm, bias)]
    assert native.applies(fused.x, on[0], on[1], 4, group_size, None, op)
    out = native.int4_gemv(fused, *on[:4], group_size, on[4], config=config)
    error = ((out.float().cpu() - ref).norm() / ref.norm()).item()
    assert error < TOLERANCE[dtype], (op, error, SEED)
    if fused.residual_out is not None:
        assert torch.equal(fused.residual_out, twin.residual_out), SEED


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("op,with_residual,with_perm", [
    ("rms_norm", False, False), ("rms_norm", True, False), ("rms_norm", True, True),
    ("silu_and_mul", False, False), ("silu_and_mul", False, True)])
def test_fused_input_against_reference(dtype, m, op, with_residual, with_perm, gen):
    check_fused(op, m, 333, 1024, 128, dtype, gen, with_residual, with_perm)


@gpu
@needs_cuda
@pytest.mark.parametrize("op,n,k,group_size", [
    ("rms_norm", 6144, 4096, 128), ("rms_norm", 28672, 4096, 128),
    ("silu_and_mul", 4096, 14336, 128), ("rms_norm", 7, 96, 32), ("silu_and_mul", 130, 160, 32)])
def test_fused_input_shapes(op, n, k, group_size, gen):
    """The Llama-3-8B qkv, gate_up and down shapes; and grids of a few blocks, where each block
    writes several pieces of the residual sum."""
    for m in (1, 4):
        check_fused(op, m, n, k, group_size, torch.bfloat16, gen, with_residual=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k", [(6144, 4096), (28672, 4096), (7, 96)])
def test_residual_sum_by_the_last_blocks(n, k, monkeypatch, gen):
    """LOOM_NATIVE_GEMV_FLAGS=sum_by_last_blocks moves the residual sum's writes to the grid's
    last blocks: the sum still bit-equal, every piece written (residual_out starts as NaN)."""
    monkeypatch.setenv("LOOM_NATIVE_GEMV_FLAGS", "sum_by_last_blocks")
    for m in (1, 4):
        check_fused("rms_norm", m, n, k, 32 if k < 128 else 128, torch.bfloat16, gen,
                    with_residual=True)


@gpu
@needs_cuda
def test_tracing_build_records_every_block(monkeypatch, gen):
    """The tracing build (-DLOOM_GEMV_TRACE) computes what the plain build does, bit for bit, and
    writes one record per block with times in launch order."""
    (x, w_q, scales, zeros, _, bias), _ = operands(1, 6144, 4096, 4, 128, False, False, True,
                                                   torch.bfloat16, gen)
    on = [t.cuda() for t in (x, w_q, scales, zeros, bias)]
    plain = native.int4_gemv(on[0], *on[1:4], None, 128, on[4])
    traced_module = loom.csrc.load("wna16_gemv", ("LOOM_GEMV_TRACE",))
    monkeypatch.setattr(native, "_module", lambda: traced_module)
    buffer = native.trace_start(4096, on[0].device)
    traced = native.int4_gemv(on[0], *on[1:4], None, 128, on[4])
    records = native.trace_stop(buffer)
    assert torch.equal(plain, traced)
    cfg = native._configured(6144, 4096, 1, on[0].device, 128)
    tiles = -(-6144 // (8 * cfg.rows_per_warp))
    grid = min(tiles, torch.cuda.get_device_properties(0).multi_processor_count * cfg.blocks_per_sm)
    assert records.shape == (grid, 8)
    times = records[:, :5]
    assert bool((times[:, 1:] >= times[:, :-1]).all()) and bool((times[:, 0] > 0).all())
    assert set((records[:, 5] & 0xffffffff).tolist()) == {6144}
    assert set((records[:, 5] >> 32).tolist()) == {4096}
    assert sorted((records[:, 6] & 0xffffffff).tolist()) == list(range(grid))
    native.int4_gemv(on[0], *on[1:4], None, 128, on[4])     # after trace_stop: nothing recorded
    assert traced_module.trace_stop() == grid


def test_default_configs_of_the_llama3_8b_linears():
    """The H200 picks (132 SMs, one row of x), 4 loads per lane a batch: the qkv rows in 1-row
    tiles (768 tiles fill 3 rounds of 264 block slots), o_proj and gate_up in 2-row tiles, down's
    14336-input rows with 3 blocks per SM."""
    pick = {name: native.default_config(n, k, 1, 132, 128) for name, (n, k) in {
        "qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
        "down": (4096, 14336)}.items()}
    assert pick == {"qkv": native.NativeGemvConfig(1, 4, 2),
                    "o_proj": native.NativeGemvConfig(2, 2, 2),
                    "gate_up": native.NativeGemvConfig(2, 2, 2),
                    "down": native.NativeGemvConfig(2, 2, 3)}


def test_measurement_knobs_parse_and_refuse(monkeypatch):
    assert native.parse_flags("") == 0
    assert native.parse_flags("sum_by_last_blocks") == native.FLAGS["sum_by_last_blocks"]
    with pytest.raises(ValueError, match="LOOM_NATIVE_GEMV_FLAGS.*'nope'.*sum_by_last_blocks"):
        native.parse_flags("nope")
    assert native.parse_configs("6144x4096=1/4/2; 4096x14336=2/2/3") == {
        (6144, 4096): native.NativeGemvConfig(1, 4, 2),
        (4096, 14336): native.NativeGemvConfig(2, 2, 3)}
    with pytest.raises(ValueError, match="LOOM_NATIVE_GEMV_CONFIG.*NxK=R/U/B"):
        native.parse_configs("6144x4096=1/4")
    monkeypatch.setattr(native, "num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    monkeypatch.setenv("LOOM_NATIVE_GEMV_CONFIG", "6144x4096=4/2/1")
    assert native._configured(6144, 4096, 1, cpu, 128) == native.NativeGemvConfig(4, 2, 1)
    assert native._configured(6144, 4096, 2, cpu, 128) == native.default_config(
        6144, 4096, 2, 132, 128)                             # one row of x only
    assert native._configured(4096, 4096, 1, cpu, 128) == native.default_config(
        4096, 4096, 1, 132, 128)


def silu_and_mul_ref(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SiLU-and-mul of the float32 z, rounded to dtype where the unfused ops round: z (the
    linear's output), silu, the product (three bf16 roundings alone differ from float32 by
    3-5e-3, as much as the tolerance)."""
    half = z.shape[1] // 2
    z = z.to(dtype).float()
    silu = torch.nn.functional.silu(z[:, :half]).to(dtype).float()
    return (silu * z[:, half:]).to(dtype).float()


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,group_size,with_perm,with_bias,norm", [
    (2 * 333, 1024, 128, False, True, False), (2 * 96, 256, 32, True, False, True),
    (2 * 7, 96, -1, False, True, True), (2 * 7, 128, -1, False, True, True)])
def test_silu_and_mul_epilogue_against_reference(dtype, m, n, k, group_size, with_perm,
                                                   with_bias, norm, gen):
    """silu(z[:, :N/2]) * z[:, N/2:] of z = x W^T + b in the GEMV's own kernel against the same
    of the float32 dequantized matmul; with the norm as its prologue too (the Llama MLP's gate|up
    with post_attention_layernorm); odd halves (7 pairs, one warp's tile partly past the end)."""
    (x, w_q, scales, zeros, perm, bias), ref = operands(m, n, k, 4, group_size, False, with_perm,
                                                        with_bias, dtype, gen)
    gs = k if group_size == -1 else group_size
    on = [None if t is None else t.cuda() for t in (x, w_q, scales, zeros, perm, bias)]
    x_in = on[0]
    if norm:
        # The kernel's norm (see its header): the dot products of weight * (x + residual), each
        # rounded to the dtype, times 1 / rms; so the reference rounds where the kernel does.
        x_in, _ = fused_operands("rms_norm", m, k, dtype, gen, with_residual=True)
        total = (x_in.x.float() + x_in.residual.float()).to(dtype).float().cpu()
        staged = (x_in.weight.float().cpu() * total).to(dtype).float()
        inv_rms = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + x_in.eps)
        xs = staged if perm is None else staged[:, perm.long()]
        w = dequantize(w_q, scales.float(), zeros.float(), None, 4, gs)
        ref = (xs @ w.t()) * inv_rms + (0 if bias is None else bias.float())
    assert native.applies(on[0], on[1], on[2], 4, gs, None, "rms_norm" if norm else None,
                          epilogue="silu_and_mul")
    out = native.int4_gemv(x_in, *on[1:5], gs, on[5], epilogue="silu_and_mul")
    assert out.shape == (m, n // 2) and out.dtype == dtype
    expected = silu_and_mul_ref(ref, dtype)
    error = ((out.float().cpu() - expected).norm() / expected.norm()).item()
    # The GEMV's own error (fp16 products, ~2e-3 in bf16) passes through silu(gate) * up, which
    # adds the two factors' errors and scales the gate's by g silu'(g) / silu(g) (up to ~1.3):
    # twice the GEMV's tolerance (runs 55 and 59 saw 6.1e-3 and 6.7e-3 over 96 outputs). What
    # the epilogue computes exactly is the next test's: bit-equal to the unfused activation.
    assert error < 2 * TOLERANCE[dtype], (error, SEED)
    if norm:
        assert torch.equal(x_in.residual_out.cpu(), total.to(dtype)), SEED


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("inter,k,group_size,mma", [
    (14336, 4096, 32, False), (160, 96, 32, False), (14336, 4096, 128, True),
    (384, 256, 128, True)])
def test_epilogue_gives_what_the_next_prologue_would(m, inter, k, group_size, mma, monkeypatch,
                                                     gen):
    """The MLP both ways, gate|up with the norm before it: its kernel applying SiLU-and-mul to
    its output, or the down projection's kernel applying it to its input (the Llama-3-8B sizes
    and a small one; with mma, one row of x takes the tensor-core path). The activation is
    rounded the same way in both, so the outputs are bit-equal; also inside a replayed CUDA
    graph with programmatic launches."""
    if mma:
        monkeypatch.setenv("LOOM_NATIVE_MMA", "1")
    layers = []
    for n, kk in ((2 * inter, k), (k, inter)):
        (_, w_q, scales, zeros, _, bias), _ = operands(1, n, kk, 4, group_size, False, False,
                                                       True, torch.bfloat16, gen)
        layers.append([t.cuda() for t in (w_q, scales, zeros)] + [bias.cuda()])
    (gate_up, down) = layers
    x = torch.empty(m, k, dtype=torch.bfloat16, device="cuda")
    residual = torch.empty_like(x)
    norm_w = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16).cuda()

    def mlp(fused_output: bool):
        total = torch.empty_like(x)
        h = FusedInput("rms_norm", x, norm_w, 1e-5, residual, total)
        if fused_output:
            act = native.int4_gemv(h, *gate_up[:3], None, group_size, gate_up[3],
                                   epilogue="silu_and_mul")
            y = native.int4_gemv(act, *down[:3], None, group_size, down[3])
        else:
            z = native.int4_gemv(h, *gate_up[:3], None, group_size, gate_up[3])
            y = native.int4_gemv(FusedInput("silu_and_mul", z), *down[:3], None, group_size,
                                 down[3])
        return torch.cat([y, total], dim=1)

    def new_inputs():
        x.copy_((torch.randn(m, k, generator=gen) * 2).to(torch.bfloat16))
        residual.copy_(torch.randn(m, k, generator=gen).to(torch.bfloat16))

    new_inputs()
    assert torch.equal(mlp(True), mlp(False)), SEED
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mlp(True)
    for _ in range(2):
        new_inputs()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, mlp(False)), SEED


@gpu
@needs_cuda
def test_programmatic_launches_in_a_graph(monkeypatch, gen):
    """Three GEMVs in a chain, each taking the one before's output through its fused op (norm +
    residual, SiLU-and-mul, norm + the first's residual sum), captured in a CUDA graph with
    programmatic (PDL) launches and replayed on new inputs: bit-equal to plain launches. A kernel
    that read its input before the one before it finished would read the last replay's."""
    k, inter = 512, 1024
    layers = []
    for n, kk in ((2 * inter, k), (k, inter), (k, k)):
        (_, w_q, scales, zeros, _, _), _ = operands(1, n, kk, 4, 128, False, False, False,
                                                    torch.bfloat16, gen)
        layers.append([t.cuda() for t in (w_q, scales, zeros)])
    norm_w = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16).cuda()
    x = torch.empty(1, k, dtype=torch.bfloat16, device="cuda")
    residual = torch.empty_like(x)

    def chain():
        sum1, sum2 = torch.empty_like(x), torch.empty_like(x)
        h = native.int4_gemv(FusedInput("rms_norm", x, norm_w, 1e-5, residual, sum1),
                             *layers[0], None, 128)
        y = native.int4_gemv(FusedInput("silu_and_mul", h), *layers[1], None, 128)
        z = native.int4_gemv(FusedInput("rms_norm", y, norm_w, 1e-5, sum1, sum2), *layers[2],
                             None, 128)
        return torch.cat([z, sum2], dim=1)

    def new_inputs():
        x.copy_(torch.randn(1, k, generator=gen).to(torch.bfloat16))
        residual.copy_(torch.randn(1, k, generator=gen).to(torch.bfloat16))

    assert native.pdl(x.device) == (torch.cuda.get_device_capability() >= (9, 0))
    new_inputs()
    chain()                                                         # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    for _ in range(3):
        new_inputs()
        graph.replay()
        monkeypatch.setenv("LOOM_NATIVE_PDL", "0")
        plain = chain()
        monkeypatch.delenv("LOOM_NATIVE_PDL")
        torch.cuda.synchronize()
        assert torch.equal(captured, plain), SEED


def test_refuses_bad_operands(gen):
    """Checked in Python with messages that name the operand, before the extension is called (on
    any machine: the checks need no GPU)."""
    (x, w_q, scales, zeros, _, _), _ = operands(1, 64, 256, 4, 128, False, False, False,
                                                torch.bfloat16, gen)
    with pytest.raises(ValueError, match="epilogue must be one of"):
        native.int4_gemv(x, w_q, scales, zeros, None, 128, epilogue="gelu_and_mul")
    with pytest.raises(ValueError, match="even number of rows of W"):
        native.int4_gemv(x, w_q[:63], scales[:63], zeros[:63], None, 128, epilogue="silu_and_mul")
    with pytest.raises(ValueError, match="rows_per_warp 2"):
        native.int4_gemv(x, w_q, scales, zeros, None, 128, epilogue="silu_and_mul",
                         config=native.NativeGemvConfig(1, 4, 2))
    with pytest.raises(ValueError, match="1 to 4 rows"):
        native.int4_gemv(x.repeat(5, 1), w_q, scales, zeros, None, 128)
    with pytest.raises(ValueError, match="scales must be contiguous"):
        native.int4_gemv(x, w_q, scales.half(), zeros, None, 128)
    with pytest.raises(ValueError, match="no kernel built"):
        native.int4_gemv(x.repeat(2, 1), w_q, scales, zeros, None, 128,
                         config=native.NativeGemvConfig(4, 4, 1))
    with pytest.raises(ValueError, match="bias must be"):
        native.int4_gemv(x, w_q, scales, zeros, None, 128, bias=scales[:, 0].float())
    with pytest.raises(ValueError, match="mma takes one row of x"):
        native.int4_gemv(x.repeat(2, 1), w_q, scales, zeros, None, 128, config=MMA)
    (x64, w64, s64, z64, _, _), _ = operands(1, 64, 256, 4, 64, False, False, False,
                                             torch.bfloat16, gen)
    with pytest.raises(ValueError, match="groups of a multiple of 128"):
        native.int4_gemv(x64, w64, s64, z64, None, 64, config=MMA)
    # 2^31 16-byte chunks of W (meta tensors: shapes only) overflow the kernel's 32-bit offsets
    big = torch.empty(1 << 20, 1 << 16, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="2\\^31 or more 16-byte chunks"):
        native.int4_gemv(torch.empty(1, 1 << 19, dtype=torch.bfloat16, device="meta"), big,
                         scales, zeros, None, 128)


@gpu
@needs_cuda
def test_scheme_takes_the_native_gemv_for_up_to_four_rows(monkeypatch, gen):
    """bf16 decode rows 1-4 go through the native GEMV, 5-16 through Triton's, more through the
    GEMM; all match the float32 reference of the same bf16 operands."""
    layer, weight = gptq_layer(256, 96, False, gen)
    layer = layer.to(torch.bfloat16).cuda()
    calls = []
    real = native.int4_gemv

    def recording(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(native, "int4_gemv", recording)
    for m in (1, 4, 5, 17):
        x = torch.randn(m, 256, generator=gen).to(torch.bfloat16)
        ref = x.float() @ weight.t() + layer.bias.float().cpu()
        out = layer(x.cuda()).float().cpu()
        assert ((out - ref).norm() / ref.norm()).item() < 1e-2, SEED
    assert calls == [1, 4]


def test_falls_back_with_one_warning_when_it_cannot_build(monkeypatch, caplog):
    """Where csrc/wna16_gemv.cu cannot be built, the scheme keeps the Triton GEMV: applies() is
    False and the reason is logged once."""
    def no_compiler(name, defines=()):
        raise loom.csrc.BuildError(f"{name}: building failed: nvcc not found")

    monkeypatch.setattr(loom.csrc, "load", no_compiler)
    native._module.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="loom"):
            assert native._module() is None
            assert native._module() is None
        warnings = [r for r in caplog.records if "native int4 GEMV" in r.getMessage()]
        assert len(warnings) == 1 and "nvcc not found" in warnings[0].getMessage()
    finally:
        native._module.cache_clear()


def test_applies_only_where_it_can_run(monkeypatch):
    monkeypatch.setattr(native, "_module", lambda: object())
    monkeypatch.setattr(native, "_shared_memory_limit", lambda device: 227 * 1024)
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    w_q = torch.zeros(64, 32, dtype=torch.int32)
    s = torch.zeros(64, 2, dtype=torch.bfloat16)
    assert not native.applies(x, w_q, s, 4, 128, None)          # on the CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    if torch.version.hip is None:
        assert native.applies(x, w_q, s, 4, 128, None)
    assert not native.applies(x, w_q, s, 8, 128, None)          # int8
    assert not native.applies(x.float(), w_q, s, 4, 128, None)  # float32 x
    assert not native.applies(x, w_q, s.half(), 4, 128, None)   # scales in another dtype
    assert not native.applies(x.repeat(5, 1), w_q, s, 4, 128, None)
    assert not native.applies(x, w_q, s, 4, 16, None)           # groups of 16 split a load
    assert not native.applies(x, w_q, s, 4, 128, torch.zeros(256, dtype=torch.int32))
    wide = torch.zeros(4, 32768, dtype=torch.bfloat16)           # x would not fit in shared memory
    assert not native.applies(wide, torch.zeros(64, 4096, dtype=torch.int32),
                              torch.zeros(64, 256, dtype=torch.bfloat16), 4, 128, None)
    monkeypatch.setenv("LOOM_NATIVE_KERNELS", "0")
    assert not native.applies(x, w_q, s, 4, 128, None)


def test_load_explains_what_is_missing():
    if CUDA:
        pytest.skip("this machine can build it")
    with pytest.raises(loom.csrc.BuildError, match="NVIDIA GPUs with CUDA"):
        loom.csrc.load("wna16_gemv")
    with pytest.raises(loom.csrc.BuildError, match="no native kernel"):
        loom.csrc.load("no_such_kernel")
    assert (loom.csrc.SOURCES / "wna16_gemv.cu").exists()
