"""loom on checkpoints written by the real quantization tools (tests/fixtures/quant/, see its
make_fixtures.py and manifest.json) against transformers running the same checkpoint dequantized
to float32 by quant_reference.py.

Weight-only formats: greedy tokens equal token for token. Activation-quantized formats (W8A8,
FP8): logits close to the dequantized model's, and equal once its layer inputs go through the
quantization the checkpoint prescribes, but for rare rounding flips (float noise moving one
activation across a quantization step, a small error carried along the sequence). Controls: a
wrong decode (AWQ's packing order dropped, GPTQ v1 zeros read as v2) fails the same comparison.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loom import LLM, SamplingParams
from quant_reference import activation_qdq, dequantize_dir, dequantized_weights

FIXTURES = Path(__file__).parent / "fixtures" / "quant"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
ACTIVATION_QUANTIZED = {   # name -> worst log-prob gap to the plain dequantized model
    "ct_w8a8_dynamic": 0.25, "ct_w8a8_static_asym": 0.25, "ct_fp8_static": 0.5,
    "ct_fp8_dynamic": 0.5, "ct_fp8_block": 0.5, "autoround_export_fp8_block": 0.5}
WEIGHT_ONLY = sorted(set(MANIFEST["fixtures"]) - set(ACTIVATION_QUANTIZED))
PROMPTS = ["The quick brown fox",
           "Once upon a time there was a little town by the sea, and every morning",
           "What is the capital of France?"]
MAX_TOKENS = 12


class Reference:
    """transformers on each fixture dequantized to float32, built once per session."""

    def __init__(self, root: Path):
        self.root, self.models = root, {}

    def __call__(self, name: str):
        if name not in self.models:
            from transformers import AutoModelForCausalLM
            path = dequantize_dir(FIXTURES / name, self.root / name)
            self.models[name] = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32).eval()
        return self.models[name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return Reference(tmp_path_factory.mktemp("dequantized"))


def generate(path: Path, **config):
    """loom's greedy completions of PROMPTS: (prompt ids, token ids, log-prob of each token)."""
    defaults = dict(dtype="float32", max_model_len=128, max_num_seqs=4, kv_cache_memory_gb=0.05)
    llm = LLM(str(path), **(defaults | config))
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=1)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(tok.encode(p), o.outputs[0].token_ids,
             [o.outputs[0].logprobs[i][t].logprob for i, t in enumerate(o.outputs[0].token_ids)])
            for p, o in zip(PROMPTS, outputs)]


def greedy_equal(completions, model) -> bool:
    for ids, tokens, _ in completions:
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        if ref[0, len(ids):].tolist() != tokens:
            return False
    return True


def logprob_gaps(completions, model) -> list[float]:
    """Per token of loom's, teacher-forced through ``model``: the larger of the gaps between
    loom's and the model's log-prob of the token, and between the model's best token and it."""
    gaps = []
    for ids, tokens, logprobs in completions:
        with torch.no_grad():
            ref = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].log_softmax(-1)
        gaps += [max(abs(logprob - ref[i, token].item()), (ref[i].max() - ref[i, token]).item())
                 for i, (token, logprob) in enumerate(zip(tokens, logprobs))]
    return gaps


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_weight_only_greedy_equals_dequantized_model(name, reference):
    completions = generate(FIXTURES / name)
    assert greedy_equal(completions, reference(name))
    assert max(logprob_gaps(completions, reference(name))) < 1e-4


@pytest.mark.parametrize("name", sorted(ACTIVATION_QUANTIZED))
def test_activation_quantized_logits_close(name, reference):
    completions = generate(FIXTURES / name)
    model = reference(name)
    assert max(logprob_gaps(completions, model)) < ACTIVATION_QUANTIZED[name]
    handles = [model.get_submodule(layer).register_forward_pre_hook(
                   lambda module, args, qdq=qdq: (qdq(args[0]),))
               for layer, qdq in activation_qdq(FIXTURES / name).items()]
    try:
        gaps = logprob_gaps(completions, model)
        assert sum(g < 1e-4 for g in gaps) >= len(gaps) / 2 and max(gaps) < 0.1
    finally:
        for handle in handles:
            handle.remove()


def test_awq_packing_order_dropped_fails(reference, monkeypatch):
    from loom.plugins.quant.schemes import wna16
    monkeypatch.setattr(wna16, "AWQ_ORDER", tuple(range(8)))
    assert not greedy_equal(generate(FIXTURES / "awq_w4g64"), reference("awq_w4g64"))


def test_gptq_v1_zeros_read_as_v2_fails(reference, tmp_path):
    name = "gptq_w4g64_asym"
    shutil.copytree(FIXTURES / name, tmp_path / name)
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["quantization_config"].get("checkpoint_format", "gptq") == "gptq"
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert not greedy_equal(generate(tmp_path / name), reference(name))


def base_weights() -> dict[str, torch.Tensor] | None:
    """The float16 model the fixtures were made from, rebuilt; None if this torch/transformers
    no longer rebuilds it bit for bit (its hash is in the manifest)."""
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    make_fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixtures)
    with tempfile.TemporaryDirectory() as tmp:
        weights = make_fixtures.build_base(Path(tmp) / "base") / "model.safetensors"
        if make_fixtures.sha256(weights) != MANIFEST["base_sha256"]:
            return None
        return load_file(weights)


@pytest.fixture(scope="module")
def original():
    weights = base_weights()
    if weights is None:
        pytest.skip("the base model no longer rebuilds bit for bit")
    return weights


def weight_bits(name: str) -> int:
    config = json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]
    groups = config.get("config_groups") or {"": {"weights": {"num_bits": config.get("bits", 8)}}}
    return next(iter(groups.values()))["weights"]["num_bits"]


@pytest.mark.parametrize("name", sorted(MANIFEST["fixtures"]))
def test_reference_dequantization_is_close_to_the_original(name, original):
    """The reference itself: each dequantized layer within quantization error of the weight the
    tool was given (at most 0.2 for these 4-bit ones, GPTQ's and AWQ's included; a misread
    format is 0.3 off, v1 zeros read as v2, or 1.2, AWQ's order dropped)."""
    bound = 0.25 if weight_bits(name) == 4 else 0.05
    for key, w in dequantized_weights(FIXTURES / name).items():
        if key.endswith("proj.weight"):
            w0 = original[key].float()
            error = ((w - w0).norm() / w0.norm()).item()
            assert error < bound, (key, error)
