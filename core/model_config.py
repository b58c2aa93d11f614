"""ModelConfig: what loom needs from a Hugging Face model directory's config.json.

Reads both the transformers-5 layout (``rope_parameters``, ``dtype``) and the older one
(``rope_theta`` + ``rope_scaling``, ``torch_dtype``). Every error names the field at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from loom.loader import load_generation_config, read_json

ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Model types whose sliding window is only active with use_sliding_window: true.
_OPT_IN_SLIDING = ("qwen2", "qwen3")


@dataclass
class ModelConfig:
    architecture: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None     # {"rope_type": "linear"|"llama3", ...}; None for plain rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool          # bias on q/k/v
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    dtype: torch.dtype
    eos_token_ids: set[int]
    bos_token_id: int | None
    quantization_config: dict | None
    hf_config: dict = field(repr=False)
    model_dir: str | None = None  # where config.json was read; the weights are there too

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"model directory {str(path)!r} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model directory {str(path)!r} has no config.json")
        config = cls.from_dict(read_json(config_file), load_generation_config(path),
                               source=str(config_file))
        config.model_dir = str(path)
        if config.quantization_config is None:
            config.quantization_config = _legacy_quantize_config(path)
        return config

    @classmethod
    def from_dict(cls, hf: dict, generation_config: dict | None = None,
                  source: str = "config.json") -> "ModelConfig":
        get = _Getter(hf, source)
        architectures = get("architectures", list)
        if not architectures:
            raise ValueError(f"{source}: field 'architectures' is empty")
        model_type = get("model_type", str, "")
        hidden_size = get("hidden_size", int)
        num_heads = get("num_attention_heads", int)
        if get("hidden_act", str, "silu") != "silu":
            raise ValueError(f"{source}: field 'hidden_act' is {hf['hidden_act']!r}; "
                             "supported: silu")
        rope_theta, rope_scaling = _parse_rope(hf, source)
        max_position = get("max_position_embeddings", int, 2048)
        attention_bias = get("attention_bias", bool, False)
        return cls(
            architecture=architectures[0],
            model_type=model_type,
            hidden_size=hidden_size,
            num_hidden_layers=get("num_hidden_layers", int),
            num_attention_heads=num_heads,
            num_key_value_heads=get("num_key_value_heads", int, num_heads),
            head_dim=get("head_dim", int, hidden_size // num_heads),
            intermediate_size=get("intermediate_size", int),
            vocab_size=get("vocab_size", int),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_position,
            tie_word_embeddings=get("tie_word_embeddings", bool, False),
            attention_bias=attention_bias or model_type == "qwen2",
            o_proj_bias=attention_bias and model_type != "qwen2",
            mlp_bias=get("mlp_bias", bool, False),
            qk_norm=model_type == "qwen3",
            sliding_window=_sliding_window(get, model_type, max_position),
            dtype=_parse_dtype(hf, source),
            eos_token_ids=_token_ids(hf, source) | _token_ids(generation_config or {},
                                                             "generation_config.json"),
            bos_token_id=get("bos_token_id", int, None),
            quantization_config=get("quantization_config", dict, None),
            hf_config=hf,
        )


def _legacy_quantize_config(path: Path) -> dict | None:
    """AutoGPTQ's quantize_config.json, which older GPTQ checkpoints have instead of a
    quantization_config in config.json; without quant_method it is GPTQ when it has bits and
    group_size."""
    file = path / "quantize_config.json"
    if not file.is_file():
        return None
    config = read_json(file)
    if "quant_method" not in config and "bits" in config and "group_size" in config:
        config["quant_method"] = "gptq"
    return config


class _Getter:
    """Typed access to config fields; a missing required or mistyped field is a ValueError."""
    _REQUIRED = object()

    def __init__(self, hf: dict, source: str):
        self.hf, self.source = hf, source

    def __call__(self, key: str, typ: type, default=_REQUIRED):
        value = self.hf.get(key)
        if value is None:
            if default is self._REQUIRED:
                raise ValueError(f"{self.source}: required field {key!r} is missing")
            return default
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"{self.source}: field {key!r} must be of type {typ.__name__}, "
                             f"got {value!r}")
        return value


def _parse_rope(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    if isinstance(hf.get("rope_parameters"), dict):
        key, params = "rope_parameters", dict(hf["rope_parameters"])
    else:
        key, params = "rope_scaling", dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{source}: field {key!r} has unsupported rope type {rope_type!r}; "
                         f"supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    missing = [k for k in _ROPE_KEYS[rope_type] if params.get(k) is None]
    if missing:
        raise ValueError(f"{source}: field {key!r} ({rope_type} rope) lacks "
                         f"{', '.join(missing)}")
    return theta, {"rope_type": rope_type, **params}


def _parse_dtype(hf: dict, source: str) -> torch.dtype:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"{source}: field 'dtype' is {name!r}; supported: "
                         f"{', '.join(_DTYPES)}")
    return _DTYPES[name]


def _sliding_window(get: _Getter, model_type: str, max_position: int) -> int | None:
    window = get("sliding_window", int, None)
    if model_type in _OPT_IN_SLIDING and not get("use_sliding_window", bool, False):
        return None
    # A window as long as the context never slides.
    return window if window is not None and window < max_position else None


def _token_ids(config: dict, source: str) -> set[int]:
    value = config.get("eos_token_id")
    if value is None:
        return set()
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{source}: field 'eos_token_id' must be an integer or a list of "
                         f"integers, got {value!r}")
    return set(ids)
