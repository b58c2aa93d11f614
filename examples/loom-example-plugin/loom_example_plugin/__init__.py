"""loom-example-plugin: every kind of loom plugin, from outside loom.

Installed, it is the ``example`` entry of the ``loom`` entry-point group; loom registers this
module and calls its hooks. ``example.yaml`` (next to this file) selects all three by name.
"""
from loom import hookimpl

from loom_example_plugin.attention import SdpaAttention
from loom_example_plugin.platform import ExampleCpuPlatform
from loom_example_plugin.quant import ExampleInt8

# The plugin API this package is built for: loom refuses it if its major differs, or if
# loom's API is older (1.1 added QuantMethod.quantize/dequantize, which ExampleInt8 uses).
LOOM_PLUGIN_API = "1.1"

__all__ = ["ExampleCpuPlatform", "ExampleInt8", "SdpaAttention", "config_path"]


def config_path():
    """The YAML config this package ships: ``loom generate --config <it>``."""
    from pathlib import Path
    return Path(__file__).with_name("example.yaml")


@hookimpl
def loom_platforms():
    return [ExampleCpuPlatform]


@hookimpl
def loom_attention_backends():
    return [SdpaAttention]


@hookimpl
def loom_quant_methods():
    return [ExampleInt8]
