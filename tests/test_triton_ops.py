"""The triton fused ops against their torch twin (loom.ops.FusedOps): on a GPU when there is
one, else through triton's interpreter on the CPU (TRITON_INTERPRET=1, set before the kernels
are defined)."""
import os

import pytest
import torch

from triton_interpreter import DEVICE  # noqa: F401  (sets TRITON_INTERPRET on the CPU)
from triton_interpreter import interpreter_fp8_rounding  # noqa: F401

from loom import ops  # noqa: E402
from loom.ops import FusedOps  # noqa: E402
from loom.platform import Platform  # noqa: E402
from loom.plugins.ops.triton import TritonFusedOps, loom_fused_ops  # noqa: E402
from loom.plugins.quant.unquantized import Unquantized  # noqa: E402
from attention_cases import build_metadata, random_inputs  # noqa: E402
from test_models import (PROMPT_LENS, allocate_blocks, load_loom, make_prompts,  # noqa: E402
                         run_step)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = list(TOLERANCE)
REF, OPS = FusedOps(), TritonFusedOps()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOLERANCE[ref.dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 96), (3, 130), (17, 256)])
def test_rms_norm(dtype, tokens, hidden):
    x = randn(tokens, hidden, dtype=dtype)
    w = 1 + 0.1 * randn(hidden, dtype=dtype, seed=1)
    check(OPS.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 96), (3, 130), (17, 256)])
def test_add_rms_norm(dtype, tokens, hidden):
    x, res = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype, seed=1)
    w = 1 + 0.1 * randn(hidden, dtype=dtype, seed=2)
    x0, res0 = x.clone(), res.clone()
    out, res_out = OPS.add_rms_norm(x, res, w, 1e-5)
    ref, ref_res = REF.add_rms_norm(x, res, w, 1e-5)
    check(out, ref)
    check(res_out, ref_res)
    assert torch.equal(x, x0) and torch.equal(res, res0)


def test_rms_norm_of_heads_in_a_qkv_view():
    """The per-head q/k norm (Qwen3) on a strided [T, H, D] view, as the model calls it."""
    qkv = randn(5, (4 + 2 + 2) * 32, dtype=torch.bfloat16)
    q = qkv[:, :4 * 32].view(5, 4, 32)
    w = 1 + 0.1 * randn(32, dtype=torch.bfloat16, seed=1)
    check(OPS.rms_norm(q, w, 1e-6), REF.rms_norm(q, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,n", [(1, 48), (3, 65), (17, 1500)])
def test_silu_and_mul(dtype, tokens, n):
    x = randn(tokens, 2 * n, dtype=dtype)
    check(OPS.silu_and_mul(x), REF.silu_and_mul(x))


def cos_sin_cache(max_pos: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim",
                         [(1, 4, 4, 64), (3, 8, 2, 96), (17, 6, 1, 32)])
def test_rotary_on_qkv_views(dtype, tokens, heads, kv_heads, head_dim):
    """q and k are strided views of one fused qkv output; v is left alone."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    v0 = v.clone()
    positions = torch.randint(0, 200, (tokens,), generator=torch.Generator().manual_seed(3))
    cache = cos_sin_cache(256, head_dim)
    ref_q, ref_k = REF.rotary(positions.to(DEVICE), q, k, cache)
    out_q, out_k = OPS.rotary(positions.to(DEVICE), q, k, cache)
    check(out_q, ref_q)
    check(out_k, ref_k)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert torch.equal(v, v0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leading_dims_and_int32_positions(dtype):
    x = randn(2, 3, 2 * 40, dtype=dtype)
    check(OPS.silu_and_mul(x), REF.silu_and_mul(x))
    w = randn(40, dtype=dtype, seed=1)
    check(OPS.rms_norm(x[..., :40], w, 1e-6), REF.rms_norm(x[..., :40], w, 1e-6))
    q, k = randn(4, 2, 16, dtype=dtype), randn(4, 1, 16, dtype=dtype, seed=1)
    positions = torch.tensor([5, 0, 9, 5], dtype=torch.int32, device=DEVICE)
    ref_q, ref_k = REF.rotary(positions, q, k, cos_sin_cache(16, 16))
    out_q, out_k = OPS.rotary(positions, q.clone(), k.clone(), cos_sin_cache(16, 16))
    check(out_q, ref_q)
    check(out_k, ref_k)


def test_registered_and_supported():
    assert loom_fused_ops() == [TritonFusedOps]
    assert TritonFusedOps.name == "triton" and issubclass(TritonFusedOps, FusedOps)

    class Cuda(Platform):
        device_type = "cuda"

    assert TritonFusedOps.is_supported(Cuda())
    assert TritonFusedOps.is_supported(Platform()) == (os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(DEVICE != "cpu", reason="the tiny models run on the CPU")
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_tiny_model_with_triton_ops(tiny_models, monkeypatch, name):
    """A prefill then a decode-only step (GEMV linears too), against the torch ops."""
    monkeypatch.setattr(ops, "_active", ops.active())
    logits = []
    for fused, gemv in [(FusedOps(), False), (TritonFusedOps(), True)]:
        ops.use(fused)
        monkeypatch.setattr(Unquantized, "gemv_on_cpu", gemv)
        model, kv_caches, config = load_loom(tiny_models[name])
        prompts = make_prompts(config.vocab_size)
        tables = allocate_blocks(PROMPT_LENS)
        prefill = run_step(model, kv_caches, prompts, tables, [0] * 3, list(PROMPT_LENS))
        decode = run_step(model, kv_caches, [p + [1] for p in prompts], tables,
                          list(PROMPT_LENS), [1] * 3, num_decodes=3)
        logits.append(torch.cat([prefill, decode]))
    assert rel_err(logits[1], logits[0]) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_torch_twin(dtype):
    """Slots across blocks in random order, one padding token (slot -1) that writes nothing."""
    metadata, num_blocks = build_metadata([(3, 1), (0, 9), (14, 5)], 16, DEVICE)
    metadata.slot_mapping[4] = -1
    _, k, v, kv_cache = random_inputs(metadata, num_blocks, 4, 2, 64, dtype, DEVICE)
    expected = kv_cache.clone()
    REF.write_kv(expected, k, v, metadata.slot_mapping)
    OPS.write_kv(kv_cache, k, v, metadata.slot_mapping)
    assert not torch.equal(expected, kv_cache.clone().zero_())
    assert torch.equal(kv_cache, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache_dtype", ["model", "fp8"])
def test_rotary_write_kv_matches_rotary_then_write_kv(dtype, cache_dtype):
    """The one-kernel rotary and cache write on views of a qkv output: q rotated in place and
    the cache bit for bit what the triton rotary then write_kv give (fp8: the same codes), and
    within rounding of the torch twin's; padding (slot -1) writes nothing; k is left as it was."""
    metadata, num_blocks = build_metadata([(3, 1), (0, 9), (14, 5)], 16, DEVICE)
    metadata.slot_mapping[4] = -1
    tokens, heads, kv_heads, head_dim = metadata.slot_mapping.shape[0], 8, 2, 64
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(tokens, heads, head_dim)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 200, (tokens,), generator=torch.Generator().manual_seed(3))
    positions = positions.to(DEVICE)
    rope = cos_sin_cache(256, head_dim)
    before = randn(2, num_blocks, 16, kv_heads, head_dim, dtype=dtype, seed=5)
    scales = (1.0, 1.0)
    if cache_dtype == "fp8":
        before, scales = before.to(FP8), (0.5, 2.0)
    caches = {name: before.clone() for name in ("fused", "unfused", "twin")}
    twin_q = REF.rotary_write_kv(positions, q.clone(), k.clone(), v, rope, caches["twin"],
                                 metadata.slot_mapping, *scales)
    unfused_q, unfused_k = OPS.rotary(positions, q.clone(), k.clone(), rope)
    OPS.write_kv(caches["unfused"], unfused_k, v, metadata.slot_mapping, *scales)
    k0 = k.clone()
    out_q = OPS.rotary_write_kv(positions, q, k, v, rope, caches["fused"], metadata.slot_mapping,
                                *scales)
    assert out_q.data_ptr() == q.data_ptr() and torch.equal(k, k0)
    assert torch.equal(out_q, unfused_q)
    check(out_q, twin_q)
    bits = {name: c.view(torch.uint8) for name, c in caches.items()}
    assert torch.equal(bits["fused"], bits["unfused"])
    assert rel_err(caches["fused"].float(), caches["twin"].float()) < (
        TOLERANCE[dtype] if cache_dtype == "model" else 0.1)
    # Only the 14 real tokens' K and V rows changed (the padding token wrote nothing).
    rows = (bits["fused"] != before.view(torch.uint8)).reshape(2, -1, kv_size * before.element_size())
    assert int(rows.any(-1).sum()) == 2 * 14


# The fused ops with an fp8 per-token output (for an FP8 linear after them): the codes and scales
# equal the unfused Triton op followed by quantize_per_token bit for bit, and dequantized they
# are the torch twin's within fp8's rounding.
FP8 = torch.float8_e4m3fn


def check_quantized(fused, unfused_out: torch.Tensor, twin) -> None:
    expected = ops.quantize_per_token(unfused_out, FP8)
    assert fused.dtype == unfused_out.dtype and fused.data.dtype == FP8
    if DEVICE == "cuda" and unfused_out.dtype == torch.float32:
        # Compiled separately, the fused and the plain kernel may differ in an fp32 output's
        # last bit (no rounding to the model dtype absorbs it), which can move a code that lies
        # on a rounding boundary by one step (seen on the H200: 1 case in 12).
        assert torch.allclose(fused.scale, expected.scale, rtol=1e-6, atol=0)
        codes, ref = fused.data.view(torch.uint8).int(), expected.data.view(torch.uint8).int()
        assert (codes - ref).abs().max() <= 1 and (codes != ref).float().mean() < 0.01
    else:
        assert torch.equal(fused.scale, expected.scale)
        assert torch.equal(fused.data.view(torch.uint8), expected.data.view(torch.uint8))
    deq = fused.data.float() * fused.scale
    assert rel_err(deq, twin.data.float() * twin.scale) < 0.08


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 96), (3, 130), (17, 256)])
def test_rms_norm_quant(dtype, tokens, hidden, interpreter_fp8_rounding):
    x = randn(tokens, hidden, dtype=dtype) * 3
    w = 1 + 0.1 * randn(hidden, dtype=dtype, seed=1)
    check_quantized(OPS.rms_norm_quant(x, w, 1e-6, FP8), OPS.rms_norm(x, w, 1e-6),
                    REF.rms_norm_quant(x, w, 1e-6, FP8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 96), (5, 130)])
def test_add_rms_norm_quant(dtype, tokens, hidden, interpreter_fp8_rounding):
    x, res = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype, seed=1)
    w = 1 + 0.1 * randn(hidden, dtype=dtype, seed=2)
    fused, res_out = OPS.add_rms_norm_quant(x, res, w, 1e-5, FP8)
    out, ref_res = OPS.add_rms_norm(x, res, w, 1e-5)
    twin, twin_res = REF.add_rms_norm_quant(x, res, w, 1e-5, FP8)
    check_quantized(fused, out, twin)
    assert torch.equal(res_out, ref_res)
    check(res_out, twin_res)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,n", [(1, 64), (4, 1500), (3, 40)])
def test_silu_and_mul_quant(dtype, tokens, n, interpreter_fp8_rounding, monkeypatch):
    """Rows held in one block, and (with the block made small) rows taking two passes."""
    from loom.plugins.ops.triton import kernels
    if n == 40:
        monkeypatch.setattr(kernels, "SILU_QUANT_BLOCK", 16)
    x = randn(tokens, 2 * n, dtype=dtype) * 4
    check_quantized(OPS.silu_and_mul_quant(x, FP8), OPS.silu_and_mul(x),
                    REF.silu_and_mul_quant(x, FP8))
