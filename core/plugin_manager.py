"""The PluginManager: loads built-in and third-party plugins and looks registered classes up by name.

Plugins come from the ``loom`` entry-point group (loom's built-ins are ordinary entries there) and
from ``register()`` calls (tests, embedding applications). A plugin that fails to import is kept
in ``load_errors`` with its traceback, logged, and reported by ``loom plugins``; it never disappears
silently, and an explicitly requested plugin (``LOOM_PLUGINS``) that fails to load is an error.
"""
from __future__ import annotations

import difflib
import importlib
import logging
import os
import textwrap
import traceback
import types
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

import pluggy

from loom import hookspecs
from loom.hookspecs import (ENTRY_POINT_GROUP, LOOM_PLUGIN_API, PROJECT_NAME,
                            LoomDeprecationWarning, Moved)

if TYPE_CHECKING:
    from loom.attention import AttentionBackend
    from loom.platform import Platform
    from loom.quant import QuantMethod

logger = logging.getLogger(__name__)

BUILTIN_DISTRIBUTION = "loom"
UNQUANTIZED = "none"
KINDS = ("platform", "attention_backend", "quant_method", "fused_ops", "model_architecture")
_HOOK_OF_KIND = {
    "platform": "loom_platforms",
    "attention_backend": "loom_attention_backends",
    "quant_method": "loom_quant_methods",
    "fused_ops": "loom_fused_ops",
    "model_architecture": "loom_model_architectures",
}
# Core's own built-ins, registered as plugins like any other.
CORE_PLUGINS = ("loom.models.registry", "loom.ops")


class PluginError(RuntimeError):
    """A plugin could not be loaded, or a name could not be resolved."""


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str | None
    version: str | None
    builtin: bool
    registers: dict[str, list[str]] = field(default_factory=dict)
    api: str | None = None       # the LOOM_PLUGIN_API it declares


@dataclass
class LoadError:
    name: str
    module: str
    distribution: str | None
    traceback: str
    version: str | None = None


def _parse_api(version) -> tuple[int, int] | None:
    try:
        major, minor = str(version).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def check_api(name: str, api) -> None:
    """Refuse a plugin built for another major version of the API, or a newer minor one."""
    ours = _parse_api(LOOM_PLUGIN_API)
    theirs = _parse_api(api)
    if theirs is None:
        raise PluginError(f"plugin {name!r} declares LOOM_PLUGIN_API = {api!r}; expected "
                          f"\"MAJOR.MINOR\", e.g. \"{LOOM_PLUGIN_API}\"")
    if theirs[0] != ours[0]:
        raise PluginError(
            f"plugin {name!r} was built for loom plugin API {api}, but this loom provides "
            f"API {LOOM_PLUGIN_API}; install a version of the plugin built for {ours[0]}.x")
    if theirs[1] > ours[1]:
        raise PluginError(
            f"plugin {name!r} was built for loom plugin API {api}, newer than this loom's API "
            f"{LOOM_PLUGIN_API}; upgrade loom, or install a version of the plugin built for "
            f"API {LOOM_PLUGIN_API} or older")


def _label(kind: str) -> str:
    return kind.replace("_", " ")


def _class_names(kind: str, cls) -> list[str]:
    if kind == "model_architecture":
        names = getattr(cls, "architectures", None)
        if not names:
            raise PluginError(f"model class {cls.__qualname__} declares no 'architectures'")
        return list(names)
    name = getattr(cls, "name", None)
    if not name:
        raise PluginError(f"{kind} class {cls.__qualname__} has no 'name'")
    return [name]


def _quant_method_of(config: dict) -> str:
    return str(config.get("quant_method", "(quantization_config without quant_method)"))


class PluginManager:
    """Registry of loom plugins and of the classes they register, by kind and name."""

    def __init__(self, load_entry_points: bool = True, allowed: list[str] | None = None):
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.moved = hookspecs.MOVED
        aliases = _moved_hookspecs(self.moved)
        if aliases is not None:
            self.pm.add_hookspecs(aliases)
        self.infos: dict[str, PluginInfo] = {}
        self.load_errors: list[LoadError] = []
        self._registry: dict[str, dict[str, tuple[object, str]]] | None = None
        if load_entry_points:
            self._load_entry_points(allowed if allowed is not None else _allowed_from_env())

    # ---- loading -------------------------------------------------------------------------
    def _load_entry_points(self, allowed: list[str] | None) -> None:
        # Built-ins first: a third-party plugin that claims a built-in name is the one refused.
        eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda ep: not _builtin(ep))
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            builtin = _builtin(ep)
            if not builtin and allowed is not None and ep.name not in allowed:
                continue
            try:
                self.register(ep.load(), name=ep.name, distribution=dist, version=version,
                              builtin=builtin)
            except Exception as exc:  # noqa: BLE001 - kept, logged and reported, never swallowed
                self.load_errors.append(
                    LoadError(ep.name, ep.value, dist, traceback.format_exc(), version))
                logger.warning("loom plugin %r (%s) failed to load: %s; `loom plugins` shows the "
                               "traceback", ep.name, ep.value, exc)
        if allowed:
            self._check_allowed(allowed)
        for module_name in CORE_PLUGINS:
            if module_name not in self.infos:
                self.register(importlib.import_module(module_name), name=module_name,
                              distribution=BUILTIN_DISTRIBUTION,
                              version=_dist_version(BUILTIN_DISTRIBUTION), builtin=True)

    def _check_allowed(self, allowed: list[str]) -> None:
        failed = {e.name: e for e in self.load_errors}
        for name in allowed:
            if name in failed:
                raise PluginError(
                    f"plugin {name!r} named in LOOM_PLUGINS failed to load:\n{failed[name].traceback}")
            if name not in self.infos:
                raise PluginError(f"plugin {name!r} named in LOOM_PLUGINS is not installed "
                                  f"(entry-point group {ENTRY_POINT_GROUP!r})")

    def register(self, plugin, name: str | None = None, distribution: str | None = None,
                 version: str | None = None, builtin: bool = False) -> str:
        """Register a plugin module or object (what ``pm.register`` does in tests).

        A plugin that breaks the contract (wrong API major, unknown hook, duplicate name) raises
        PluginError and leaves the manager as it was.
        """
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        api = getattr(plugin, "LOOM_PLUGIN_API", None)
        if api is not None:
            check_api(name, api)
        if name in self.infos:
            raise PluginError(f"plugin name {name!r} is already taken by module "
                              f"{self.infos[name].module}")
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginError(f"plugin {name!r} cannot be registered: {exc}") from exc
        self.infos[name] = PluginInfo(name, getattr(plugin, "__name__", repr(plugin)), distribution,
                                      version, builtin, api=api)
        self._registry = None
        try:
            self._validate()
        except PluginError:
            self.unregister(name)
            raise
        return name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        del self.infos[name]
        self._registry = None

    def _validate(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{exc} (the hooks are listed in loom.hookspecs)") from exc
        self._build_registry()

    # ---- lookup --------------------------------------------------------------------------
    def _build_registry(self) -> dict[str, dict[str, tuple[object, str]]]:
        if self._registry is not None:
            return self._registry
        registry: dict[str, dict[str, tuple[object, str]]] = {k: {} for k in KINDS}
        for info in self.infos.values():
            info.registers = {}
        for kind, hook_name in _HOOK_OF_KIND.items():
            for impl in self._hookimpls(hook_name):
                plugin_name = self.pm.get_name(impl.plugin)
                for cls in _call_hook(impl, impl.function.__name__, plugin_name):
                    self._alias_moved_members(cls, plugin_name)
                    for cname in _class_names(kind, cls):
                        if cname in registry[kind]:
                            other = registry[kind][cname][1]
                            raise PluginError(
                                f"duplicate {_label(kind)} name {cname!r}: registered by "
                                f"plugin {other!r} and by plugin {plugin_name!r}")
                        registry[kind][cname] = (cls, plugin_name)
                        self.infos[plugin_name].registers.setdefault(kind, []).append(cname)
        self._registry = registry
        return registry

    def _hookimpls(self, hook_name: str) -> list:
        """The implementations of a hook, and of its old names while they are deprecated."""
        names = [hook_name] + [m.old for m in self.moved if m.kind == "hook" and m.new == hook_name]
        return [impl for n in names for impl in getattr(self.pm.hook, n).get_hookimpls()]

    def _alias_moved_members(self, cls, plugin_name: str) -> None:
        """A plugin class that still defines a moved interface member gets it under its new name."""
        for moved in self.moved:
            if moved.kind != "interface member":
                continue
            iface, _, old = moved.old.partition(".")
            new = moved.new.partition(".")[2]
            mro = cls.__mro__ if isinstance(cls, type) else ()
            depth = next((i for i, k in enumerate(mro) if k.__name__ == iface
                          and k.__module__.startswith("loom.")), None)
            if depth is None:
                continue
            own = mro[:depth]
            old_owner = next((k for k in own if old in vars(k)), None)
            if old_owner is not None and not any(new in vars(k) for k in own):
                setattr(cls, new, vars(old_owner)[old])
                message = moved.message(f"{cls.__name__} of plugin {plugin_name!r}")
                warnings.warn(message, LoomDeprecationWarning, stacklevel=2)
                logger.warning(message)

    def names(self, kind: str) -> list[str]:
        return sorted(self._build_registry()[kind])

    def get(self, kind: str, name: str):
        """The class registered under ``name`` for ``kind``; an unknown name lists the known ones."""
        registry = self._build_registry()[kind]
        if name not in registry:
            hint = difflib.get_close_matches(name, registry, n=1)
            hint_s = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise PluginError(f"unknown {_label(kind)} {name!r}{hint_s}; {self._registered(kind)}")
        return registry[name][0]

    def classes(self, kind: str) -> list:
        return [cls for cls, _ in self._build_registry()[kind].values()]

    def owner(self, kind: str, name: str) -> str:
        return self._build_registry()[kind][name][1]

    def _registered(self, kind: str) -> str:
        """'registered: a, b', plus a line per plugin that failed to load (it may be the one)."""
        errors = "".join(f"\n  plugin {e.name!r} failed to load; run `loom plugins` for its traceback"
                         for e in self.load_errors)
        return f"registered: {', '.join(self.names(kind)) or '(none)'}{errors}"

    # ---- selection (the config's platform / attention_backend / quantization) ------------------
    def platform(self, name: str = "auto") -> Platform:
        """A Platform instance; ``auto`` is the available one with the highest auto_priority."""
        if name == "auto":
            available = self._available_platforms()
            if not available:
                raise PluginError(f"no platform is available; {self._registered('platform')}")
            return max(available, key=lambda cls: cls.auto_priority)()
        cls = self.get("platform", name)
        if not cls.is_available():
            names = ", ".join(c.name for c in self._available_platforms()) or "(none)"
            raise PluginError(f"platform {name!r} is not available on this machine; "
                              f"available: {names}")
        return cls()

    def _available_platforms(self) -> list[type[Platform]]:
        return [cls for cls in self.classes("platform") if cls.is_available()]

    def attention_backend(self, name: str, platform: Platform) -> type[AttentionBackend]:
        """An AttentionBackend class; ``auto`` is the first of the platform's defaults that is
        registered and supported on it."""
        return self._for_platform("attention_backend", name, platform,
                                  platform.default_attention_backends)

    def fused_ops(self, name: str, platform: Platform):
        """A FusedOps instance; ``auto`` as for attention backends, from ``default_fused_ops``."""
        return self._for_platform("fused_ops", name, platform, platform.default_fused_ops)()

    def _for_platform(self, kind: str, name: str, platform: Platform, defaults):
        what = kind.replace("_", " ")
        if name == "auto":
            registry = self._build_registry()[kind]
            for candidate in defaults:
                if candidate in registry and registry[candidate][0].is_supported(platform):
                    return registry[candidate][0]
            raise PluginError(
                f"none of platform {platform.name!r}'s default {what} choices "
                f"({', '.join(defaults)}) is registered and supported; "
                f"supported there: {self._supported(kind, platform)}")
        cls = self.get(kind, name)
        if getattr(cls, "unavailable", None):
            raise PluginError(f"{what} {name!r} cannot be used: {cls.unavailable}")
        if not cls.is_supported(platform):
            raise PluginError(f"{what} {name!r} does not support platform {platform.name!r}; "
                              f"supported there: {self._supported(kind, platform)}")
        return cls

    def _supported(self, kind: str, platform: Platform) -> str:
        names = [cls.name for cls in self.classes(kind) if cls.is_supported(platform)]
        return ", ".join(names) or "(none)"

    def quant_method(self, name: str, quantization_config: dict | None) -> QuantMethod:
        """A QuantMethod instance built from the checkpoint's quantization_config; ``auto`` is the
        method whose ``matches`` accepts it (``none`` for an unquantized checkpoint)."""
        config = quantization_config or None
        if name == "auto":
            return self._matching_quant_method(config).from_config(config)
        if name == UNQUANTIZED and config:
            method = _quant_method_of(config)
            raise PluginError(f"quantization {UNQUANTIZED!r} cannot load this checkpoint: it is "
                              f"quantized with quant_method {method!r}; use 'auto' or {method!r}")
        return self.get("quant_method", name).from_config(config)

    def _matching_quant_method(self, config: dict | None) -> type[QuantMethod]:
        matches = [cls for cls in self.classes("quant_method") if cls.matches(config)]
        if len(matches) == 1:
            return matches[0]
        what = (f"quant_method {_quant_method_of(config)!r}" if config
                else "an unquantized checkpoint")
        if not matches:
            raise PluginError(f"no quantization plugin handles {what}; "
                              f"{self._registered('quant_method')}")
        claims = ", ".join(f"{cls.name!r} (plugin {self.owner('quant_method', cls.name)!r})"
                           for cls in matches)
        raise PluginError(f"{what} is claimed by several quantization methods: {claims}; "
                          f"choose one with `quantization: <name>`")

    def model_class(self, architecture: str):
        """The model class implementing a Hugging Face architecture name (config.json)."""
        return self.get("model_architecture", architecture)


def _builtin(ep) -> bool:
    return ep.dist is not None and ep.dist.name == BUILTIN_DISTRIBUTION


def _moved_hookspecs(moved: tuple[Moved, ...]):
    """Hookspecs for the old names of moved hooks: the new hook's signature; implementing one
    warns (pluggy's ``warn_on_impl``)."""
    specs = {}
    for m in moved:
        if m.kind != "hook":
            continue
        new = getattr(hookspecs, m.new)
        alias = types.FunctionType(new.__code__, new.__globals__, m.old, new.__defaults__)
        alias.__doc__ = f"Deprecated alias of {m.new}."
        specs[m.old] = hookspecs.hookspec(warn_on_impl=LoomDeprecationWarning(m.message()))(alias)
    return types.SimpleNamespace(**specs) if specs else None


def _call_hook(impl, hook_name: str, plugin_name: str) -> list:
    try:
        return list(impl.function() or [])
    except Exception as exc:  # noqa: BLE001 - becomes a load error naming the plugin
        raise PluginError(f"plugin {plugin_name!r}: hook {hook_name} failed: {exc!r}") from exc


def format_report(pm: PluginManager) -> str:
    """What ``loom plugins`` prints: every plugin with its version, origin and what it registers,
    then every plugin that failed to load, with its traceback."""
    pm.names("platform")  # builds the registry, which fills each PluginInfo.registers
    lines = [f"loom {_dist_version(BUILTIN_DISTRIBUTION) or '(unknown version)'}, "
             f"plugin API {LOOM_PLUGIN_API}", ""]
    for info in sorted(pm.infos.values(), key=lambda i: (not i.builtin, i.name)):
        api = f"  built for API {info.api}" if info.api else ""
        lines.append(f"{info.name}  {'built-in' if info.builtin else 'third-party'}  "
                     f"{_origin(info.distribution, info.version)}{api}  module {info.module}")
        for kind in KINDS:
            if kind in info.registers:
                lines.append(f"    {_label(kind)}: {', '.join(info.registers[kind])}")
                for name in info.registers[kind]:
                    reason = getattr(pm.get(kind, name), "unavailable", None)
                    if reason:
                        lines.append(f"    {name} is unavailable: {reason}")
        if not info.registers:
            lines.append("    (registers nothing)")
    if pm.load_errors:
        lines += ["", f"failed to load ({len(pm.load_errors)}):"]
        for err in pm.load_errors:
            lines.append(f"{err.name}  {_origin(err.distribution, err.version)}  module {err.module}")
            lines.append(textwrap.indent(err.traceback.rstrip(), "    "))
    return "\n".join(lines)


def _origin(distribution: str | None, version: str | None) -> str:
    if distribution is None:
        return "(registered in-process, no distribution)"
    return f"{distribution} {version or '(unknown version)'}"


def _allowed_from_env() -> list[str] | None:
    value = os.environ.get("LOOM_PLUGINS")
    if value is None:
        return None
    return [n.strip() for n in value.split(",") if n.strip()]


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide PluginManager, loaded on first use."""
    global _default
    if _default is None:
        _default = PluginManager()
    return _default


def reset_plugin_manager() -> None:
    global _default
    _default = None
