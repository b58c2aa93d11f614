"""Third-party plugins: the conformance kit on loom's built-ins and on the example package, the
example package end to end, and the contract (documented, versioned, deprecations)."""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom import SamplingParams, hookimpl, hookspecs
from loom.attention import AttentionBackend
from loom.config import load_config
from loom.engine import Engine
from loom.hookspecs import LOOM_PLUGIN_API, LoomDeprecationWarning, Moved
from loom.platform import Platform
from loom.plugin_manager import PluginManager, reset_plugin_manager
from loom.quant import QuantMethod

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugins.md"
EXAMPLE_DIST = "loom-example-plugin"


def run_kit(tmp_path, *args, env=None, extra_path=None):
    """``pytest --pyargs loom.testing ARGS`` in a fresh process; (returncode, outcomes by test
    id, output)."""
    env = {**os.environ, **(env or {})}
    env.pop("LOOM_PLUGINS", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path),
                                                          env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "loom.testing", "-rA",
                           "-p", "no:cacheprovider", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    outcomes = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"(PASSED|FAILED|SKIPPED|ERROR) \S*::(\S+)", line)
        if m:
            outcomes[m.group(2)] = m.group(1)
    return proc.returncode, outcomes, proc.stdout + proc.stderr


def assert_all_passed(rc, outcomes, output, at_least):
    failed = {t: o for t, o in outcomes.items() if o in ("FAILED", "ERROR")}
    assert rc == 0 and not failed, f"{failed}\n{output[-4000:]}"
    passed = sum(o == "PASSED" for o in outcomes.values())
    assert passed >= at_least, output[-4000:]


# ---- the kit on loom's built-ins ---------------------------------------------------------------
def test_kit_passes_on_builtins(tmp_path):
    rc, outcomes, output = run_kit(tmp_path, "--loom-platform", "cpu", "--loom-attention", "torch",
                                   "--loom-quant", "none")
    assert_all_passed(rc, outcomes, output, at_least=30)
    assert "loom conformance kit: platform cpu; attention torch; quant none" in output
    assert outcomes["test_mixed_batch[torch-block_boundaries-gqa]"] == "PASSED"
    assert outcomes["test_dist_backend"] == "PASSED"
    assert outcomes["test_apply_matches_dequantized_matmul[none-fused-bias]"] == "PASSED"


def test_kit_passes_on_triton_interpreted(tmp_path):
    pytest.importorskip("triton")
    # bf16 is left out: triton's interpreter multiplies bf16 dot operands as raw bits
    # (triton-lang/triton#11584; tests/triton_interpreter.py patches it for loom's own tests).
    rc, outcomes, output = run_kit(tmp_path, "--loom-attention", "triton", "--loom-dtype",
                                   "float32", "--loom-dtype", "float16",
                                   env={"TRITON_INTERPRET": "1"})
    assert_all_passed(rc, outcomes, output, at_least=20)
    assert outcomes["test_graph_safe_decode[triton]"] == "PASSED"


MUTANTS = '''
"""Attention backends and a quant method each breaking one rule the kit checks."""
import torch
import torch.nn.functional as F
from torch import nn

from loom import hookimpl
from loom.ops import write_kv
from loom.plugins.attention.torch_ref import TorchRefAttention, gather_kv
from loom.quant import QuantMethod


class WrongGroups(TorchRefAttention):
    """Maps query head h to KV head h % num_kv_heads: right for MHA and MQA only."""
    name = "wrong-groups"

    def forward(self, q, k, v, kv_cache, metadata):
        write_kv(kv_cache, k, v, metadata.slot_mapping)
        out = torch.zeros_like(q)
        starts = metadata.query_start_loc_cpu.tolist()
        for i, seq_len in enumerate(metadata.seq_lens_cpu.tolist()):
            s, e = starts[i], starts[i + 1]
            if e > s:
                keys, values = gather_kv(kv_cache, metadata.block_tables[i], seq_len)
                group = self.num_heads // self.num_kv_heads
                keys, values = keys.repeat(1, group, 1), values.repeat(1, group, 1)
                mask = torch.ones(e - s, seq_len, dtype=torch.bool).tril(seq_len - (e - s))
                out[s:e] = F.scaled_dot_product_attention(
                    q[s:e].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                    attn_mask=mask, scale=self.scale).transpose(0, 1)
        return out


class TidyWrites(TorchRefAttention):
    """Right outputs, but zeroes the unused tail of each sequence's last block."""
    name = "tidy-writes"

    def forward(self, q, k, v, kv_cache, metadata):
        out = super().forward(q, k, v, kv_cache, metadata)
        size = metadata.block_size
        for i, seq_len in enumerate(metadata.seq_lens_cpu.tolist()):
            if seq_len % size:
                block = int(metadata.block_tables[i, seq_len // size])
                kv_cache[:, block, seq_len % size:] = 0
        return out


class ClaimsGraphs(TorchRefAttention):
    """Claims supports_graphs, but its decode path reads per-step host values."""
    name = "claims-graphs"
    supports_graphs = True


class ForgetsShards(QuantMethod):
    """Loads every shard of a fused linear at offset 0."""
    name = "forgets-shards"

    def create_weights(self, layer, input_size, output_sizes, bias, params_dtype):
        weight = torch.zeros(sum(output_sizes), input_size, dtype=params_dtype)
        layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))
        b = torch.zeros(sum(output_sizes), dtype=params_dtype) if bias else None
        layer.register_parameter("bias", nn.Parameter(b, requires_grad=False) if bias else None)

    def load(self, layer, param_name, loaded, shard_id):
        getattr(layer, param_name).data[:loaded.shape[0]].copy_(loaded)

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)


@hookimpl
def loom_attention_backends():
    return [WrongGroups, TidyWrites, ClaimsGraphs]


@hookimpl
def loom_quant_methods():
    return [ForgetsShards]
'''


def test_kit_fails_plugins_that_break_the_contract(tmp_path):
    (tmp_path / "kit_mutants.py").write_text(MUTANTS)
    rc, outcomes, output = run_kit(
        tmp_path, "--loom-plugin", "kit_mutants", "--loom-attention", "wrong-groups",
        "--loom-attention", "tidy-writes", "--loom-attention", "claims-graphs",
        "--loom-quant", "forgets-shards", "-k", "mixed_batch or graph_safe or apply or refuses",
        extra_path=tmp_path)
    assert rc == 1, output[-4000:]
    for heads, expected in (("mha", "PASSED"), ("gqa", "FAILED"), ("mqa", "PASSED")):
        assert outcomes[f"test_mixed_batch[wrong-groups-decodes_and_chunks-{heads}]"] == expected
    assert outcomes["test_mixed_batch[tidy-writes-decodes_and_chunks-gqa]"] == "FAILED"
    assert "must write those slots (slot_mapping) and nothing else" in output
    assert outcomes["test_graph_safe_decode[claims-graphs]"] == "FAILED"
    assert outcomes["test_apply_matches_dequantized_matmul[forgets-shards-single-bias]"] == "PASSED"
    assert outcomes["test_apply_matches_dequantized_matmul[forgets-shards-fused-bias]"] == "FAILED"
    assert outcomes["test_load_refuses_a_wrongly_shaped_tensor[forgets-shards]"] == "FAILED"


def test_kit_usage_errors(tmp_path):
    rc, _, output = run_kit(tmp_path, "--loom-attention", "nope")
    assert rc == 4
    assert "loom conformance kit: unknown attention backend 'nope'; registered: " in output
    rc, outcomes, output = run_kit(tmp_path)
    assert rc == 0 and not outcomes and re.search(r"\n=+ \d+ skipped in ", output), output
    assert "no --loom-attention NAME given" in output


# ---- the example package -----------------------------------------------------------------
@pytest.fixture(scope="module")
def example():
    """loom-example-plugin, installed with pip (.ci/run does, after loom)."""
    try:
        metadata.distribution(EXAMPLE_DIST)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{EXAMPLE_DIST} is not installed: pip install ./examples/loom-example-plugin")
    return importlib.import_module("loom_example_plugin")


def test_example_is_listed_by_loom_plugins(example, capsys, monkeypatch):
    from loom.cli import main

    monkeypatch.delenv("LOOM_PLUGINS", raising=False)
    reset_plugin_manager()
    try:
        assert main(["plugins"]) == 0
    finally:
        reset_plugin_manager()
    report = capsys.readouterr().out
    version = metadata.version(EXAMPLE_DIST)
    assert (f"example  third-party  {EXAMPLE_DIST} {version}  built for API "
            f"{example.LOOM_PLUGIN_API}  module loom_example_plugin") in report
    listed = report.split("example  third-party", 1)[1]
    for line in ("platform: example-cpu", "attention backend: example-sdpa",
                 "quant method: example-int8"):
        assert f"    {line}" in listed


def test_example_runs_the_kit(example, tmp_path):
    rc, outcomes, output = run_kit(
        tmp_path, "--loom-platform", "example-cpu", "--loom-attention", "example-sdpa",
        "--loom-quant", "example-int8", "--loom-quant-config",
        json.dumps({"quant_method": "example-int8"}))
    assert_all_passed(rc, outcomes, output, at_least=30)


def _dequantized_twin(int8_dir: Path, dst: Path, dequantize) -> Path:
    """A float checkpoint holding exactly the weights the int8 one represents."""
    dst.mkdir()
    tensors = load_file(str(int8_dir / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".weight_scale")]:
        weight = name.removesuffix("_scale")
        tensors[weight] = dequantize(tensors[weight], tensors.pop(name))
    save_file(tensors, str(dst / "model.safetensors"))
    for file in int8_dir.iterdir():
        if file.suffix != ".safetensors":
            (dst / file.name).write_bytes(file.read_bytes())
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _greedy(config, prompts):
    engine = Engine(config, plugin_manager=PluginManager())
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=str(i))
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step() or []:
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return engine, [tokens[str(i)] for i in range(len(prompts))]


def test_example_yaml_end_to_end_equals_the_builtin_path(example, tiny_models, tmp_path,
                                                         monkeypatch):
    """The shipped YAML (example-cpu, example-sdpa, example-int8) on an int8 checkpoint, and on
    the float one quantized as it loads, against cpu/torch/none on the dequantized weights."""
    from loom_example_plugin.quant import dequantize_weight, quantize_checkpoint

    monkeypatch.delenv("LOOM_PLUGINS", raising=False)
    src = tiny_models["llama"]
    int8_dir = quantize_checkpoint(src, tmp_path / "int8")
    twin = _dequantized_twin(int8_dir, tmp_path / "twin", dequantize_weight)
    yaml_file = example.config_path()
    prompts = ["Once upon a time", "The capital of France is", "a b c"]
    engine, from_int8 = _greedy(load_config(yaml_file, {"model": str(int8_dir)}), prompts)
    assert engine.platform.name == "example-cpu"
    runner = engine.executor.runner
    assert runner.attn.name == "example-sdpa"
    assert runner.kv_caches[0].shape[1] == 2           # its own layout: [blocks, 2, KVH, bs, D]
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant_method.name == "example-int8" and qkv.weight.dtype == torch.int8
    _, quantized_on_load = _greedy(load_config(yaml_file, {"model": str(src)}), prompts)
    _, builtin = _greedy(load_config(yaml_file, {"model": str(twin), "platform": "cpu",
                                                 "attention_backend": "torch",
                                                 "quantization": "none"}), prompts)
    assert from_int8 == builtin
    assert quantized_on_load == builtin


# ---- the contract --------------------------------------------------------------------------
def _hookspecs() -> dict[str, types.FunctionType]:
    return {n: f for n, f in vars(hookspecs).items() if n.startswith("loom_") and callable(f)
            and hasattr(f, "loom_spec")}


def test_every_hook_is_documented_with_signature_and_example():
    """docs/plugins.md has a section per hook, headed by its signature, with an example."""
    text = DOCS.read_text()
    sections = dict(re.findall(r"^### `(loom_\w+\(.*?\))`\n(.*?)(?=^##)", text + "\n##",
                               re.M | re.S))
    documented = {sig.split("(")[0]: (sig, body) for sig, body in sections.items()}
    specs = _hookspecs()
    assert set(documented) == set(specs), "docs/plugins.md hooks != hookspecs.py hooks"
    for name, fn in specs.items():
        sig, body = documented[name]
        assert sig == f"{name}{inspect.signature(fn)}", f"{name}: documented as {sig}"
        assert "@hookimpl" in body and f"def {name}" in body, f"{name}: no example"


def test_docs_name_the_current_api_and_every_moved_name():
    text = DOCS.read_text()
    assert f"`LOOM_PLUGIN_API = \"{LOOM_PLUGIN_API}\"`" in text
    for moved in hookspecs.MOVED:
        assert f"`{moved.old}`" in text and f"`{moved.new}`" in text


def test_moved_names_live_one_minor_version():
    """An alias added when a name moves in API 1.N is removed in 1.N+1."""
    for moved in hookspecs.MOVED:
        assert moved.since == LOOM_PLUGIN_API, (
            f"{moved.old} moved in API {moved.since}: remove its alias now that the API is "
            f"{LOOM_PLUGIN_API}")


# What API 1.0 promised (a minor version may add, never remove: a test per promise).
HOOKS_1_0 = {"loom_platforms": (), "loom_attention_backends": (), "loom_quant_methods": (),
             "loom_fused_ops": (), "loom_model_architectures": ()}
INTERFACES_1_0 = {
    Platform: ("name", "device_type", "dist_backend", "supported_dtypes", "fp8_dtype",
               "supports_graphs", "default_attention_backends", "default_fused_ops",
               "auto_priority", "default_kv_cache_gb", "is_available", "device", "set_device",
               "memory_info", "synchronize", "empty_cache", "peak_memory_allocated",
               "reset_peak_memory_stats", "memory_allocated", "preferred_dtype", "graph_capture",
               "make_graph", "graph_pool", "capture", "describe"),
    AttentionBackend: ("name", "supported_dtypes", "required_block_size", "supports_graphs",
                       "is_supported", "kv_cache_shape", "build_metadata", "forward"),
    QuantMethod: ("name", "matches", "from_config", "check_platform", "for_layer",
                  "create_weights", "load", "process_after_loading", "apply",
                  "checkpoint_names"),
}
ADDED_1_1 = {QuantMethod: ("quantize", "dequantize")}
ADDED_1_2 = {QuantMethod: ("rank_index",)}


def test_the_contract_only_grows():
    moved = {m.old for m in hookspecs.MOVED}
    specs = _hookspecs()
    for hook, args in HOOKS_1_0.items():
        assert hook in specs or hook in moved, f"hook {hook} was removed"
        if hook in specs:
            assert set(args) <= set(inspect.signature(specs[hook]).parameters), hook
    for promised in (INTERFACES_1_0, ADDED_1_1, ADDED_1_2):
        for iface, members in promised.items():
            for member in members:
                assert hasattr(iface, member) or f"{iface.__name__}.{member}" in moved, (
                    f"{iface.__name__}.{member} was removed")


@pytest.fixture
def moved(monkeypatch):
    """Pretend these names moved in the current API."""
    entries = (Moved("loom_attention_impls", "loom_attention_backends", LOOM_PLUGIN_API),
               Moved("AttentionBackend.get_kv_cache_shape", "AttentionBackend.kv_cache_shape",
                     LOOM_PLUGIN_API),
               Moved("loom.attention.Metadata", "loom.attention.AttentionMetadata",
                     LOOM_PLUGIN_API))
    monkeypatch.setattr(hookspecs, "MOVED", entries)
    monkeypatch.delenv("LOOM_PLUGINS", raising=False)
    return entries


def test_a_moved_hook_and_member_keep_working_with_a_warning(moved):
    class OldStyle(AttentionBackend):
        name = "old-style"

        @staticmethod
        def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size):
            return (2, num_blocks, block_size, num_kv_heads, head_size)

    class OldPlugin:
        @hookimpl
        def loom_attention_impls(self):
            return [OldStyle]

    pm = PluginManager()
    with pytest.warns(LoomDeprecationWarning) as record:
        pm.register(OldPlugin(), name="old-plugin")
        assert "old-style" in pm.names("attention_backend")
    messages = " | ".join(str(w.message) for w in record)
    assert (f"loom_attention_impls is deprecated since loom plugin API {LOOM_PLUGIN_API}; use "
            "loom_attention_backends") in messages
    assert ("AttentionBackend.get_kv_cache_shape is deprecated since loom plugin API "
            f"{LOOM_PLUGIN_API}; use AttentionBackend.kv_cache_shape (used by "
            "OldStyle of plugin 'old-plugin')") in messages
    assert OldStyle.kv_cache_shape(3, 16, 2, 8) == (2, 3, 16, 2, 8)
    assert pm.owner("attention_backend", "old-style") == "old-plugin"


def test_a_moved_module_attribute_keeps_working_with_a_warning(moved):
    module = types.ModuleType("loom.attention")
    module.__getattr__ = hookspecs.moved_getattr("loom.attention")
    from loom.attention import AttentionMetadata

    with pytest.warns(LoomDeprecationWarning, match="loom.attention.Metadata is deprecated"):
        assert module.Metadata is AttentionMetadata
    with pytest.raises(AttributeError):
        module.Nothing  # noqa: B018


def test_kit_helpers_stay_importable_from_tests():
    """tests/attention_cases.py is the kit's copy, re-exported."""
    import attention_cases

    from loom.testing import attention_cases as kit
    assert attention_cases.build_metadata is kit.build_metadata

