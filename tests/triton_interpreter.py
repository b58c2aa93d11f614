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


@pytest.fixture(autouse=True, scope="module")
def interpreter_fp8_rounding():
    """triton's interpreter rounds float -> fp8 without carrying into the exponent (1.97 becomes
    1.0, not 2.0): round as the GPU does (to nearest even), through torch's conversion."""
    if DEVICE != "cpu":
        yield
        return
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    fp8_types = {"fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2,
                 "fp8e4b8": torch.float8_e4m3fnuz, "fp8e5b16": torch.float8_e5m2fnuz}
    create_fp_to_fp = InterpreterBuilder.create_fp_to_fp

    def torch_fp_to_fp(self, src, dst_type, rounding_mode):
        fp8 = fp8_types.get(dst_type.scalar.name)
        if fp8 is None or src.dtype.scalar.primitive_bitwidth == 8:
            return create_fp_to_fp(self, src, dst_type, rounding_mode)
        data = np.ascontiguousarray(src.data)
        if src.dtype.scalar == tl.bfloat16:
            values = torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        else:
            values = torch.from_numpy(data)
        return TensorHandle(values.to(fp8).view(torch.uint8).numpy(), dst_type.scalar)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InterpreterBuilder, "create_fp_to_fp", torch_fp_to_fp)
        yield
