"""Plugin discovery and the registry: hook results flattened into name -> descriptor maps."""

from __future__ import annotations

import importlib.metadata
import os
import typing
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import pluggy

from kvcompress import hookspecs
from kvcompress.errors import PluginError, UnknownMethodError, UnsupportedModelError
from kvcompress.methods import EVICTION, KNOWN_PROVIDERS, METHOD_KINDS, OBSERVABLES, ModelAdapter, ReaderMethod

from kvcompress.spec_base import EvictionSpec, MethodSpec

ENTRY_POINT_GROUP = "kvcompress"
DISABLE_ENV = "KVCOMPRESS_DISABLE_PLUGINS"
CORE_PLUGIN = "kvcompress"
ADAPTER_HOOK = "kvcompress_model_adapters"
READER_HOOK = "kvcompress_readers"
# Every hook and the descriptor its implementations return.
HOOK_DESCRIPTORS: dict[str, type] = {
    **{stage.hook: stage.descriptor for stage in METHOD_KINDS.values()},
    READER_HOOK: ReaderMethod,
    ADAPTER_HOOK: ModelAdapter,
}


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
        self._provided: dict[str, dict[str, list[Any]]] = {}  # plugin -> hook -> its checked descriptors
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
            except (Exception, SystemExit) as exc:  # third-party import failures (even sys.exit) are reported
                self._reject(PluginInfo(ep.name, dist, version, f"failed to import: {type(exc).__name__}: {exc}"), exc)
                continue
            self.register(module, PluginInfo(ep.name, dist, version))

    def register(self, plugin: ModuleType | object, info: PluginInfo | str) -> None:
        """Register a plugin object in-process (tests, notebooks). `info` may be just a name.

        Its hooks are called once, here, and what they return is checked (a list of the hook's descriptors,
        named, each spec model tagged with its method's name, no name another plugin provides). A plugin that
        fails any check is not registered: a strict registry raises PluginError naming its distribution, a
        lenient one records it in `failed` and goes on without it."""
        if isinstance(info, str):
            info = PluginInfo(info, info, "0")
        if info.name in self.plugins:
            raise PluginError(f"a plugin named {info.name!r} is already registered ({self.plugins[info.name].distribution})")
        try:
            self.pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:
            self._reject(replace(info, error=f"has a hook pluggy refuses: {exc}"), exc)
            return
        try:
            provided = self._check_plugin(plugin, info)
        except PluginError as exc:
            self.pm.unregister(name=info.name)
            self._reject(replace(info, error=str(exc)), exc)
            return
        self.plugins[info.name] = info
        self._provided[info.name] = provided
        self._methods = self._adapters = self._readers = None

    def _reject(self, info: PluginInfo, cause: BaseException) -> None:
        if self.strict:
            raise PluginError(
                f"plugin {info.name!r} (distribution {info.distribution} {info.version}) {info.error}. Fix or "
                f"uninstall it, or set {DISABLE_ENV}={info.name} to skip it."
            ) from cause
        self.failed.append(info)

    def _check_plugin(self, plugin: object, info: PluginInfo) -> dict[str, list[Any]]:
        """What each of the plugin's hooks returns, checked; PluginError (without the plugin's name) otherwise."""
        for name in dir(plugin):
            if name.startswith("kvcompress_") and callable(getattr(plugin, name, None)) and name not in HOOK_DESCRIPTORS:
                raise PluginError(f"defines {name}, which is no kvcompress hook (the hooks: {', '.join(sorted(HOOK_DESCRIPTORS))})")
        provided: dict[str, list[Any]] = {}
        for hook, expected in HOOK_DESCRIPTORS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name != info.name:
                    continue
                try:
                    result = impl.function()
                except Exception as exc:  # third-party code: its failure is reported, not raised through
                    raise PluginError(f"raised {type(exc).__name__} from {hook}: {exc}") from exc
                if result is None:
                    result = []
                if not isinstance(result, (list, tuple)):
                    raise PluginError(f"returned {type(result).__name__} from {hook}; expected a list of {expected.__name__}")
                for index, descriptor in enumerate(result):
                    self._check_descriptor(descriptor, hook, expected)
                    if any(descriptor.name == earlier.name for earlier in result[:index]):
                        raise PluginError(f"returns {descriptor.name!r} twice from {hook}")
                provided[hook] = list(result)
        return provided

    def _check_descriptor(self, descriptor: Any, hook: str, expected: type) -> None:
        if not isinstance(descriptor, expected):
            raise PluginError(f"returned {type(descriptor).__name__} from {hook}; expected {expected.__name__}")
        name = getattr(descriptor, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"returned a {expected.__name__} from {hook} whose name is {name!r}; name it with a non-empty string")
        unknown = set(getattr(descriptor, "observes", ())) - set(OBSERVABLES)
        if unknown:
            raise PluginError(f"{name!r} observes {', '.join(sorted(unknown))}; the cache can capture {', '.join(OBSERVABLES)}")
        spec = getattr(descriptor, "spec", None)
        if spec is not None:
            field = spec.model_fields.get("method") if isinstance(spec, type) and issubclass(spec, MethodSpec) else None
            if field is None:
                raise PluginError(f"{name!r}: its spec model {getattr(spec, '__name__', spec)!r} is not a kvcompress.MethodSpec")
            if typing.get_args(field.annotation) != (name,) or field.default != name:
                raise PluginError(
                    f"{name!r}: its spec model {spec.__name__} must declare method: Literal[{name!r}] = {name!r} (the tag "
                    f"spec files write), not {field.annotation!r} = {field.default!r}"
                )
        if hook == EVICTION.hook and not issubclass(spec, EvictionSpec):
            raise PluginError(f"evictor {name!r} has the spec model {spec.__name__}; an evictor's spec must subclass kvcompress.EvictionSpec")
        for other, provided in self._provided.items():
            for held in provided.get(hook, ()):
                clash = held.name == name
                if hook == ADAPTER_HOOK:
                    clash = clash or bool(set(held.model_types) & set(descriptor.model_types))
                if clash:
                    raise PluginError(
                        f"provides {name!r} through {hook}, clashing with {held.name!r} of plugin {other!r} "
                        f"({self.plugins[other].distribution}); uninstall one, or block one with {DISABLE_ENV}"
                    )

    def _results(self, hook_name: str):
        """(descriptor, plugin) for everything the plugins returned from `hook_name`, in registration order."""
        for name, info in self.plugins.items():
            for descriptor in self._provided[name].get(hook_name, ()):
                yield descriptor, info

    def _collect(self) -> dict[str, dict[str, Provided]]:
        if self._methods is not None:
            return self._methods
        methods: dict[str, dict[str, Provided]] = {stage: {} for stage in METHOD_KINDS}
        for stage, record in METHOD_KINDS.items():
            for method, info in self._results(record.hook):
                methods[stage][method.name] = Provided(method, info)
        self._methods = methods
        return methods

    def adapters(self) -> dict[str, Provided]:
        """Model adapters by name. Adapters are not a spec stage: kvcompress.patch picks one by model type."""
        if self._adapters is not None:
            return dict(self._adapters)
        # registration refused a second adapter of one name or one model type
        self._adapters = {adapter.name: Provided(adapter, info) for adapter, info in self._results(ADAPTER_HOOK)}
        return dict(self._adapters)

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
            self._readers = [Provided(reader, info) for reader, info in self._results(READER_HOOK)]
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
