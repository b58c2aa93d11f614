"""Hugging Face model directories: tokenizer, generation_config, safetensors weights, model build.

Every error names the directory or file at fault.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from loom.models.layers import Linear

if TYPE_CHECKING:
    from loom.model_config import ModelConfig
    from loom.quant import QuantMethod

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
SAFETENSORS_INDEX = "model.safetensors.index.json"
LOAD_FORMATS = ("auto", "safetensors", "dummy")


def read_json(file: Path) -> dict:
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


def load_generation_config(path: str | Path) -> dict:
    """The model's generation_config.json as a dict; empty when there is none."""
    file = Path(path) / "generation_config.json"
    return read_json(file) if file.is_file() else {}


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer of a local directory (its chat template included)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory {str(path)!r} does not exist")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"tokenizer directory {str(path)!r} has no tokenizer files "
                         f"(looked for {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer in {str(path)!r}: {e}") from None


def safetensors_files(path: str | Path) -> list[Path]:
    """The checkpoint's files: those of the shard index, else every *.safetensors file."""
    path = Path(path)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise ValueError(f"{index} lists {file.name}, which does not exist")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors weights")
    return files


def iterate_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the checkpoint, on the CPU, file by file."""
    for name, lazy in iterate_slices(path):
        yield name, lazy[...]


def iterate_slices(path: str | Path) -> Iterator[tuple[str, object]]:
    """Every (name, lazy safetensors slice) of the checkpoint, file by file: the consumer reads
    what it needs of each (see loom.checkpoint) before asking for the next."""
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_slice(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: not a valid safetensors file ({e})") from None


def load_model(model_config: "ModelConfig", model_cls: type[nn.Module],
               quant_method: "QuantMethod", attn_backend, dtype: torch.dtype,
               device: torch.device | str, load_format: str = "auto", seed: int = 0) -> nn.Module:
    """Build ``model_cls`` on ``device`` in ``dtype``, fill its weights and prepare them.

    The checkpoint is read from ``model_config.model_dir``; ``dummy`` fills random weights
    instead, deterministic for a ``seed``. Returns the model in eval mode.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r}; supported: {', '.join(LOAD_FORMATS)}")
    with torch.device(device), _default_dtype(dtype):
        model = model_cls(model_config, quant_method, attn_backend)
    model.requires_grad_(False)
    if load_format == "dummy":
        fill_dummy_weights(model, seed)
    else:
        path = model_config.model_dir
        if path is None:
            raise ValueError(f"load_format {load_format!r} needs a ModelConfig read from a "
                             "model directory (ModelConfig.from_dir)")
        loaded = model.load_weights(iterate_slices(path))
        missing = sorted(set(dict(model.named_parameters())) - set(loaded))
        if missing:
            raise ValueError(f"checkpoint in {str(path)!r} lacks {len(missing)} parameters of "
                             f"{model_config.architecture}: {', '.join(missing[:10])}")
    for module in model.modules():
        if isinstance(module, Linear):
            module.quant_method.process_after_loading(module)
    return model.eval()


def fill_dummy_weights(model: nn.Module, seed: int) -> None:
    """Uniform in ±1/sqrt(last dim) for floating parameters, except 1 for those of modules
    named *norm*; integer (packed) parameters uniform over their dtype."""
    generator = None
    for name, param in model.named_parameters():
        if generator is None or generator.device != param.device:
            generator = torch.Generator(param.device).manual_seed(seed)
        data = param.data
        module_name = name.rpartition(".")[0]
        if "norm" in module_name.rpartition(".")[2]:
            data.fill_(1.0)
        elif data.is_floating_point():
            bound = 1.0 / math.sqrt(data.shape[-1])
            data.copy_(torch.rand(data.shape, generator=generator, device=data.device)
                       .mul_(2 * bound).sub_(bound))
        else:
            info = torch.iinfo(data.dtype)
            data.copy_(torch.randint(info.min, info.max, data.shape, generator=generator,
                                     device=data.device, dtype=data.dtype))


@contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)
