"""Native (CUDA C++) kernels of the quantization methods, built from csrc/ on first use; each
falls back to its Triton twin where it cannot be built (a kernel folder, not a plugin)."""
