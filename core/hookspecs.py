"""The plugin contract: the hooks a loom plugin may implement.

A plugin is a module (or object) with functions marked ``@loom.hookimpl`` whose names match the
hooks below. Plugins are found through the ``loom`` entry-point group; loom's own built-ins are
registered the same way. Every hook returns *classes*; each class carries a unique ``name``
(model classes: their Hugging Face ``architectures`` names).

Versioning: ``LOOM_PLUGIN_API`` is "MAJOR.MINOR". A plugin declares the version it was built
for as a module attribute, ``LOOM_PLUGIN_API = "1.7"``; loom refuses a plugin whose major differs
or whose minor is newer than its own, with a message naming both versions. A minor version only
adds: a hook may gain arguments (pluggy lets an implementation take fewer), never lose them; an
interface may gain members with defaults. A name that moves is listed in ``MOVED`` and keeps
working under its old name, with a ``LoomDeprecationWarning``, for one minor version.
docs/plugins.md documents every hook and the history of the API.
"""
from __future__ import annotations

from dataclasses import dataclass

import pluggy

PROJECT_NAME = "loom"
ENTRY_POINT_GROUP = "loom"
# 1.1: QuantMethod.quantize / dequantize (the conformance kit's view of a weight format).
# 1.2: QuantMethod.rank_index and the input_dim / input_packed_factor parameter attributes
#      (tensor parallelism: which part of a checkpoint tensor a rank loads).
# 1.3: AttentionBackend.supported_kv_cache_dtypes, k_scale / v_scale and fp8 KV caches;
#      FusedOps.write_kv takes k_scale / v_scale.
# 1.4: QuantMethod.input_quant and loom.quant.QuantizedInput; FusedOps.rms_norm_quant,
#      add_rms_norm_quant, silu_and_mul_quant (the op before an FP8 linear quantizes for it).
# 1.5: QuantMethod.fuses_input and loom.quant.FusedInput (a linear's kernel applies the norm or
#      SiLU-and-mul before it).
# 1.6: AttentionBackend.forward_rotary and FusedOps.rotary_write_kv (the rotary embedding and the
#      KV-cache write in one kernel).
# 1.7: QuantMethod.fuses_output / apply_fused_output (a gate|up linear's kernel applies
#      SiLU-and-mul to its output).
LOOM_PLUGIN_API = "1.7"


class LoomDeprecationWarning(DeprecationWarning):
    """A plugin uses a name of the contract that moved; it goes in the next minor version."""


@dataclass(frozen=True)
class Moved:
    """A name of the contract that moved in plugin API ``since``.

    ``old``/``new`` are hook names (``loom_attention_backends``), interface members
    (``AttentionBackend.kv_cache_shape``) or module attributes
    (``loom.attention.AttentionMetadata``).
    The PluginManager answers the old hook with the new one's kind and copies an old member to
    the new name on a plugin's class; a module keeps an old attribute with ``moved_getattr``.
    """
    old: str
    new: str
    since: str

    @property
    def kind(self) -> str:
        if "." not in self.old:
            return "hook"
        return "module attribute" if self.old.startswith("loom.") else "interface member"

    def message(self, who: str = "") -> str:
        by = f" (used by {who})" if who else ""
        return (f"{self.old} is deprecated since loom plugin API {self.since}; use "
                f"{self.new}{by}. The old name goes in the next minor version.")


# Nothing has moved yet. An entry lives for one minor version (a test checks that).
MOVED: tuple[Moved, ...] = ()


def moved_getattr(module_name: str):
    """A module ``__getattr__`` that keeps the module's moved attributes (see ``Moved``)."""
    def __getattr__(name: str):
        import importlib
        import warnings

        old = f"{module_name}.{name}"
        for moved in MOVED:
            if moved.old == old:
                warnings.warn(moved.message(), LoomDeprecationWarning, stacklevel=2)
                module, _, attr = moved.new.rpartition(".")
                return getattr(importlib.import_module(module), attr)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    return __getattr__

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def loom_platforms():
    """Return a list of Platform subclasses (see ``loom.platform.Platform``).

    Each class has a unique ``name`` (``cpu``, ``cuda``, ``rocm``...) selected by the config key
    ``platform``; ``platform: auto`` picks, among the classes whose ``is_available()`` is true,
    the one with the highest ``auto_priority``.
    """


@hookspec
def loom_attention_backends():
    """Return a list of AttentionBackend subclasses (see ``loom.attention.AttentionBackend``).

    Each class has a unique ``name`` selected by ``attention-backend``; ``auto`` takes the
    platform's ``default_attention_backends`` in order and uses the first one registered and
    supported on that platform.
    """


@hookspec
def loom_quant_methods():
    """Return a list of QuantMethod subclasses (see ``loom.quant.QuantMethod``).

    Each class has a unique ``name`` selected by ``quantization``; ``auto`` asks every class's
    ``matches(quantization_config)`` with the checkpoint's ``quantization_config`` and uses the
    one that matches (the unquantized method when the checkpoint has none).
    """


@hookspec
def loom_fused_ops():
    """Return a list of FusedOps subclasses (see ``loom.ops.FusedOps``).

    Each class has a unique ``name`` selected by ``fused-ops`` and overrides some of the hot
    ops (RMSNorm with residual, SiLU-and-mul, rotary) with faster kernels; what it does not
    override stays the torch reference. ``auto`` takes the platform's ``default_fused_ops``
    in order and uses the first registered one whose ``is_supported(platform)`` is true.
    """


@hookspec
def loom_model_architectures():
    """Return a list of model classes (``torch.nn.Module`` subclasses).

    Each class lists in ``architectures`` the Hugging Face architecture names it implements
    (``config.json``'s ``architectures``, e.g. ``LlamaForCausalLM``); a name may be claimed once.
    The class is built as ``cls(model_config, quant_method, attn_backend)`` and follows the forward
    contract of ``loom.models.llama.LlamaForCausalLM``.
    """
