"""Triton kernels of the quantization methods (a kernel folder, not a plugin)."""
