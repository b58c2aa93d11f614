"""SpeculativeConfig: the ``speculative:`` mapping of the engine config, validated.

Keys are dashed like every config key (``num-speculative-tokens: 4``; underscores work too).
Every error names the key as ``speculative.<key>`` and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass

from loom.config import DTYPES, LOAD_FORMATS, ConfigError

METHODS = ("ngram", "draft", "oracle")
MAX_SPECULATIVE_TOKENS = 32
# key -> the methods that take it (None: every method)
KEYS = {
    "method": None,
    "num-speculative-tokens": None,
    "prompt-lookup-min": ("ngram",),
    "prompt-lookup-max": ("ngram",),
    "model": ("draft",),
    "quantization": ("draft",),
    "dtype": ("draft",),
    "load-format": ("draft",),
    "acceptance-rate": ("oracle",),
    "force-path": ("oracle",),
    "seed": ("oracle",),
}
DEFAULT_LOOKUP_MIN = 2
DEFAULT_LOOKUP_MAX = 5


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str                              # ngram | draft | oracle
    num_speculative_tokens: int              # k: tokens proposed per step and request
    prompt_lookup_min: int = DEFAULT_LOOKUP_MIN   # ngram: shortest suffix n-gram matched
    prompt_lookup_max: int = DEFAULT_LOOKUP_MAX   # ngram: longest
    model: str | None = None                 # draft: the draft model's directory
    quantization: str = "auto"               # draft: its quant method
    dtype: str = "auto"                      # draft: its dtype; auto = the target's
    load_format: str | None = None           # draft: None = the engine's load-format
    acceptance_rate: float = 1.0             # oracle: chance that a proposed token is right
    seed: int = 0                            # oracle: seed of its deliberate errors
    force_path: bool = False                 # oracle: emit the recorded path (benchmarks)


def _bad(key: str, allowed: str, value) -> ConfigError:
    return ConfigError(f"config key 'speculative.{key}': expected {allowed}, got {value!r}")


def _int(values: dict, key: str, low: int, high: int | None = None) -> int:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        allowed = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
        raise _bad(key, allowed, value)
    return value


def _choice(values: dict, key: str, choices: tuple[str, ...]) -> str:
    value = values[key]
    if value not in choices:
        raise _bad(key, "one of " + ", ".join(choices), value)
    return value


def parse_speculative(mapping: dict) -> SpeculativeConfig:
    """Validate the ``speculative`` mapping (keys dashed or underscored)."""
    values = {str(k).replace("_", "-"): v for k, v in mapping.items()}
    for key in values:
        if key not in KEYS:
            raise ConfigError(f"unknown config key 'speculative.{key}'; known keys: "
                              f"{', '.join(KEYS)}")
    if "method" not in values:
        raise ConfigError("config key 'speculative.method': required (one of "
                          f"{', '.join(METHODS)})")
    method = _choice(values, "method", METHODS)
    for key, methods in KEYS.items():
        if key in values and methods is not None and method not in methods:
            raise ConfigError(f"config key 'speculative.{key}': only for method "
                              f"{' or '.join(methods)}, not {method}")
    if "num-speculative-tokens" not in values:
        raise ConfigError("config key 'speculative.num-speculative-tokens': required (an "
                          f"integer >= 1 and <= {MAX_SPECULATIVE_TOKENS})")
    out = {"method": method, "num_speculative_tokens": _int(
        values, "num-speculative-tokens", 1, MAX_SPECULATIVE_TOKENS)}
    if method == "ngram":
        out.update(_lookup_range(values))
    elif method == "draft":
        out.update(_draft(values))
    else:
        out.update(_oracle(values))
    return SpeculativeConfig(**out)


def _lookup_range(values: dict) -> dict:
    low = _int(values, "prompt-lookup-min", 1) if "prompt-lookup-min" in values else None
    high = _int(values, "prompt-lookup-max", 1) if "prompt-lookup-max" in values else None
    if low is None:
        low = min(DEFAULT_LOOKUP_MIN, high or DEFAULT_LOOKUP_MIN)
    if high is None:
        high = max(DEFAULT_LOOKUP_MAX, low)
    if low > high:
        raise _bad("prompt-lookup-min", f"<= prompt-lookup-max ({high})", low)
    return {"prompt_lookup_min": low, "prompt_lookup_max": high}


def _draft(values: dict) -> dict:
    model = values.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "a model directory (required for method draft)", model)
    out = {"model": model}
    if "quantization" in values:
        if not isinstance(values["quantization"], str):
            raise _bad("quantization", "a string (auto, none or a quant method name)",
                       values["quantization"])
        out["quantization"] = values["quantization"]
    if "dtype" in values:
        out["dtype"] = _choice(values, "dtype", DTYPES)
    if "load-format" in values:
        out["load_format"] = _choice(values, "load-format", LOAD_FORMATS)
    return out


def _oracle(values: dict) -> dict:
    out = {}
    if "acceptance-rate" in values:
        rate = values["acceptance-rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise _bad("acceptance-rate", "a number in [0, 1]", rate)
        out["acceptance_rate"] = float(rate)
    if "force-path" in values:
        if not isinstance(values["force-path"], bool):
            raise _bad("force-path", "true or false", values["force-path"])
        out["force_path"] = values["force-path"]
    if "seed" in values:
        out["seed"] = _int(values, "seed", 0)
    return out
