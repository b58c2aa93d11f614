"""How one linear layer holds a quantized weight and multiplies by it, shared by the
quantization plugins (gptq, awq, auto-round, compressed-tensors, fp8). Not a plugin itself: a
plugin parses its checkpoint's quantization_config and picks a scheme here for each layer."""
