"""loom: a plugin-based LLM inference and serving engine."""
from loom.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig",
           "hookimpl", "__version__"]


def __getattr__(name):  # the public surface, imported on first use
    if name == "LLM":
        from loom.llm import LLM
        return LLM
    if name == "SamplingParams":
        from loom.sampling_params import SamplingParams
        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from loom import outputs
        return getattr(outputs, name)
    if name == "EngineConfig":
        from loom.config import EngineConfig
        return EngineConfig
    raise AttributeError(f"module 'loom' has no attribute {name!r}")
