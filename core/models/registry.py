"""Core's built-in model architectures, registered through the same hook as third-party ones."""
from loom.hookspecs import hookimpl
from loom.models.llama import LlamaForCausalLM


@hookimpl
def loom_model_architectures():
    return [LlamaForCausalLM]
