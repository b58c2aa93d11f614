"""Shared set-up of the Triton kernel tests: on a GPU when there is one, else through triton's
interpreter on the CPU (TRITON_INTERPRET=1 must be set before any kernel is defined, so a test
module imports this before triton or any loom Triton plugin)."""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed")
tl = pytest.importorskip("triton.language")


@pytest.fixture(autouse=True, scope="module")
def interpreter_bf16_dot():
    """triton's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits
    (triton-lang/triton#11584): upcast them first, as the GPU's tensor cores do."""
    if DEVICE != "cpu":
        yield
        return
    from triton.runtime.interpreter import InterpreterBuilder
    create_dot = InterpreterBuilder.create_dot

    def upcast_dot(self, a, b, d, *args):
        if a.dtype.scalar == tl.bfloat16:
            a, b = self.cast_impl(a, tl.float32), self.cast_impl(b, tl.float32)
        return create_dot(self, a, b, d, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpreterBuilder, "create_dot", upcast_dot)
        yield
