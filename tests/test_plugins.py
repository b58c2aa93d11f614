"""The plugin contract: registration, selection by name, and loud, named errors."""
from importlib import metadata

import pytest
import torch

from loom import hookimpl, hookspecs
from loom.hookspecs import LOOM_PLUGIN_API
from loom.platform import Platform
from loom.plugin_manager import PluginError, PluginManager, format_report
from loom.plugins.attention.torch_ref import TorchRefAttention
from loom.quant import QuantMethod


class ToyPlatform(Platform):
    name = "toy"
    default_attention_backends = ("toy_attn", "torch")
    auto_priority = -1

    @classmethod
    def is_available(cls):
        return True


class GhostPlatform(ToyPlatform):
    name = "ghost"

    @classmethod
    def is_available(cls):
        return False


class ToyAttention(TorchRefAttention):
    name = "toy_attn"

    @classmethod
    def is_supported(cls, platform):
        return platform.name == "toy"


class ToyQuant(QuantMethod):
    name = "toy-q"

    def __init__(self, bits: int = 8):
        self.bits = bits

    @classmethod
    def matches(cls, quantization_config):
        return bool(quantization_config) and quantization_config.get("quant_method") == "toy-q"

    @classmethod
    def from_config(cls, quantization_config):
        return cls(quantization_config["bits"]) if quantization_config else cls()


class ToyModel(torch.nn.Module):
    architectures = ["ToyForCausalLM"]


class ToyPlugin:
    @hookimpl
    def loom_platforms(self):
        return [ToyPlatform, GhostPlatform]

    @hookimpl
    def loom_attention_backends(self):
        return [ToyAttention]

    @hookimpl
    def loom_quant_methods(self):
        return [ToyQuant]

    @hookimpl
    def loom_model_architectures(self):
        return [ToyModel]


class DuplicateCpuPlugin:
    @hookimpl
    def loom_platforms(self):
        return [type("OtherCpu", (ToyPlatform,), {"name": "cpu"})]


class FuturePlugin(ToyPlugin):
    LOOM_PLUGIN_API = "2.0"


@pytest.fixture
def pm(monkeypatch):
    monkeypatch.delenv("LOOM_PLUGINS", raising=False)
    return PluginManager()


@pytest.fixture
def toy_pm(pm):
    pm.register(ToyPlugin(), name="toy-plugin")
    return pm


def test_every_hookspec_is_documented():
    specs = {n: f for n, f in vars(hookspecs).items() if n.startswith("loom_") and callable(f)}
    assert specs
    for name, fn in specs.items():
        assert hasattr(fn, "loom_spec"), name
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"hook {name} has no docstring"


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks a GPU platform here")
def test_auto_selection_on_cpu(pm):
    platform = pm.platform()
    assert platform.name == "cpu"
    assert pm.platform("auto").name == "cpu"
    assert pm.attention_backend("auto", platform) is TorchRefAttention


def test_quant_auto_none_for_unquantized(pm):
    assert pm.quant_method("auto", None).name == "none"
    assert pm.quant_method("auto", {}).name == "none"
    assert pm.quant_method("none", None).name == "none"


def test_quant_auto_unknown_method_errors(pm):
    with pytest.raises(PluginError, match=r"quant_method 'mystery-q'.*registered: .*\bnone\b"):
        pm.quant_method("auto", {"quant_method": "mystery-q", "bits": 4})


def test_quant_none_for_quantized_checkpoint_errors(toy_pm):
    with pytest.raises(PluginError, match=r"'none' cannot load.*'toy-q'"):
        toy_pm.quant_method("none", {"quant_method": "toy-q", "bits": 4})


def test_registered_plugin_is_selectable_by_name(toy_pm):
    platform = toy_pm.platform("toy")
    assert isinstance(platform, ToyPlatform)
    assert toy_pm.attention_backend("toy_attn", platform) is ToyAttention
    assert toy_pm.attention_backend("auto", platform) is ToyAttention
    assert toy_pm.quant_method("toy-q", {"quant_method": "toy-q", "bits": 3}).bits == 3
    assert toy_pm.quant_method("auto", {"quant_method": "toy-q", "bits": 4}).bits == 4
    assert toy_pm.model_class("ToyForCausalLM") is ToyModel
    assert toy_pm.owner("platform", "toy") == "toy-plugin"
    assert toy_pm.platform().name != "toy"  # auto_priority -1 loses to the built-ins


def test_unsupported_attention_backend_names_both(toy_pm):
    cpu = toy_pm.platform("cpu")
    with pytest.raises(PluginError, match=r"'toy_attn' does not support platform 'cpu'.*torch"):
        toy_pm.attention_backend("toy_attn", cpu)


def test_auto_attention_without_usable_default_errors(pm):
    class Bare(ToyPlatform):
        name = "bare"
        default_attention_backends = ("missing",)

    with pytest.raises(PluginError, match=r"'bare'.*\(missing\).*supported there: torch"):
        pm.attention_backend("auto", Bare())


def test_unavailable_platform_names_it_and_the_available_ones(toy_pm):
    with pytest.raises(PluginError, match=r"platform 'ghost' is not available.*available: .*toy"):
        toy_pm.platform("ghost")


def test_unknown_names_list_the_registered_ones(toy_pm):
    platform = toy_pm.platform("cpu")
    with pytest.raises(PluginError, match=r"unknown platform 'cpux' \(did you mean 'cpu'\?\); "
                                          r"registered: .*\bcpu\b.*toy"):
        toy_pm.platform("cpux")
    with pytest.raises(PluginError, match=r"registered: .*\btorch\b.*toy_attn"):
        toy_pm.attention_backend("nope", platform)
    with pytest.raises(PluginError, match=r"registered: .*\bnone\b.*toy-q"):
        toy_pm.quant_method("nope", None)
    with pytest.raises(PluginError, match=r"registered: .*ToyForCausalLM"):
        toy_pm.model_class("NopeForCausalLM")


def test_duplicate_name_errors_naming_both_plugins_and_rolls_back(pm):
    before = pm.names("platform")
    with pytest.raises(PluginError, match=r"'cpu'.*'platform_cpu'.*'dup-plugin'"):
        pm.register(DuplicateCpuPlugin(), name="dup-plugin")
    assert "dup-plugin" not in pm.infos
    assert pm.platform("cpu").name == "cpu"
    assert pm.names("platform") == before


def test_duplicate_plugin_name_errors(pm):
    before = pm.names("platform")
    with pytest.raises(PluginError, match=r"'platform_cpu' is already taken"):
        pm.register(ToyPlugin(), name="platform_cpu")
    assert pm.names("platform") == before


def test_ambiguous_quant_auto_names_both(toy_pm):
    class Twin(ToyQuant):
        name = "toy-q-twin"

    class TwinPlugin:
        @hookimpl
        def loom_quant_methods(self):
            return [Twin]

    toy_pm.register(TwinPlugin(), name="twin-plugin")
    with pytest.raises(PluginError, match=r"'toy-q'.*'toy-plugin'.*'toy-q-twin'.*'twin-plugin'"):
        toy_pm.quant_method("auto", {"quant_method": "toy-q", "bits": 4})


def test_plugin_api_major_mismatch_is_refused(pm):
    with pytest.raises(PluginError, match=rf"API 2\.0.*API {LOOM_PLUGIN_API}"):
        pm.register(FuturePlugin(), name="future")
    assert "future" not in pm.infos


@pytest.mark.parametrize("api, message", [
    ("1.99", r"built for loom plugin API 1\.99, newer than this loom's API 1\.\d+; upgrade loom"),
    ("0.9", r"built for loom plugin API 0\.9, but this loom provides API 1\.\d+"),
    ("one", r"declares LOOM_PLUGIN_API = 'one'; expected \"MAJOR.MINOR\""),
])
def test_plugin_api_newer_minor_or_malformed_is_refused(pm, api, message):
    plugin = type("Versioned", (ToyPlugin,), {"LOOM_PLUGIN_API": api})()
    with pytest.raises(PluginError, match=message):
        pm.register(plugin, name="versioned")
    assert "versioned" not in pm.infos


def test_plugin_api_older_minor_is_accepted(pm):
    older = LOOM_PLUGIN_API.split(".")[0] + ".0"
    plugin = type("Older", (ToyPlugin,), {"LOOM_PLUGIN_API": older})()
    pm.register(plugin, name="older")
    assert pm.infos["older"].api.endswith(".0")
    assert pm.platform("toy").name == "toy"


def test_broken_hook_and_misspelled_hook_are_refused(pm):
    before = pm.names("platform")

    class Broken:
        @hookimpl
        def loom_platforms(self):
            raise ImportError("libfoo.so not found")

    class Misspelled:
        @hookimpl
        def loom_platform(self):
            return [ToyPlatform]

    with pytest.raises(PluginError, match=r"'broken'.*loom_platforms.*libfoo"):
        pm.register(Broken(), name="broken")
    with pytest.raises(PluginError, match=r"loom_platform"):
        pm.register(Misspelled(), name="misspelled")
    assert pm.names("platform") == before


@pytest.fixture
def broken_entry_point(monkeypatch):
    """The ``loom`` group holds the real entries plus one whose module does not exist."""
    real = metadata.entry_points
    broken = metadata.EntryPoint("broken_plugin", "loom_test_no_such_module", "loom")

    def entry_points(**params):
        return [*real(**params), broken]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    monkeypatch.delenv("LOOM_PLUGINS", raising=False)


def _entry_points_plus(monkeypatch, tmp_path, name: str, source: str, first: bool = False):
    """The ``loom`` group holds the real entries and a third-party module ``name`` with
    ``source`` (listed first: before the built-ins, when ``first``)."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    real = metadata.entry_points
    extra = metadata.EntryPoint(name, name, "loom")

    def entry_points(**params):
        found = list(real(**params))
        return [extra, *found] if first else [*found, extra]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    monkeypatch.delenv("LOOM_PLUGINS", raising=False)


FUTURE_SOURCE = """
from loom import hookimpl
from loom.platform import Platform
LOOM_PLUGIN_API = "2.0"

class P(Platform):
    name = "future-platform"

@hookimpl
def loom_platforms():
    return [P]
"""

DUPLICATE_SOURCE = """
from loom import hookimpl
from loom.platform import Platform

class P(Platform):
    name = "cpu"
    @classmethod
    def is_available(cls):
        return True

@hookimpl
def loom_platforms():
    return [P]
"""


def test_entry_point_for_another_api_is_a_load_error_naming_both(monkeypatch, tmp_path):
    _entry_points_plus(monkeypatch, tmp_path, "future_plugin", FUTURE_SOURCE)
    pm = PluginManager()
    [error] = pm.load_errors
    assert f"built for loom plugin API 2.0, but this loom provides API {LOOM_PLUGIN_API}" in (
        error.traceback)
    report = format_report(pm)
    assert "failed to load (1):" in report and "PluginError" in report
    assert "future-platform" not in pm.names("platform")
    assert pm.platform("cpu").name == "cpu"
    monkeypatch.setenv("LOOM_PLUGINS", "future_plugin")
    with pytest.raises(PluginError, match=r"(?s)'future_plugin' named in LOOM_PLUGINS.*API 2\.0"):
        PluginManager()


@pytest.mark.parametrize("first", [True, False], ids=["listed_first", "listed_last"])
def test_entry_point_claiming_a_builtin_name_is_refused_not_the_builtin(monkeypatch, tmp_path,
                                                                          first):
    _entry_points_plus(monkeypatch, tmp_path, "dup_plugin", DUPLICATE_SOURCE, first)
    pm = PluginManager()
    [error] = pm.load_errors
    assert error.name == "dup_plugin"
    assert "duplicate platform name 'cpu': registered by plugin 'platform_cpu' and by plugin " \
           "'dup_plugin'" in error.traceback
    assert pm.owner("platform", "cpu") == "platform_cpu"
    assert "dup_plugin" in format_report(pm)


def test_plugin_that_fails_to_import_is_reported_not_raised(broken_entry_point):
    pm = PluginManager()
    [error] = pm.load_errors
    assert error.name == "broken_plugin"
    assert "ModuleNotFoundError" in error.traceback
    report = format_report(pm)
    assert "broken_plugin" in report
    assert "Traceback (most recent call last)" in report
    assert "loom_test_no_such_module" in report
    assert pm.platform("cpu").name == "cpu"
    with pytest.raises(PluginError, match=r"'broken_plugin' failed to load"):
        pm.platform("nope")


def test_plugin_named_in_loom_plugins_that_fails_raises(broken_entry_point, monkeypatch):
    monkeypatch.setenv("LOOM_PLUGINS", "broken_plugin")
    with pytest.raises(PluginError,
                       match=r"(?s)'broken_plugin' named in LOOM_PLUGINS.*ModuleNotFoundError"):
        PluginManager()


def test_loom_plugins_filters_third_party_plugins(broken_entry_point):
    pm = PluginManager(allowed=[])
    assert pm.load_errors == []
    assert {"cpu", "cuda", "rocm"} <= set(pm.names("platform"))
    with pytest.raises(PluginError, match=r"'absent' named in LOOM_PLUGINS is not installed"):
        PluginManager(allowed=["absent"])


def test_format_report_lists_plugins_versions_and_registrations(toy_pm):
    report = format_report(toy_pm)
    assert f"plugin API {LOOM_PLUGIN_API}" in report
    assert f"platform_cpu  built-in  loom {metadata.version('loom')}" in report
    assert "toy-plugin  third-party" in report
    assert "    platform: toy, ghost" in report
    assert "    attention backend: toy_attn" in report
    assert "    quant method: toy-q" in report
    assert "    model architecture: ToyForCausalLM" in report
