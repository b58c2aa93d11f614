"""EngineConfig: one validated configuration from a YAML file, CLI flags and keyword arguments.

YAML keys are the long CLI flag names (``max-num-seqs: 64`` is ``--max-num-seqs 64``); Python
keyword arguments are the same names with underscores. Precedence: defaults < YAML < flags.
Every error names the key and what is allowed.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8")
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ENGINE_CORE_MODES = ("process", "thread")      # where `loom serve` runs the engine core


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _opt(help: str, *, choices=None, min=None, max=None, min_exclusive=False, cli=True):
    return {"help": help, "choices": choices, "min": min, "max": max,
            "min_exclusive": min_exclusive, "cli": cli}


@dataclass
class EngineConfig:
    model: str = field(default="", metadata=_opt(
        "Hugging Face model directory, or 'loom-demo' for the built-in tiny demo model"))
    tokenizer: str | None = field(default=None, metadata=_opt(
        "tokenizer directory (default: the model directory)"))
    dtype: str = field(default="auto", metadata=_opt(
        "weight and activation dtype; auto = the checkpoint's", choices=DTYPES))
    seed: int = field(default=0, metadata=_opt("seed for requests that give none", min=0))
    max_model_len: int | None = field(default=None, metadata=_opt(
        "longest sequence (prompt + output) in tokens; default: the model's limit", min=1))
    max_num_seqs: int = field(default=256, metadata=_opt(
        "most sequences running in one step", min=1))
    max_num_batched_tokens: int | None = field(default=None, metadata=_opt(
        "token budget of one step (default 8192, or max-model-len without chunked prefill)", min=1))
    enable_chunked_prefill: bool = field(default=True, metadata=_opt(
        "split long prompts across steps, sharing steps with decodes"))
    block_size: int | None = field(default=None, metadata=_opt(
        "tokens per KV-cache block (default 16, or what the attention backend requires)",
        choices=BLOCK_SIZES))
    async_scheduling: bool = field(default=True, metadata=_opt(
        "schedule and launch the next step before this step's tokens reach the host"))
    enable_prefix_caching: bool = field(default=True, metadata=_opt(
        "reuse the KV blocks of shared prompt prefixes"))
    num_gpu_blocks_override: int | None = field(default=None, metadata=_opt(
        "use exactly this many KV-cache blocks", min=1))
    gpu_memory_utilization: float = field(default=0.9, metadata=_opt(
        "share of device memory loom may use (weights, activations, KV cache)",
        min=0.0, max=1.0, min_exclusive=True))
    kv_cache_memory_gb: float | None = field(default=None, metadata=_opt(
        "KV-cache size in GiB (default on the CPU: 2; on GPUs: what gpu-memory-utilization leaves)",
        min=0.0, min_exclusive=True))
    kv_cache_dtype: str = field(default="auto", metadata=_opt(
        "KV-cache dtype", choices=KV_CACHE_DTYPES))
    platform: str = field(default="auto", metadata=_opt(
        "platform plugin: auto, cpu, cuda, rocm or a third-party name"))
    attention_backend: str = field(default="auto", metadata=_opt(
        "attention plugin: auto, torch, triton, flash_attn, flashinfer or a third-party name"))
    fused_ops: str = field(default="auto", metadata=_opt(
        "kernels for RMSNorm, SiLU-and-mul and rotary: auto, torch, triton or a third-party name"))
    quantization: str = field(default="auto", metadata=_opt(
        "quant method: auto (from the checkpoint), none, or a registered name"))
    skip_tokenizer_init: bool = field(default=False, metadata=_opt(
        "load no tokenizer: prompts must be token ids and outputs carry no text"))
    load_format: str = field(default="auto", metadata=_opt(
        "auto/safetensors read the checkpoint; dummy builds random weights from config.json",
        choices=LOAD_FORMATS))
    enforce_eager: bool = field(default=False, metadata=_opt(
        "never capture or replay device graphs"))
    cuda_graph_sizes: list[int] | None = field(default=None, metadata=_opt(
        "decode batch sizes to capture as graphs (default 1 2 4 8 16 24 ... 512)", min=1))
    tensor_parallel_size: int = field(default=1, metadata=_opt(
        "number of ranks the model is sharded across", min=1))
    speculative: dict | None = field(default=None, metadata=_opt(
        "speculative decoding: a mapping (YAML or JSON on the command line), e.g. "
        "{method: ngram, num-speculative-tokens: 4}; keys: method (ngram, draft, oracle), "
        "num-speculative-tokens, prompt-lookup-min/max (ngram), model, quantization, dtype, "
        "load-format (draft), acceptance-rate, seed (oracle)"))

    # ---- derived helpers ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {_flag(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes) -> "EngineConfig":
        return build_config(dataclasses.asdict(self) | changes)


def _flag(name: str) -> str:
    return name.replace("_", "-")


_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


def _base_type(tp):
    """(base type, optional?) for X | None annotations."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"list": list, "dict": dict})  # noqa: S307 - our own annotations
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return inner, True
    return tp, False


def _describe(tp, meta) -> str:
    base = typing.get_origin(tp) or tp
    if meta["choices"]:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             list: "a list of integers", dict: "a mapping"}[base]
    if meta["min"] is not None:
        op = ">" if meta["min_exclusive"] else ">="
        words += f" {op} {meta['min']}"
    if meta["max"] is not None:
        words += f" and <= {meta['max']}"
    return words


def _check_value(name: str, value):
    f = _FIELDS[name]
    tp, optional = _base_type(f.type)
    meta = f.metadata
    allowed = _describe(tp, meta) + (" (or null)" if optional else "")

    def bad():
        return ConfigError(f"config key '{_flag(name)}': expected {allowed}, got {value!r}")

    if value is None:
        if optional:
            return None
        raise bad()
    base = typing.get_origin(tp) or tp
    if base is bool:
        if not isinstance(value, bool):
            raise bad()
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise bad()
    elif base is list:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad()
        if meta["min"] is not None and any(v < meta["min"] for v in value):
            raise bad()
        return list(value)
    elif base is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if meta["choices"] and value not in meta["choices"]:
        raise bad()
    if meta["min"] is not None:
        if value < meta["min"] or (meta["min_exclusive"] and value == meta["min"]):
            raise bad()
    if meta["max"] is not None and value > meta["max"]:
        raise bad()
    return value


def build_config(values: dict) -> EngineConfig:
    """Validate a mapping of keys (dashes or underscores) into an EngineConfig."""
    clean = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            known = [_flag(n) for n in _FIELDS]
            hint = difflib.get_close_matches(_flag(name), known, n=1)
            hint_s = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{_flag(name)}'{hint_s}; known keys: "
                              f"{', '.join(known)}")
        clean[name] = _check_value(name, value)
    config = EngineConfig(**clean)
    _check_relations(config)
    return config


def _check_relations(config: EngineConfig) -> None:
    if not config.model:
        raise ConfigError("config key 'model': required (a model directory or 'loom-demo')")
    if (config.max_num_batched_tokens is not None and config.max_model_len is not None
            and not config.enable_chunked_prefill
            and config.max_num_batched_tokens < config.max_model_len):
        raise ConfigError(
            f"config key 'max-num-batched-tokens': must be >= max-model-len "
            f"({config.max_model_len}) when enable-chunked-prefill is false, got "
            f"{config.max_num_batched_tokens}")
    if config.speculative is not None:
        from loom.spec_decode.config import parse_speculative
        parse_speculative(config.speculative)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of keys to values")
    return data


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> EngineConfig:
    values = read_yaml(path) if path else {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    values.update({k.replace("-", "_"): v for k, v in (overrides or {}).items()})
    return build_config(values)


# ---- CLI flags ------------------------------------------------------------------------------
def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field; flags left out stay absent (the YAML value holds)."""
    group = parser.add_argument_group("engine")
    for name, f in _FIELDS.items():
        if not f.metadata.get("cli", True) or name == "model":
            continue
        tp, _ = _base_type(f.type)
        base = typing.get_origin(tp) or tp
        kwargs: dict = {"help": f.metadata["help"], "default": argparse.SUPPRESS, "dest": name}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is list:
            kwargs.update(nargs="+", type=int)
        elif base is dict:
            kwargs["type"] = _json_mapping(name)
        else:
            kwargs["type"] = _cli_scalar(base, name)
        group.add_argument("--" + _flag(name), **kwargs)


def _cli_scalar(base, name):
    def convert(text: str):
        if base is str:
            return text
        if text.lower() in ("none", "null"):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--{_flag(name)}: expected {_describe(base, _FIELDS[name].metadata)}, got {text!r}")
    return convert


def _json_mapping(name):
    """A mapping given as JSON or YAML (a flow mapping such as '{method: ngram}')."""
    def convert(text: str):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(
                f"--{_flag(name)}: expected a JSON or YAML mapping, got {text!r}")
        return value
    return convert


def engine_overrides(args: argparse.Namespace) -> dict:
    """The engine keys given on the command line (a positional MODEL included)."""
    out = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    if getattr(args, "model_pos", None):
        out["model"] = args.model_pos
    return out
