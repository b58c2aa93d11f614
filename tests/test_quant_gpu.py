"""The fixtures of test_quant_fixtures.py on a GPU (``pytest -m gpu``): the CUDA paths (the Triton
GEMMs, torch._scaled_mm, torch._int_mm, decode graphs) against the same float32 reference."""
from __future__ import annotations

import pytest
import torch

from test_quant_fixtures import (ACTIVATION_QUANTIZED, FIXTURES, WEIGHT_ONLY, generate,
                                 greedy_equal, logprob_gaps, reference)  # noqa: F401

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_weight_only_on_gpu(name, reference):  # noqa: F811
    completions = generate(FIXTURES / name, platform="cuda")
    assert greedy_equal(completions, reference(name))
    assert max(logprob_gaps(completions, reference(name))) < 1e-3


@pytest.mark.parametrize("name", sorted(ACTIVATION_QUANTIZED))
def test_activation_quantized_on_gpu(name, reference):  # noqa: F811
    completions = generate(FIXTURES / name, platform="cuda")
    assert max(logprob_gaps(completions, reference(name))) < ACTIVATION_QUANTIZED[name]


@pytest.mark.parametrize("name", ["gptq_w4g32_sym_descact", "ct_fp8_block"])
def test_bfloat16_on_gpu(name, reference):  # noqa: F811
    completions = generate(FIXTURES / name, platform="cuda", dtype="bfloat16")
    assert max(logprob_gaps(completions, reference(name))) < 0.5


def test_fused_input_on_gpu_matches_the_unfused_path(monkeypatch):
    """bf16 decode rows through the native int4 GEMV with the norms and SiLU-and-mul applied by
    it, graphs on: the log-probs of the same model with those ops run by the model."""
    fixture = FIXTURES / "gptq_w4g32_sym_descact"
    fused = generate(fixture, platform="cuda", dtype="bfloat16")
    monkeypatch.setenv("LOOM_NATIVE_FUSED_INPUT", "0")
    plain = generate(fixture, platform="cuda", dtype="bfloat16")
    gaps = [abs(a - b) for f, p in zip(fused, plain) for a, b in zip(f[2], p[2])
            if f[1] == p[1]]
    assert gaps and max(gaps) < 0.1
    assert sum(f[1] == p[1] for f, p in zip(fused, plain)) >= 2
