"""Model code: the Llama family and its layers."""
