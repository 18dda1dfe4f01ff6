"""Plugin discovery and the registry: hook results flattened into name -> descriptor maps."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from kvcompress import hookspecs
from kvcompress.errors import PluginError, UnknownMethodError, UnsupportedModelError
from kvcompress.methods import EVICTION, KNOWN_PROVIDERS, METHOD_KINDS, OBSERVABLES, ModelAdapter, ReaderMethod

from kvcompress.spec_base import EvictionSpec

ENTRY_POINT_GROUP = "kvcompress"
DISABLE_ENV = "KVCOMPRESS_DISABLE_PLUGINS"
CORE_PLUGIN = "kvcompress"
ADAPTER_HOOK = "kvcompress_model_adapters"


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin: its name, the distribution that ships it, and a load error if any."""

    name: str
    distribution: str
    version: str
    error: str | None = None


@dataclass(frozen=True)
class Provided:
    """A descriptor together with the plugin that provided it."""

    method: Any
    plugin: PluginInfo


def disabled_plugins() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


class Registry:
    """Methods by stage and name, and model adapters by name, built from every registered plugin.

    strict=True (library default): a plugin that fails to import raises PluginError.
    strict=False (the CLI): it is recorded in `failed` and skipped; the caller reports it.
    """

    def __init__(self, strict: bool = True, entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = strict
        self.plugins: dict[str, PluginInfo] = {}
        self.failed: list[PluginInfo] = []
        self._methods: dict[str, dict[str, Provided]] | None = None
        self._adapters: dict[str, Provided] | None = None
        self._readers: list[Provided] | None = None
        from kvcompress import builtin

        self.register(builtin, PluginInfo(CORE_PLUGIN, "kvcompress", _version("kvcompress")))
        if entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        blocked = disabled_plugins()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked:
                continue
            dist = ep.dist.name if ep.dist is not None else ep.name
            version = ep.dist.version if ep.dist is not None else "?"
            try:
                module = ep.load()
            except Exception as exc:  # any import failure of third-party code is reported, not hidden
                info = PluginInfo(ep.name, dist, version, f"{type(exc).__name__}: {exc}")
                if self.strict:
                    raise PluginError(
                        f"plugin {ep.name!r} (distribution {dist} {version}) failed to import: {info.error}. "
                        f"Fix or uninstall it, or set {DISABLE_ENV}={ep.name} to skip it."
                    ) from exc
                self.failed.append(info)
                continue
            self.register(module, PluginInfo(ep.name, dist, version))

    def register(self, plugin: ModuleType | object, info: PluginInfo | str) -> None:
        """Register a plugin object in-process (tests, notebooks). `info` may be just a name."""
        if isinstance(info, str):
            info = PluginInfo(info, info, "0")
        if info.name in self.plugins:
            raise PluginError(f"a plugin named {info.name!r} is already registered ({self.plugins[info.name].distribution})")
        self.pm.register(plugin, name=info.name)
        self.plugins[info.name] = info
        self._methods = self._adapters = self._readers = None

    def _results(self, hook_name: str, expected: type):
        """(descriptor, plugin) for everything the implementations of `hook_name` return, each descriptor with
        the plugin that gave it (the implementations are called apart), checked to be an `expected`."""
        caller = getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):
            info = self.plugins[impl.plugin_name]
            for descriptor in impl.function() or []:
                if not isinstance(descriptor, expected):
                    raise PluginError(
                        f"plugin {info.name!r} ({info.distribution}) returned {type(descriptor).__name__} from "
                        f"{hook_name}; expected {expected.__name__}"
                    )
                yield descriptor, info

    def _collect(self) -> dict[str, dict[str, Provided]]:
        if self._methods is not None:
            return self._methods
        methods: dict[str, dict[str, Provided]] = {stage: {} for stage in METHOD_KINDS}
        for stage, record in METHOD_KINDS.items():
            for method, info in self._results(record.hook, record.descriptor):
                if method.name in methods[stage]:
                    raise PluginError(_provided_twice(f"{stage} {method.name!r}", methods[stage][method.name].plugin, info))
                unknown = set(getattr(method, "observes", ())) - set(OBSERVABLES)
                if unknown:
                    raise PluginError(
                        f"plugin {info.name!r} ({info.distribution}): {stage} {method.name!r} observes "
                        f"{', '.join(sorted(unknown))}; the cache can capture {', '.join(OBSERVABLES)}"
                    )
                if stage == EVICTION.name and not issubclass(method.spec, EvictionSpec):
                    raise PluginError(
                        f"plugin {info.name!r} ({info.distribution}): evictor {method.name!r} has the spec model "
                        f"{method.spec.__name__}; an evictor's spec must subclass kvcompress.EvictionSpec"
                    )
                methods[stage][method.name] = Provided(method, info)
        self._methods = methods
        return methods

    def adapters(self) -> dict[str, Provided]:
        """Model adapters by name. Adapters are not a spec stage: kvcompress.patch picks one by model type."""
        if self._adapters is not None:
            return dict(self._adapters)
        adapters: dict[str, Provided] = {}
        claimed: dict[str, Provided] = {}
        for adapter, info in self._results(ADAPTER_HOOK, ModelAdapter):
            if adapter.name in adapters:
                raise PluginError(_provided_twice(f"model adapter {adapter.name!r}", adapters[adapter.name].plugin, info))
            for model_type in sorted(adapter.model_types):
                if model_type in claimed:
                    other = claimed[model_type]
                    raise PluginError(_provided_twice(
                        f"an adapter for model type {model_type!r} ({other.method.name!r}, {adapter.name!r})",
                        other.plugin, info,
                    ))
                claimed[model_type] = Provided(adapter, info)
            adapters[adapter.name] = Provided(adapter, info)
        self._adapters = adapters
        return dict(adapters)

    def adapter_for(self, model_type: str) -> ModelAdapter:
        """The adapter that handles `model_type`, or UnsupportedModelError saying how one is added."""
        adapters = self.adapters()
        for provided in adapters.values():
            if model_type in provided.method.model_types:
                return provided.method
        covered = sorted(t for p in adapters.values() for t in p.method.model_types)
        raise UnsupportedModelError(
            f"no model adapter handles model type {model_type!r} (installed adapters cover: "
            f"{', '.join(covered) or 'none'}). A plugin can add one through the {ADAPTER_HOOK} hook: see "
            "'Model adapters' in docs/writing-a-plugin.md"
        )

    def readers(self) -> list[Provided]:
        """Layer-level readers in registration order (kvcompress_readers); names are unique."""
        if self._readers is None:
            found: dict[str, Provided] = {}
            for reader, info in self._results("kvcompress_readers", ReaderMethod):
                if reader.name in found:
                    raise PluginError(_provided_twice(f"reader {reader.name!r}", found[reader.name].plugin, info))
                found[reader.name] = Provided(reader, info)
            self._readers = list(found.values())
        return self._readers

    def names(self, stage: str) -> list[str]:
        return sorted(self._collect()[stage])

    def provided(self, stage: str) -> dict[str, Provided]:
        return dict(self._collect()[stage])

    def get(self, stage: str, name: str) -> Any:
        """The descriptor of `name` for `stage`, or UnknownMethodError saying what to install."""
        found = self._collect()[stage].get(name)
        if found is None:
            raise UnknownMethodError(unknown_method_message(stage, name, self.names(stage)))
        return found.method


def _provided_twice(what: str, first: PluginInfo, second: PluginInfo) -> str:
    return (
        f"{what} is provided twice: by {first.distribution} (plugin {first.name!r}) and by {second.distribution} "
        f"(plugin {second.name!r}). Uninstall one, or block one with {DISABLE_ENV}."
    )


def unknown_method_message(stage: str, name: str, installed: list[str]) -> str:
    message = f"unknown {stage} method {name!r}; installed: {', '.join(installed) or 'none'}"
    package = KNOWN_PROVIDERS.get(name)
    if package:
        message += f". {name!r} is provided by {package}: pip install {package}"
    if name in disabled_plugins() or (package and package in disabled_plugins()):
        message += f" (it is blocked by {DISABLE_ENV})"
    return message


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide strict registry, built on first use."""
    global _default
    if _default is None:
        _default = Registry(strict=True)
    return _default


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (None rebuilds it on next use): for tests and embedding."""
    global _default
    _default = registry


__all__ = ["PluginInfo", "Provided", "Registry", "get_registry", "set_registry"]
