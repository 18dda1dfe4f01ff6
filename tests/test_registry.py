"""Plugin discovery, the registry's errors, and KVCOMPRESS_DISABLE_PLUGINS."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest
import torch

from kvcompress import (
    EvictionSpec, EvictorMethod, MethodSpec, PluginError, QuantizerMethod, Registry, UnknownMethodError, hookimpl, hookspecs,
)
from kvcompress.methods import METHOD_KINDS


class EchoSpec(MethodSpec):
    method: Literal["echo"] = "echo"


class EchoPlugin:
    @hookimpl
    def kvcompress_quantizers(self):
        return [QuantizerMethod(name="echo", spec=EchoSpec, factory=lambda spec, ctx: None)]


def test_the_hookspecs_declare_one_collector_per_stage():
    """kvcompress.hookspecs spells its hooks out (pluggy reads their names and docs from functions); each
    stage's hook is among them, returning a list of the stage's descriptor."""
    declared = {name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "kvcompress_spec")}
    assert {stage.hook for stage in METHOD_KINDS.values()} <= declared
    for stage in METHOD_KINDS.values():
        returns = getattr(hookspecs, stage.hook).__annotations__["return"]
        assert returns == f"list[{stage.descriptor.__name__}]", stage.name


class RecentSpec(EvictionSpec):
    method: Literal["recent"] = "recent"


class RecentPlainSpec(MethodSpec):
    method: Literal["recent"] = "recent"


def test_an_evictor_registers_and_its_spec_must_be_an_eviction_spec():
    class Evictors:
        def __init__(self, spec):
            self.spec = spec

        @hookimpl
        def kvcompress_evictors(self):
            return [EvictorMethod(name="recent", spec=self.spec, factory=lambda spec, ctx: None)]

    registry = Registry(entry_points=False)
    registry.register(Evictors(RecentSpec), "recent-plugin")
    assert registry.get("evict", "recent").spec is RecentSpec
    registry = Registry(entry_points=False)
    with pytest.raises(PluginError, match="plugin 'bad-plugin'.*must subclass kvcompress.EvictionSpec"):
        registry.register(Evictors(RecentPlainSpec), "bad-plugin")
    assert "bad-plugin" not in registry.plugins


def test_core_methods_are_registered():
    registry = Registry(entry_points=False)
    assert "float" in registry.names("quantizer")
    assert "decode" in registry.names("estimator")


def test_in_process_plugin_registers():
    registry = Registry(entry_points=False)
    registry.register(EchoPlugin(), "echo-plugin")
    assert registry.get("quantizer", "echo").spec is EchoSpec
    assert registry.provided("quantizer")["echo"].plugin.name == "echo-plugin"


def test_duplicate_method_names_fail_naming_both_distributions():
    registry = Registry(entry_points=False)
    registry.register(EchoPlugin(), "first-dist")
    with pytest.raises(PluginError, match="plugin 'second-dist'.*clashing with 'echo' of plugin 'first-dist'"):
        registry.register(EchoPlugin(), "second-dist")


def test_unknown_method_lists_installed_and_the_package_to_install():
    registry = Registry(entry_points=False)
    with pytest.raises(UnknownMethodError) as info:
        registry.get("quantizer", "qjl")
    message = str(info.value)
    assert "installed: float" in message and "pip install kvcompress-qjl" in message


def test_wrong_descriptor_type_is_reported():
    class Wrong:
        @hookimpl
        def kvcompress_estimators(self):
            return [QuantizerMethod(name="x", spec=EchoSpec, factory=lambda s, c: None)]

    registry = Registry(entry_points=False)
    with pytest.raises(PluginError, match="plugin 'wrong'.*returned QuantizerMethod from kvcompress_estimators; expected EstimatorMethod"):
        registry.register(Wrong(), "wrong")


@pytest.fixture
def broken_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution on sys.path whose kvcompress entry point fails to import."""
    dist = tmp_path / "kvcompress_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvcompress-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kvcompress]\nkvcompress-broken = kvcompress_broken_mod\n")
    (tmp_path / "kvcompress_broken_mod.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_failing_plugin_raises_in_library_calls(broken_distribution):
    with pytest.raises(PluginError, match="kvcompress-broken.*needs libfoo"):
        Registry(strict=True)


def test_failing_plugin_is_recorded_and_skipped_when_lenient(broken_distribution):
    registry = Registry(strict=False)
    assert [(f.name, f.distribution) for f in registry.failed] == [("kvcompress-broken", "kvcompress-broken")]
    assert "needs libfoo" in registry.failed[0].error
    assert "float" in registry.names("quantizer")


def test_disabled_plugins_are_not_loaded(broken_distribution, monkeypatch):
    monkeypatch.setenv("KVCOMPRESS_DISABLE_PLUGINS", "something-else, kvcompress-broken")
    registry = Registry(strict=True)
    assert "kvcompress-broken" not in registry.plugins
    assert "kvcompress_broken_mod" not in sys.modules


def test_disabled_method_error_says_it_is_blocked(monkeypatch):
    monkeypatch.setenv("KVCOMPRESS_DISABLE_PLUGINS", "kvcompress-scalar")
    registry = Registry(strict=True)
    with pytest.raises(UnknownMethodError, match="blocked by KVCOMPRESS_DISABLE_PLUGINS"):
        registry.get("quantizer", "scalar")


def test_plugin_modules_import_nothing_heavy():
    """Registering every installed plugin must not import torch or triton (factories do that)."""
    import subprocess

    code = textwrap.dedent(
        """
        import sys
        from kvcompress.plugins import Registry
        registry = Registry(strict=True)
        assert registry.names("quantizer")
        heavy = [m for m in ("torch", "triton", "transformers") if m in sys.modules]
        print(",".join(heavy))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _faulty(kind: str) -> object:
    """A plugin object with one fault of the kinds users and plugin authors make."""

    class NoTag(MethodSpec):
        method: str = "notag"

    class FloatTwin(MethodSpec):
        method: Literal["float"] = "float"

    def quantizers(result):
        class Plugin:
            @hookimpl
            def kvcompress_quantizers(self):
                return result() if callable(result) else result

        return Plugin()

    if kind == "raises":
        return quantizers(lambda: 1 / 0)
    if kind == "not a list":
        return quantizers(QuantizerMethod(name="echo", spec=EchoSpec, factory=lambda s, c: None))
    if kind == "no tag":
        return quantizers([QuantizerMethod(name="notag", spec=NoTag, factory=lambda s, c: None)])
    if kind == "tag differs":
        return quantizers([QuantizerMethod(name="other", spec=EchoSpec, factory=lambda s, c: None)])
    if kind == "name None":
        return quantizers([QuantizerMethod(name=None, spec=EchoSpec, factory=lambda s, c: None)])
    if kind == "tag of another plugin":
        return quantizers([QuantizerMethod(name="float", spec=FloatTwin, factory=lambda s, c: None)])

    class Misspelt:
        if kind == "extra argument":
            @hookimpl
            def kvcompress_quantizers(self, extra):
                return []
        else:
            @hookimpl(optionalhook=True)
            def kvcompress_quantiser(self):
                return []

    return Misspelt()


FAULTS = {
    "raises": "raised ZeroDivisionError from kvcompress_quantizers",
    "not a list": "returned QuantizerMethod from kvcompress_quantizers; expected a list",
    "no tag": "must declare method: Literal\\['notag'\\]",
    "tag differs": "must declare method: Literal\\['other'\\]",
    "name None": "whose name is None",
    "tag of another plugin": "clashing with 'float' of plugin 'kvcompress'",
    "extra argument": "has a hook pluggy refuses",
    "misspelt hook": "defines kvcompress_quantiser, which is no kvcompress hook",
}


@pytest.mark.parametrize("kind", FAULTS)
def test_a_faulty_plugin_is_refused_naming_it_and_the_rest_goes_on(kind):
    strict = Registry(entry_points=False)
    with pytest.raises(PluginError, match=f"plugin 'faulty'.*{FAULTS[kind]}"):
        strict.register(_faulty(kind), "faulty")
    lenient = Registry(strict=False, entry_points=False)
    lenient.register(_faulty(kind), "faulty")
    lenient.register(EchoPlugin(), "healthy")
    assert [info.name for info in lenient.failed] == ["faulty"]
    assert set(lenient.names("quantizer")) == {"float", "echo"} and "faulty" not in lenient.plugins


def test_a_plugin_that_exits_on_import_is_reported(tmp_path, monkeypatch):
    dist = tmp_path / "kvcompress_exits-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvcompress-exits\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kvcompress]\nkvcompress-exits = kvcompress_exits_mod\n")
    (tmp_path / "kvcompress_exits_mod.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry(strict=False)
    assert [info.name for info in registry.failed] == ["kvcompress-exits"] and "SystemExit" in registry.failed[0].error


def test_a_factory_returning_none_is_a_plugin_error_naming_its_distribution():
    class Lazy:
        @hookimpl
        def kvcompress_quantizers(self):
            return [QuantizerMethod(name="echo", spec=EchoSpec, factory=lambda spec, ctx: None)]

    from kvcompress.pipeline import build_codecs
    from kvcompress.spec import parse_spec

    registry = Registry(entry_points=False)
    registry.register(Lazy(), "lazy-plugin")
    spec = parse_spec({"name": "x", "keys": {"quantizer": {"method": "echo"}}, "values": {"quantizer": {"method": "float"}}}, registry=registry)
    with pytest.raises(PluginError, match="quantizer factory of 'echo' \\(plugin 'lazy-plugin'.*returned None"):
        build_codecs(spec, 1, 8, 1, registry=registry)


def test_a_plugin_returning_one_name_twice_is_refused():
    class Twice:
        @hookimpl
        def kvcompress_quantizers(self):
            return [QuantizerMethod(name="echo", spec=EchoSpec, factory=lambda s, c: None)] * 2

    with pytest.raises(PluginError, match="plugin 'twice'.*returns 'echo' twice from kvcompress_quantizers"):
        Registry(entry_points=False).register(Twice(), "twice")


def test_the_finite_check_screens_with_a_sum_and_confirms_elementwise():
    """A sum that overflows (finite values near float32's maximum) is not mistaken for NaN or Inf."""
    from kvcompress.pipeline import _check_finite

    _check_finite(torch.full((1, 2, 8, 4), 3e38), "keys")
    for bad in (float("nan"), float("inf")):
        x = torch.full((1, 2, 8, 4), 3e38)
        x[0, 1, 7, 3] = bad
        with pytest.raises(ValueError, match="keys: 1 non-finite values"):
            _check_finite(x, "keys")
