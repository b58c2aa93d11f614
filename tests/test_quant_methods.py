"""The quantization plugins' configuration: which plugin a checkpoint selects, per-layer choices
(skip lists, overrides, fused layers), refusals by the platform at start, and the format details
a fixture does not reach (GPTQ v1 zeros with borrows, ROCm's fnuz fp8, merged int8 ranges, fp8
quantized while loading, int8 quantized while loading, per-tensor fp8 checkpoints, GPTQ settings
in AutoGPTQ's quantize_config.json)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loom.config import load_config
from loom.engine import Engine
from loom.hookspecs import hookimpl
from loom.model_config import ModelConfig
from loom.plugin_manager import PluginManager
from loom.plugins.platform.cpu import CpuPlatform
from loom.plugins.quant.schemes.base import Dense
from loom.plugins.quant.schemes.fp8 import to_fnuz
from loom.plugins.quant.schemes.int8 import Int8W8A8, merge_ranges
from loom.plugins.quant.schemes.wna16 import AWQLayout, GPTQLayout, PackQuantizedLayout, pack_rows
from quant_reference import activation_qdq, dequantize_dir
from test_quant_fixtures import generate, greedy_equal, logprob_gaps

FIXTURES = Path(__file__).parent / "fixtures" / "quant"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


@pytest.fixture(scope="module")
def pm():
    return PluginManager()


def fixture_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())["quantization_config"]


# ---- selection --------------------------------------------------------------------------------
EXPECTED = {"autoround_w": "auto-round", "autoround_export_gptq": "gptq",
            "autoround_export_awq": "awq", "autoround_export_fp8": "fp8", "gptq_": "gptq",
            "awq_": "awq", "ct_": "compressed-tensors"}


@pytest.mark.parametrize("name", sorted(MANIFEST["fixtures"]))
def test_auto_selects_exactly_one_plugin(pm, name):
    expected = next(v for k, v in EXPECTED.items() if name.startswith(k))
    assert pm.quant_method("auto", fixture_config(name)).name == expected


@pytest.mark.parametrize("config,expected", [
    ({"quant_method": "intel/auto-round", "bits": 4, "group_size": 128,
      "backend": "auto_round:gptq:exllamav2"}, "auto-round"),
    ({"quant_method": "gptq", "bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"}, "gptq"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "fp8"),
])
def test_auto_selects_other_spellings(pm, config, expected):
    assert pm.quant_method("auto", config).name == expected


def test_fp8_by_name_on_an_unquantized_checkpoint_quantizes_while_loading(pm):
    method = pm.quant_method("fp8", None)
    assert method.online and method.for_layer("model.layers.0.mlp.down_proj").weight == "online"


def test_int8_by_name_on_an_unquantized_checkpoint_quantizes_while_loading(pm):
    scheme = pm.quant_method("int8", None).for_layer("model.layers.0.self_attn.qkv_proj")
    assert isinstance(scheme, Int8W8A8) and scheme.weight == "online"
    assert not scheme.static and scheme.symmetric
    assert pm.quant_method("auto", None).name == "none"


@pytest.mark.parametrize("fixture", ["gptq_w4g64_asym", "ct_w8a8_dynamic", "ct_fp8_static"])
def test_int8_by_name_on_a_quantized_checkpoint_is_refused(pm, fixture):
    method = fixture_config(fixture)["quant_method"]
    with pytest.raises(ValueError, match=f"'int8' quantizes an unquantized checkpoint.*already "
                                         f"quantized with quant_method '{method}'.*'auto'"):
        pm.quant_method("int8", fixture_config(fixture))


@pytest.mark.parametrize("name", ["gptq", "awq", "auto-round", "compressed-tensors"])
def test_checkpoint_formats_by_name_need_their_checkpoint(pm, name):
    with pytest.raises(ValueError, match=f"'{name}' needs"):
        pm.quant_method(name, None)


@pytest.mark.parametrize("name,fixture", [("fp8", "ct_fp8_static"), ("gptq", "awq_w4g64"),
                                          ("auto-round", "autoround_export_gptq")])
def test_a_method_named_for_another_format_is_refused(pm, name, fixture):
    with pytest.raises(ValueError, match=f"'{name}' cannot load this checkpoint"):
        pm.quant_method(name, fixture_config(fixture))


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "marlin"),
    ({"quant_method": "gptq", "bits": 4, "lm_head": True}, "lm_head"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "gemv"),
    ({"quant_method": "auto-round", "bits": 4, "packing_format": "auto_round:fp8_static"},
     "fp8_static"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "e5m2"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {
        "g": {"targets": ["Linear"], "weights": {"type": "float", "num_bits": 4}}}}, "float4"),
])
def test_unsupported_variants_are_named(pm, config, message):
    with pytest.raises(ValueError, match=message):
        pm.quant_method("auto", config)


# ---- per-layer choices --------------------------------------------------------------------------
def test_gptq_dynamic_first_match_skips_or_overrides(pm):
    method = pm.quant_method("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                      "dynamic": {"-:.*layers\\.1\\.mlp.*": {},
                                                  "+:.*down_proj": {"bits": 8, "group_size": 64},
                                                  ".*proj": {"bits": 2}}})
    assert isinstance(method.for_layer("model.layers.1.mlp.gate_up_proj"), Dense)
    down = method.for_layer("model.layers.0.mlp.down_proj")
    assert isinstance(down, GPTQLayout) and (down.bits, down.group_size) == (8, 64)
    with pytest.raises(ValueError, match="2-bit"):
        method.for_layer("model.layers.0.self_attn.qkv_proj")


def test_auto_round_overrides_by_name_then_regex_and_blocks(pm):
    method = pm.quant_method("auto", {
        "quant_method": "auto-round", "bits": 4, "group_size": 128,
        "packing_format": "auto_round:auto_awq", "block_name_to_quantize": "model.layers",
        "extra_config": {"model.layers.1.self_attn.o_proj": {"bits": 16},
                         ".*mlp\\.down_proj": {"group_size": 32},
                         "model.layers.1.mlp.down_proj": {"bits": 16}}})
    assert isinstance(method.for_layer("model.layers.1.self_attn.o_proj"), Dense)
    assert isinstance(method.for_layer("model.layers.11.self_attn.o_proj"), AWQLayout)
    assert method.for_layer("model.layers.0.mlp.down_proj").group_size == 32
    assert isinstance(method.for_layer("model.layers.1.mlp.down_proj"), Dense)
    assert isinstance(method.for_layer("model.mtp.0.proj"), Dense)


def test_compressed_tensors_names_before_regex_before_class_and_ignore(pm):
    weights = {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 64}
    method = pm.quant_method("auto", {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "ignore": ["lm_head", "re:.*layers\\.2\\..*"],
        "config_groups": {
            "all": {"targets": ["Linear"], "weights": weights},
            "attn": {"targets": ["re:.*self_attn\\.(q|k|v)_proj$"],
                     "weights": dict(weights, num_bits=8, strategy="channel")}}})
    assert method.for_layer("model.layers.0.self_attn.qkv_proj").bits == 8
    assert method.for_layer("model.layers.0.mlp.down_proj").bits == 4
    assert isinstance(method.for_layer("model.layers.2.mlp.down_proj"), Dense)


def test_fused_parts_quantized_differently_are_an_error(pm):
    method = pm.quant_method("auto", {"quant_method": "awq", "bits": 4, "group_size": 128,
                                      "modules_to_not_convert": ["k_proj"]})
    with pytest.raises(ValueError, match="q_proj, .*k_proj, .*v_proj"):
        method.for_layer("model.layers.0.self_attn.qkv_proj")


def test_fp8_ignored_layers(pm):
    method = pm.quant_method("auto", {"quant_method": "fp8", "weight_block_size": [128, 128],
                                      "ignored_layers": ["model.layers.0.mlp.down_proj"]})
    assert isinstance(method.for_layer("model.layers.0.mlp.down_proj"), Dense)
    assert method.for_layer("model.layers.1.mlp.down_proj").block == (128, 128)


# ---- the platform refuses at start ----------------------------------------------------------
class FakeGpu(CpuPlatform):
    """A CPU that calls itself a GPU without fp8 (an A100) for the quantization checks."""

    name = "fake-a100"
    device_type = "cuda"
    fp8_dtype = None

    def describe(self):
        return "cuda: NVIDIA A100-SXM4-80GB (compute capability 8.0)"


class FakeXpu(FakeGpu):
    name = "fake-xpu"
    device_type = "xpu"

    def describe(self):
        return "xpu: Intel Data Center GPU Max 1550"


class FakePlatforms:
    @hookimpl
    def loom_platforms(self):
        return [FakeGpu, FakeXpu]


def start(name: str, platform: str):
    pm = PluginManager()
    pm.register(FakePlatforms(), name="fake-platforms")
    config = load_config(None, {"model": str(FIXTURES / name), "platform": platform,
                                "dtype": "float32", "max_model_len": 64})
    return Engine(config, plugin_manager=pm)


@pytest.mark.parametrize("name", ["ct_fp8_dynamic", "autoround_export_fp8_block"])
def test_fp8_below_sm89_fails_at_start(name):
    with pytest.raises(ValueError) as error:
        start(name, "fake-a100")
    message = str(error.value)
    assert "A100" in message and "8.9" in message and "weight-only int4/int8" in message
    assert ("'compressed-tensors'" if name.startswith("ct") else "'fp8'") in message


def test_int4_without_triton_fails_at_start(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"'gptq'.*A100.*triton is not installed.*cpu platform"):
        start("gptq_w4g64_asym", "fake-a100")


def test_no_kernel_for_the_device_fails_at_start():
    with pytest.raises(ValueError, match=r"'awq': no int4/int8 weight-only kernel for xpu: Intel"):
        start("awq_w4g64", "fake-xpu")


def test_int8_w8a8_runs_where_fp8_does_not(monkeypatch):
    pm = PluginManager()
    method = pm.quant_method("auto", fixture_config("ct_w8a8_dynamic"))
    method.check_platform(FakeGpu(), torch.bfloat16)


# ---- format details ------------------------------------------------------------------------------
def test_gptq_v1_zeros_with_borrows_decode_exactly():
    """GPTQModel writes v1 zeros by subtracting 0x11111111 from each packed word, so a zero of 0
    borrows from its neighbour; loom adds it back the same way."""
    zeros = torch.tensor([[0, 3, 0, 15, 0, 0, 7, 1], [1, 0, 2, 0, 0, 15, 0, 0]], dtype=torch.int32)
    v1 = pack_rows(zeros.t().contiguous(), 4).t() - 0x11111111
    layer = torch.nn.Module()
    layer.qzeros = torch.nn.Parameter(v1, requires_grad=False)
    layer.qweight = torch.nn.Parameter(torch.zeros(1, 8, dtype=torch.int32), requires_grad=False)
    layer.scales = torch.nn.Parameter(torch.ones(2, 8), requires_grad=False)
    layer.g_idx = torch.full((1, 8), -1, dtype=torch.int32)
    _, _, decoded, _ = GPTQLayout(4, 4, v1=True).canonical(layer)
    assert torch.equal(decoded, zeros)


def test_fnuz_weights_are_worth_the_same():
    w = torch.randn(64, 32).to(torch.float8_e4m3fn)
    w[0, 0] = -0.0
    fnuz, scale = to_fnuz(w, torch.tensor(0.5))
    assert fnuz.dtype == torch.float8_e4m3fnuz
    assert torch.equal(fnuz.float() * scale, w.float() * 0.5)


def test_int8_ranges_of_fused_shards_merge_to_cover_them_all():
    scales, zeros = torch.tensor([0.02, 0.03, 0.02]), torch.tensor([-7.0, 4.0, 0.0])
    scale, zero = merge_ranges(scales, zeros)
    lo, hi = scales * (-128 - zeros), scales * (127 - zeros)
    assert scale * (-128 - zero) <= lo.min() + 1e-6 and scale * (127 - zero) >= hi.max() - 1e-6
    assert merge_ranges(torch.tensor([0.1, 0.3]), None)[0] == 0.3


def test_pack_quantized_weight_shape_is_checked():
    scheme = PackQuantizedLayout(4, 32, symmetric=True, has_g_idx=False)
    from loom.models.layers import Linear
    layer = Linear(64, [16], False, scheme, torch.float32)
    layer.load("weight_packed", torch.zeros(16, 8, dtype=torch.int32), None)
    layer.load("weight_scale", torch.ones(16, 2), None)
    layer.load("weight_shape", torch.tensor([16, 60]), None)
    with pytest.raises(ValueError, match="weight_shape"):
        scheme.process_after_loading(layer)


# ---- whole models without a CPU tool ------------------------------------------------------------
def hf(path: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_fp8_quantized_while_loading(tiny_models):
    path = tiny_models["llama"]
    model = hf(path)
    assert max(logprob_gaps(generate(path, quantization="fp8"), model)) < 0.5
    fp8 = torch.float8_e4m3fn
    for name, module in model.named_modules():
        if name.endswith("proj"):
            w = module.weight.data
            scale = w.abs().amax(1, keepdim=True) / 448
            module.weight.data = (w / scale).to(fp8).float() * scale
            module.register_forward_pre_hook(lambda m, a: (
                (a[0] / (s := a[0].abs().amax(-1, keepdim=True) / 448)).to(fp8).float() * s,))
    gaps = logprob_gaps(generate(path, quantization="fp8"), model)
    assert sum(g < 1e-4 for g in gaps) >= len(gaps) / 2 and max(gaps) < 0.1


def int8_qdq(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x through symmetric int8 with one scale max|x| / 127 per slice along ``dim``."""
    scale = x.abs().amax(dim, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).clamp(-128, 127) * scale


def test_int8_quantized_while_loading(tiny_models):
    """Weights per channel, activations per token, both symmetric int8: greedy tokens and
    log-probs of the model quantized the same way in plain torch; a small but real error
    against the unquantized model (the control that quantization happened)."""
    path = tiny_models["llama"]
    model = hf(path)
    completions = generate(path, quantization="int8")
    gaps = logprob_gaps(completions, model)
    assert 1e-3 < max(gaps) < 0.5
    for name, module in model.named_modules():
        if name.endswith("proj"):
            module.weight.data = int8_qdq(module.weight.data, 1)
            module.register_forward_pre_hook(lambda m, a: (int8_qdq(a[0], -1),))
    assert greedy_equal(completions, model)
    assert max(logprob_gaps(completions, model)) < 1e-4


def test_gptq_settings_in_autogptq_quantize_config_json(tmp_path):
    """An older AutoGPTQ checkpoint: no quantization_config in config.json, its settings in
    quantize_config.json without quant_method; ``auto`` reads it as GPTQ."""
    name = "gptq_w4g32_sym_descact"
    path = tmp_path / name
    shutil.copytree(FIXTURES / name, path)
    config = json.loads((path / "config.json").read_text())
    settings = config.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(config))
    legacy = {k: settings[k] for k in ("bits", "group_size", "desc_act", "sym")}
    legacy |= {"true_sequential": True, "model_name_or_path": None,
               "model_file_base_name": "model"}
    (path / "quantize_config.json").write_text(json.dumps(legacy))
    assert ModelConfig.from_dir(path).quantization_config == legacy | {"quant_method": "gptq"}
    assert generate(path) == generate(FIXTURES / name)


def write_per_tensor_fp8(src: Path, dst: Path, scale_shape: tuple) -> Path:
    """An fp8 per-tensor checkpoint with static input scales (AutoFP8's layout, which no tool
    installable here writes) from an unquantized tiny model: per-shard weight scales differ."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name in [n for n in tensors if n.endswith("proj.weight")]:
        w = tensors.pop(name).float()
        scale = w.abs().max() / 448
        layer = name[: -len(".weight")]
        tensors[name] = (w / scale).to(torch.float8_e4m3fn)
        tensors[f"{layer}.weight_scale"] = scale.reshape(scale_shape)
        tensors[f"{layer}.input_scale"] = torch.tensor(0.03).reshape(scale_shape)
    save_file(tensors, dst / "model.safetensors", {"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("scale_shape", [(), (1,), (1, 1)])
def test_fp8_per_tensor_static_checkpoint(tiny_models, tmp_path, scale_shape):
    path = write_per_tensor_fp8(tiny_models["llama"], tmp_path / "fp8", scale_shape)
    model = hf(dequantize_dir(path, tmp_path / "ref"))
    for layer, qdq in activation_qdq(path).items():
        model.get_submodule(layer).register_forward_pre_hook(lambda m, a, qdq=qdq: (qdq(a[0]),))
    gaps = logprob_gaps(generate(path), model)
    assert sum(g < 1e-4 for g in gaps) >= len(gaps) / 2 and max(gaps) < 0.1


# ---- the conformance kit on these methods --------------------------------------------------------
KIT_CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 32},
    "compressed-tensors": {"quant_method": "compressed-tensors", "config_groups": {
        "w4a16": {"targets": ["re:.*down_proj"], "format": "pack-quantized",
                  "weights": {"type": "int", "num_bits": 4, "strategy": "group",
                              "group_size": 64, "symmetric": False}},
        "w8a8": {"targets": ["Linear"], "format": "int-quantized",
                 "weights": {"type": "int", "num_bits": 8, "strategy": "tensor"},
                 "input_activations": {"type": "int", "num_bits": 8, "strategy": "tensor",
                                       "dynamic": False, "symmetric": False}}}},
    "fp8": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    "int8": None,   # quantizes an unquantized checkpoint while loading
}


@pytest.mark.parametrize("name", KIT_CONFIGS)
def test_conformance_kit(name, tmp_path):
    """``pytest --pyargs loom.testing --loom-quant NAME --loom-quant-config JSON``."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--pyargs", "loom.testing", "-q", "-p", "no:cacheprovider",
         "--loom-quant", name, "--loom-quant-config", json.dumps(KIT_CONFIGS[name])],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "LOOM_PLUGINS"})
    assert proc.returncode == 0 and "7 passed" in proc.stdout, proc.stdout[-3000:]


def test_weight_bytes_count_quantized_buffers(tiny_models):
    """The roofline's bytes per step include weights that quantized layers keep in buffers."""
    from loom import LLM
    path = tiny_models["llama"]
    full = LLM(str(path), kv_cache_memory_gb=0.05).engine.executor.runner
    int8 = LLM(str(path), quantization="int8", kv_cache_memory_gb=0.05).engine.executor.runner
    linear = sum(m.weight.numel() for n, m in full.model.named_modules()
                 if n.endswith("proj") and hasattr(m, "weight"))   # the head stays float
    # float32 linears -> int8 (+ per-channel scales): about 3 bytes a weight fewer
    saved = full.weight_bytes - int8.weight_bytes
    assert 2.9 * linear < saved < 3.0 * linear
