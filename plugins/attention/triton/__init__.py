"""The ``triton`` attention backend plugin (kernels in kernels.py, the backend in backend.py)."""
from loom.hookspecs import hookimpl
from loom.plugins.attention.triton.backend import TritonAttention


@hookimpl
def loom_attention_backends():
    return [TritonAttention]
