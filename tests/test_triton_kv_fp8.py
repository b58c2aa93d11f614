"""The triton backend and write_kv kernel with an fp8 KV cache, against torch_ref with the same
cache: on a GPU when there is one, else through triton's interpreter on the CPU."""
import pytest
import torch

from triton_interpreter import (DEVICE, interpreter_bf16_dot,  # noqa: F401
                                interpreter_fp8_rounding, tl, triton)

from loom.ops import quantize_fp8  # noqa: E402
from loom.plugins.attention.torch_ref import TorchRefAttention  # noqa: E402
from loom.plugins.attention.triton import TritonAttention  # noqa: E402
from loom.plugins.attention.triton import kernels  # noqa: E402
from loom.testing.attention_cases import (DECODE_BATCH, MIXED_BATCHES,  # noqa: E402
                                          build_metadata, random_qkv, rel_err)

FP8 = torch.float8_e4m3fn
# Both read the same fp8 values; they differ by the order of fp32 sums (and the query's
# dtype, into which triton converts the fp8 K/V exactly).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def run_both(batch, num_heads, num_kv_heads, dtype=torch.float32, k_scale=1.0, v_scale=1.0,
             kv_splits=None, head_size=32, block_size=16, seed=0):
    """One step through triton and torch_ref over copies of one random fp8 cache."""
    metadata, num_blocks = build_metadata(batch, block_size, DEVICE, seed=seed)
    device = torch.device(DEVICE)
    backends = [cls(num_heads, num_kv_heads, head_size, head_size ** -0.5, dtype, device)
                for cls in (TritonAttention, TorchRefAttention)]
    backends[0].kv_splits = kv_splits
    for b in backends:
        b.k_scale, b.v_scale = k_scale, v_scale
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    shape = (2, num_blocks, block_size, num_kv_heads, head_size)
    cache = quantize_fp8(torch.randn(shape, generator=gen, device=DEVICE) * 3, 1.0, FP8)
    q, k, v = random_qkv(metadata.slot_mapping.shape[0], num_heads, num_kv_heads, head_size,
                         dtype, DEVICE, seed)
    caches = [cache.clone(), cache.clone()]
    outs = [b.forward(q, k * 3, v * 3, c, b.build_metadata(metadata))
            for b, c in zip(backends, caches)]
    n = metadata.num_tokens
    return outs[0][:n], outs[1][:n], caches[0], caches[1]


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=str)
@pytest.mark.parametrize("batch", MIXED_BATCHES.values(), ids=MIXED_BATCHES.keys())
def test_mixed_batch_fp8_cache(batch, heads):
    out, ref, cache, ref_cache = run_both(batch, *heads)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("kv_splits", [1, 4])
def test_decode_fp8_cache_with_scales(kv_splits):
    """Non-unit scales: the write divides by them and values beyond 448 clamp alike; the
    kernels fold them back in (k_scale into the softmax scale, v_scale into the output)."""
    out, ref, cache, ref_cache = run_both(DECODE_BATCH, 8, 2, k_scale=0.005, v_scale=0.5,
                                          kv_splits=kv_splits)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert cache.float().abs().max() == 448.0          # k / 0.005 clamped
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("conversion", ["fp16", "cast"])
@pytest.mark.parametrize("kv_splits", [None, 4])
def test_bf16_queries_fp8_cache(conversion, kv_splits, monkeypatch):
    """bf16 queries read the cache converted to fp16 (dots in fp16) or to bf16."""
    monkeypatch.setattr(kernels, "FP8_CONVERSION", conversion)
    out, ref, cache, ref_cache = run_both(MIXED_BATCHES["decodes_and_chunks"], 8, 2,
                                          dtype=torch.bfloat16, k_scale=0.5, v_scale=2.0,
                                          kv_splits=kv_splits)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_engine_fp8_cache_triton_matches_torch(tmp_path):
    """On CUDA: the engine with an fp8 cache, triton against torch_ref (same fp8 values), bf16,
    head size 128, long enough contexts for split-KV decode."""
    from loom import LLM, SamplingParams
    from loom.demo_model import build_tiny_model
    path = build_tiny_model(tmp_path / "llama3", "llama3", hidden_size=512,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                            intermediate_size=1024)
    prompts = ["The quick brown fox", "Paged attention stores the keys and values " * 40]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=1)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(path), dtype="bfloat16", kv_cache_dtype="fp8", attention_backend=backend,
                  max_model_len=1024, kv_cache_memory_gb=1.0)
        assert llm.engine.executor.runner.kv_caches[0].dtype == FP8
        outs[backend] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    for ref, fast in zip(outs["torch"], outs["triton"]):
        first = ref.logprobs[0][ref.token_ids[0]].logprob
        assert fast.token_ids[0] == ref.token_ids[0]
        assert abs(fast.logprobs[0][fast.token_ids[0]].logprob - first) < 0.05


def test_decode_config_by_batch():
    """fp8 caches take the small-program config only for grids of many programs per SM."""
    from loom.plugins.attention.triton import backend as B
    attn = TritonAttention(32, 8, 128, 128 ** -0.5, torch.float32, torch.device("cpu"))
    attn.num_sms = 132
    many = B.LARGE_DECODE_PROGRAMS_PER_SM * 132 // 8
    assert attn.decode_config(1, many) == B.LARGE_FP8_DECODE
    assert attn.decode_config(1, many - 1) == (B.DECODE_TILE[1], B.DECODE_WARPS[1],
                                               B.DECODE_STAGES[1])
    assert attn.decode_config(2, many * 4) == (B.DECODE_TILE[2], B.DECODE_WARPS[2],
                                               B.DECODE_STAGES[2])


def test_large_batch_fp8_config_matches_torch(monkeypatch):
    """The small-program fp8 config (forced for a small batch) gives torch_ref's output."""
    from loom.plugins.attention.triton import backend as B
    monkeypatch.setattr(B, "LARGE_DECODE_PROGRAMS_PER_SM", 0)
    out, ref, cache, ref_cache = run_both(DECODE_BATCH, 8, 2, dtype=torch.bfloat16)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
