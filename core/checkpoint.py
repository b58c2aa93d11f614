"""A checkpoint tensor as the loader hands it to a layer: a ``torch.Tensor``, or a lazy
safetensors slice (``safe_open(...).get_slice(name)``) that reads only the part asked for, so a
tensor-parallel rank reads its shard and never the whole tensor."""
from __future__ import annotations

import torch


def shape(tensor) -> tuple[int, ...]:
    if isinstance(tensor, torch.Tensor):
        return tuple(tensor.shape)
    return tuple(tensor.get_shape())


def read(tensor, parts: dict[int, slice] | None = None) -> torch.Tensor:
    """The tensor as a ``torch.Tensor``; with ``parts`` ({dim: slice}) only that part of it."""
    if not parts:
        return tensor if isinstance(tensor, torch.Tensor) else tensor[...]
    index = tuple(parts.get(dim, slice(None)) for dim in range(max(parts) + 1))
    return tensor[index]
