"""A plugin registered from a test module (pm.register) is selected by name from YAML."""
import os
import subprocess
import sys
from pathlib import Path

from loom import SamplingParams
from loom.config import load_config
from loom.engine import Engine
from loom.hookspecs import hookimpl
from loom.plugin_manager import PluginManager
from loom.plugins.attention.torch_ref import TorchRefAttention
from loom.plugins.quant.unquantized import Unquantized


class CountingAttention(TorchRefAttention):
    name = "counting"
    calls = 0

    def forward(self, q, k, v, kv_cache, metadata):
        CountingAttention.calls += 1
        return super().forward(q, k, v, kv_cache, metadata)


class CountingLinear(Unquantized):
    name = "counting-linear"
    applied = 0

    def apply(self, layer, x, bias):
        CountingLinear.applied += 1
        return super().apply(layer, x, bias)


class TestPlugin:
    @hookimpl
    def loom_attention_backends(self):
        return [CountingAttention]

    @hookimpl
    def loom_quant_methods(self):
        return [CountingLinear]


def test_registered_plugin_selected_from_yaml(tiny_models, tmp_path):
    path = tiny_models["llama"]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"model: {path}\ndtype: float32\nmax-model-len: 128\n"
                         "attention-backend: counting\nquantization: counting-linear\n")
    pm = PluginManager()
    pm.register(TestPlugin(), name="test-plugin")
    engine = Engine(load_config(yaml_file), plugin_manager=pm)
    builtin = Engine(load_config(yaml_file, {"attention_backend": "torch", "quantization": "none"}),
                     plugin_manager=PluginManager())
    params = SamplingParams(temperature=0, max_tokens=6)
    results = []
    for eng in (engine, builtin):
        eng.add_request("Once upon a time", params, request_id="r")
        out = None
        while eng.has_unfinished_requests():
            out = eng.step() or out
        results.append(out[0].outputs[0].token_ids)
    assert CountingAttention.calls > 0 and CountingLinear.applied > 0
    assert results[0] == results[1]


def test_demo_config_runs_from_the_cli(tmp_path):
    env = os.environ | {"LOOM_CACHE_DIR": str(tmp_path)}
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    proc = subprocess.run([sys.executable, "-m", "loom.cli", "generate", "--config",
                           str(demo), "--max-tokens", "8", "--json", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 3
    assert (tmp_path / "demo-llama-v1" / "config.json").is_file()
