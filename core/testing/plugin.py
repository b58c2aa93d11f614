"""The conformance kit's pytest plugin: its options and fixtures.

Registered through the ``pytest11`` entry point, so any pytest run where loom is installed
knows the options (with plugin autoloading off: ``-p loom.testing.plugin``). It imports nothing
of loom until a ``--loom-*`` option is given.

    pytest --pyargs loom.testing --loom-attention NAME --loom-quant NAME --loom-platform NAME
"""
from __future__ import annotations

import importlib
import json

import pytest

from loom import ops

DTYPES = ("float32", "float16", "bfloat16")


def pytest_addoption(parser):
    group = parser.getgroup("loom", "loom conformance kit (pytest --pyargs loom.testing)")
    group.addoption("--loom-attention", action="append", default=[], metavar="NAME",
                    help="check this attention backend against torch_ref (repeatable)")
    group.addoption("--loom-quant", action="append", default=[], metavar="NAME",
                    help="check this quant method against dequantize-then-matmul (repeatable)")
    group.addoption("--loom-quant-config", default=None, metavar="JSON",
                    help="the quantization_config the quant methods are built from "
                         "(default: none, as for an unquantized checkpoint)")
    group.addoption("--loom-platform", default=None, metavar="NAME",
                    help="check this platform; the other checks run on it (default: auto)")
    group.addoption("--loom-plugin", action="append", default=[], metavar="MODULE",
                    help="register this importable module as a plugin first (one not "
                         "installed through the 'loom' entry-point group)")
    group.addoption("--loom-dtype", action="append", default=[], choices=DTYPES,
                    help="only check these dtypes (default: all the plugin and platform support)")


class Kit:
    """What the options select, resolved once per session."""

    def __init__(self, config: pytest.Config):
        from loom.plugin_manager import PluginError, PluginManager

        option = config.getoption
        self.attention_names: list[str] = option("loom_attention")
        self.quant_names: list[str] = option("loom_quant")
        self.platform_name: str | None = option("loom_platform")
        self.dtype_names: list[str] = option("loom_dtype")
        raw = option("loom_quant_config")
        try:
            self.quant_config = json.loads(raw) if raw else None
        except json.JSONDecodeError as exc:
            raise pytest.UsageError(f"--loom-quant-config is not JSON: {exc}") from None
        try:
            self.pm = PluginManager()
            for module in option("loom_plugin"):
                self.pm.register(importlib.import_module(module), name=module)
            self.platform = self.pm.platform(self.platform_name or "auto")
            for name in self.attention_names:
                self.pm.attention_backend(name, self.platform)
            for name in self.quant_names:
                self.pm.get("quant_method", name)
        except (PluginError, ImportError) as exc:
            raise pytest.UsageError(f"loom conformance kit: {exc}") from None

    def dtypes(self, supported) -> list:
        import torch

        wanted = [getattr(torch, n) for n in (self.dtype_names or DTYPES)]
        return [d for d in wanted if d in supported and d in self.platform.supported_dtypes]

    def describe(self) -> str:
        parts = [f"platform {self.platform.name}"
                 + ("" if self.platform_name else " (auto; not itself checked)")]
        if self.attention_names:
            parts.append(f"attention {', '.join(self.attention_names)}")
        if self.quant_names:
            parts.append(f"quant {', '.join(self.quant_names)}")
        return "loom conformance kit: " + "; ".join(parts)


_KIT = pytest.StashKey[Kit]()
_OPTIONS = ("loom_attention", "loom_quant", "loom_platform", "loom_plugin")


def _selected(config: pytest.Config) -> bool:
    return any(config.getoption(name) for name in _OPTIONS)


def pytest_configure(config):
    if _selected(config):
        config.stash[_KIT] = Kit(config)


def pytest_report_header(config):
    if _KIT in config.stash:
        return config.stash[_KIT].describe()
    return None


# Parametrized fixtures: one test per named plugin; none named, the tests skip, saying why.
_PARAMETRIZED = {"loom_attention": "loom_attention", "loom_quant": "loom_quant"}


def pytest_generate_tests(metafunc):
    for fixture, option in _PARAMETRIZED.items():
        if fixture in metafunc.fixturenames:
            names = metafunc.config.getoption(option)
            if names:
                metafunc.parametrize(fixture, names, indirect=True)
            else:
                flag = "--" + option.replace("_", "-")
                metafunc.parametrize(fixture, [pytest.param(None, marks=pytest.mark.skip(
                    reason=f"no {flag} NAME given"))], indirect=True, ids=["-"])


@pytest.fixture(scope="session")
def loom_kit(pytestconfig) -> Kit:
    if _KIT not in pytestconfig.stash:
        pytest.skip("no --loom-attention, --loom-quant or --loom-platform given")
    return pytestconfig.stash[_KIT]


@pytest.fixture(scope="session")
def loom_platform(loom_kit):
    """The platform every check runs on: --loom-platform, else auto. Its default fused ops are
    made active, as the engine does (backends may write the KV cache through them)."""
    loom_kit.platform.set_device(0)
    ops.use(loom_kit.pm.fused_ops("auto", loom_kit.platform))
    return loom_kit.platform


@pytest.fixture(scope="session")
def loom_platform_under_test(loom_kit, loom_platform):
    """The platform named by --loom-platform (platform checks skip without it)."""
    if not loom_kit.platform_name:
        pytest.skip("no --loom-platform NAME given")
    return loom_platform


@pytest.fixture(scope="session")
def loom_device(loom_platform):
    return loom_platform.device(0)


@pytest.fixture
def loom_attention(request, loom_kit, loom_platform):
    """The attention backend class under test."""
    return loom_kit.pm.attention_backend(request.param, loom_platform)


@pytest.fixture
def loom_quant(request, loom_kit):
    """The quant method class under test."""
    return loom_kit.pm.get("quant_method", request.param)


@pytest.fixture
def loom_quant_config(loom_kit):
    return loom_kit.quant_config


@pytest.fixture
def loom_reference_attention(loom_kit):
    """torch_ref, every attention backend's reference twin."""
    return loom_kit.pm.get("attention_backend", "torch")
