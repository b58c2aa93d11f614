"""kv-cache-dtype: fp8 with torch_ref: the cache write (quantize), attention over the dequantized
cache, the engine end to end against an unquantized cache, and the config checks."""
from __future__ import annotations

import pytest
import torch

from loom import LLM, SamplingParams
from loom.attention import AttentionBackend
from loom.config import ConfigError, EngineConfig, build_config
from loom.engine_core import resolve
from loom.ops import dequantize_fp8, quantize_fp8, write_kv
from loom.plugins.attention.torch_ref import TorchRefAttention
from loom.plugins.platform.cpu import CpuPlatform

from loom.testing.attention_cases import MIXED_BATCHES, build_metadata, random_qkv, rel_err

FP8 = torch.float8_e4m3fn
FP8_TOLERANCE = 0.06     # relative error of attention over an e4m3 cache (3 mantissa bits)


def fp8_cache(num_blocks, block_size, num_kv_heads, head_size):
    return torch.zeros(2, num_blocks, block_size, num_kv_heads, head_size, dtype=FP8)


def test_write_kv_quantizes_and_clamps():
    k = torch.tensor([[[1.0, -3.3, 600.0, -1000.0]]])
    v = torch.tensor([[[0.1, 2.0, 5.0, 1e-4]]])
    cache = fp8_cache(2, 4, 1, 4)
    write_kv(cache, k, v, torch.tensor([5]), k_scale=2.0, v_scale=0.5)
    stored_k, stored_v = cache[0, 1, 1, 0].float(), cache[1, 1, 1, 0].float()
    assert stored_k.tolist() == [0.5, -1.625, 288.0, -448.0]   # x / 2, rounded; clamped at 448
    assert stored_v.tolist() == [0.203125, 4.0, 10.0, 0.0]     # below the smallest subnormal
    assert torch.equal(dequantize_fp8(cache[0, 1, 1, 0], 2.0), stored_k * 2)
    assert int((cache.view(torch.uint8) != 0).sum()) == 7      # that slot only


def test_write_kv_skips_padding_slots():
    k, v = torch.ones(3, 2, 8), torch.full((3, 2, 8), 2.0)
    cache = fp8_cache(1, 4, 2, 8)
    write_kv(cache, k, v, torch.tensor([0, -1, 3]))
    assert cache[0, 0, [0, 3]].float().eq(1).all() and cache[1, 0, [0, 3]].float().eq(2).all()
    assert cache[:, 0, [1, 2]].float().eq(0).all()


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=str)
@pytest.mark.parametrize("batch", MIXED_BATCHES.values(), ids=MIXED_BATCHES.keys())
def test_torch_ref_fp8_cache(batch, heads):
    """Write then attend over an fp8 cache: exactly attention over the dequantized K/V (the
    fp32 reference), and close to attention over an fp32 cache."""
    num_heads, num_kv_heads = heads
    head_size, block_size = 32, 16
    metadata, num_blocks = build_metadata(batch, block_size)
    shape = (2, num_blocks, block_size, num_kv_heads, head_size)
    fp32_cache = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    cache = quantize_fp8(fp32_cache, 1.0, FP8)
    dequantized = cache.float()
    q, k, v = random_qkv(metadata.num_tokens, num_heads, num_kv_heads, head_size, torch.float32)
    backend = TorchRefAttention(num_heads, num_kv_heads, head_size, head_size ** -0.5,
                                torch.float32, torch.device("cpu"))
    out = backend.forward(q, k, v, cache, metadata)
    # The fp32 reference: the same step over the dequantized cache, with K/V rounded to fp8.
    exact = backend.forward(q, quantize_fp8(k, 1.0, FP8).float(), quantize_fp8(v, 1.0, FP8).float(),
                            dequantized, metadata)
    assert torch.allclose(out, exact, atol=1e-6)
    assert torch.equal(cache.float(), dequantized)      # both steps wrote the same values
    full = backend.forward(q, k, v, fp32_cache.clone(), metadata)
    assert 0 < rel_err(out, full) < FP8_TOLERANCE


def test_torch_ref_applies_scales():
    """With scales s the cache holds x / s and reads back x: attention stays that of unit
    scales (power-of-two scales round alike, apart from values that turn subnormal)."""
    metadata, num_blocks = build_metadata(MIXED_BATCHES["decodes_and_chunks"], 16)
    q, k, v = random_qkv(metadata.num_tokens, 4, 2, 32, torch.float32)
    outs, caches = [], []
    for k_scale, v_scale in [(1.0, 1.0), (0.25, 4.0)]:
        backend = TorchRefAttention(4, 2, 32, 32 ** -0.5, torch.float32, torch.device("cpu"))
        backend.k_scale, backend.v_scale = k_scale, v_scale
        caches.append(fp8_cache(num_blocks, 16, 2, 32))
        outs.append(backend.forward(q, k, v, caches[-1], metadata))
    assert rel_err(caches[1][0].float(), caches[0][0].float() * 4) < 1e-3    # K / 0.25
    assert rel_err(outs[1], outs[0]) < 0.01


# ---- the engine -------------------------------------------------------------------------------
PROMPTS = ["The quick brown fox", "Once upon a time there was a little town by the sea, and",
           "What is the capital of France?", "Paged attention stores the keys and values " * 4]
MAX_TOKENS = 12


def make_llm(path, **config) -> LLM:
    return LLM(str(path), **(dict(dtype="float32", max_model_len=256, max_num_seqs=64) | config))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)


def test_engine_fp8_cache_follows_full_precision(tiny_models):
    """Along the greedy path of a float32 cache, an fp8 cache picks the same next token at most
    positions and its top logprob stays close. (Teacher-forced: the tiny random models have
    near-flat logits, where one flipped near-tie would end a free-running comparison.)"""
    path = tiny_models["llama"]
    ref_llm = make_llm(path)
    tok = ref_llm.get_tokenizer()
    ref = [o.outputs[0] for o in ref_llm.generate(PROMPTS, greedy(MAX_TOKENS), use_tqdm=False)]
    del ref_llm
    contexts, expected = [], []
    for prompt, out in zip(PROMPTS, ref):
        ids = tok.encode(prompt)
        for t, token in enumerate(out.token_ids):
            contexts.append(ids + out.token_ids[:t])
            expected.append((token, out.logprobs[t][token].logprob))
    llm = make_llm(path, kv_cache_dtype="fp8")
    assert llm.engine.executor.runner.kv_caches[0].dtype == FP8
    outs = [o.outputs[0] for o in llm.generate(contexts, greedy(1), use_tqdm=False)]
    same = [o.token_ids[0] == token for o, (token, _) in zip(outs, expected)]
    deltas = [abs(o.logprobs[0][o.token_ids[0]].logprob - lp)
              for o, (_, lp) in zip(outs, expected)]
    mean = sum(deltas) / len(deltas)
    print(f"fp8 cache: {sum(same)}/{len(same)} next tokens equal, mean |dlogprob| {mean:.4f}, "
          f"max {max(deltas):.4f}")
    # Measured on this model: 42/48 equal, mean 0.049, max 0.15. e4m3 keeps 3 mantissa bits
    # (2^-4 relative rounding), coarser for this model's small K/V (mean |K| 0.04, often below
    # the smallest normal fp8, 2^-6, at scale 1.0).
    assert sum(same) / len(same) >= 0.75
    assert 0 < mean < 0.1 and max(deltas) < 0.3


def test_engine_fp8_cache_holds_twice_the_blocks(tiny_models):
    path = tiny_models["llama"]
    sizes = {}
    for kv_dtype in ("auto", "fp8"):
        llm = LLM(str(path), dtype="bfloat16", max_model_len=256, kv_cache_memory_gb=0.01,
                  kv_cache_dtype=kv_dtype)
        sizes[kv_dtype] = llm.engine.kv_cache.num_blocks
        runner = llm.engine.executor.runner
        assert runner.kv_caches[0].dtype == (FP8 if kv_dtype == "fp8" else torch.bfloat16)
        del llm
    assert sizes["fp8"] in (2 * sizes["auto"], 2 * sizes["auto"] + 1), sizes


# ---- config -----------------------------------------------------------------------------------
def test_kv_cache_dtype_choices():
    with pytest.raises(ConfigError, match="'kv-cache-dtype': expected one of auto, fp8"):
        build_config({"model": "x", "kv_cache_dtype": "fp16"})


class NoFp8Platform(CpuPlatform):
    name = "nofp8"
    fp8_dtype = None


class NoFp8Backend(AttentionBackend):
    name = "nofp8"


def test_fp8_refused_without_platform_fp8(tiny_models):
    config = EngineConfig(model=str(tiny_models["llama"]), kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match="config key 'kv-cache-dtype': fp8 needs fp8"):
        resolve(config, NoFp8Platform(), TorchRefAttention)


def test_fp8_refused_by_backend_without_it(tiny_models):
    config = EngineConfig(model=str(tiny_models["llama"]), kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match="config key 'kv-cache-dtype': attention backend "
                                          "'nofp8' supports auto, not fp8"):
        resolve(config, CpuPlatform(), NoFp8Backend)
    assert resolve(config, CpuPlatform(), TorchRefAttention).model_path == tiny_models["llama"]


@pytest.mark.parametrize("module, cls", [("flash_attn", "FlashAttnAttention"),
                                         ("flashinfer", "FlashInferAttention")])
def test_flash_backends_declare_no_fp8(module, cls):
    import importlib
    backend = getattr(importlib.import_module(f"loom.plugins.attention.{module}"), cls)
    assert "fp8" not in backend.supported_kv_cache_dtypes
