"""Shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

# name -> (build_tiny_model arch, keyword arguments)
TINY_MODELS = {
    "llama": ("llama", {}),
    "llama3": ("llama3", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_sharded": ("llama", {"max_shard_size": "100KB"}),
}


class TinyModels:
    """Tiny HF model directories by name (see TINY_MODELS), each built on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.paths:
            from loom.demo_model import build_tiny_model
            arch, kwargs = TINY_MODELS[name]
            self.paths[name] = build_tiny_model(self.root / name, arch, **kwargs)
        return self.paths[name]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(params=list(TINY_MODELS))
def tiny_model_name(request) -> str:
    """Each name of TINY_MODELS in turn."""
    return request.param
