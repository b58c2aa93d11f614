"""A context in which the objects alive at its start are out of the garbage collector's reach.

A full collection scans every tracked object; with torch, transformers and a model loaded that
stalls the host for 100+ ms, every few seconds while a loop of steps allocates (measured on the
server, benchmarks/server_frontend.py). Freezing the start-up heap for the loop and unfreezing it
afterwards keeps collections to what the loop itself made, and leaks nothing: what becomes
garbage while frozen is collected after the context ends.
"""
from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def frozen_heap():
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
