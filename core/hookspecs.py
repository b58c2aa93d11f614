"""The plugin contract: the hooks a loom plugin may implement.

A plugin is a module (or object) with functions marked ``@loom.hookimpl`` whose names match the
hooks below. Plugins are found through the ``loom`` entry-point group; loom's own built-ins are
registered the same way. Every hook returns *classes*; each class carries a unique ``name``
(model classes: their Hugging Face ``architectures`` names).

Versioning: ``LOOM_PLUGIN_API`` is "MAJOR.MINOR". A plugin may declare the version it was built
for as a module attribute ``LOOM_PLUGIN_API = "1.0"``; loom refuses a plugin whose major differs.
A hook may gain arguments in a minor version (pluggy lets an implementation take fewer), never
lose them.
"""
from __future__ import annotations

import pluggy

PROJECT_NAME = "loom"
ENTRY_POINT_GROUP = "loom"
LOOM_PLUGIN_API = "1.0"

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
