"""EngineConfig: YAML keys = long flag names, flags override the file, every error names the key."""
import subprocess
import sys

import pytest

from loom.cli import build_parser, config_from_args
from loom.config import ConfigError, EngineConfig, build_config, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_keys_are_flag_names_and_flags_override(tmp_path):
    path = write(tmp_path, "model: m\nmax-num-seqs: 64\nenable-prefix-caching: false\n"
                           "cuda-graph-sizes: [1, 2, 4]\n")
    config = load_config(path)
    assert config.max_num_seqs == 64 and config.enable_prefix_caching is False
    assert config.cuda_graph_sizes == [1, 2, 4]
    args = build_parser().parse_args(["generate", "--config", str(path), "--max-num-seqs", "8",
                                      "--enable-prefix-caching"])
    config = config_from_args(args)
    assert config.max_num_seqs == 8 and config.enable_prefix_caching is True
    assert config.cuda_graph_sizes == [1, 2, 4]      # not given on the command line: file wins


def test_positional_model_overrides_file(tmp_path):
    path = write(tmp_path, "model: from-file\n")
    args = build_parser().parse_args(["generate", "other", "--config", str(path)])
    assert config_from_args(args).model == "other"


def test_python_keywords_use_underscores():
    config = build_config(dict(model="m", dtype="float32", max_model_len=256, max_num_seqs=4,
                               max_num_batched_tokens=8))
    assert isinstance(config, EngineConfig)
    assert (config.max_model_len, config.max_num_batched_tokens) == (256, 8)


@pytest.mark.parametrize("text, match", [
    ("model: m\nmax-num-seqz: 4\n", r"unknown config key 'max-num-seqz' \(did you mean 'max-num-seqs'\?\)"),
    ("model: m\nmax-num-seqs: '64'\n", r"'max-num-seqs': expected an integer >= 1"),
    ("model: m\nmax-num-seqs: 0\n", r"'max-num-seqs': expected an integer >= 1, got 0"),
    ("model: m\nmax-num-seqs: true\n", r"'max-num-seqs': expected an integer"),
    ("model: m\ndtype: float64\n", r"'dtype': expected one of auto, float32, float16, bfloat16"),
    ("model: m\ngpu-memory-utilization: 1.5\n", r"'gpu-memory-utilization': expected a number > 0.0 and <= 1.0"),
    ("model: m\ngpu-memory-utilization: 0\n", r"'gpu-memory-utilization'"),
    ("model: m\nblock-size: 24\n", r"'block-size': expected one of 1, 2, 4, 8, 16"),
    ("model: m\nenable-prefix-caching: 'yes'\n", r"'enable-prefix-caching': expected true or false"),
    ("model: m\ncuda-graph-sizes: [1, -2]\n", r"'cuda-graph-sizes'"),
    ("model: m\nload-format: pt\n", r"'load-format': expected one of auto, safetensors, dummy"),
    ("model: m\nspeculative: 3\n", r"'speculative': expected a mapping"),
    ("max-num-seqs: 4\n", r"'model': required"),
    ("model: m\nmax-model-len: 100\nmax-num-batched-tokens: 50\nenable-chunked-prefill: false\n",
     r"'max-num-batched-tokens': must be >= max-model-len \(100\)"),
    ("- a\n- b\n", r"expected a mapping"),
    ("model: [unclosed\n", r"not valid YAML"),
])
def test_errors_name_the_key_and_what_is_allowed(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--max-num-seqs", "many"])
    assert "--max-num-seqs: expected an integer" in capsys.readouterr().err


def test_cli_print_config(tmp_path):
    path = write(tmp_path, "model: some/dir\nmax-num-seqs: 3\n")
    out = subprocess.run([sys.executable, "-m", "loom.cli", "generate", "--config", str(path),
                          "--block-size", "32", "--print-config"],
                         capture_output=True, text=True, check=True).stdout
    assert "model: some/dir" in out and "max-num-seqs: 3" in out and "block-size: 32" in out


def test_cli_reports_config_errors_without_traceback(tmp_path):
    path = write(tmp_path, "model: m\nmax-num-seqs: -1\n")
    proc = subprocess.run([sys.executable, "-m", "loom.cli", "generate", "--config", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "config key 'max-num-seqs'" in proc.stderr and "Traceback" not in proc.stderr
