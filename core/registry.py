"""The plugin manager and the registries it fills (also importable as `dataselect.plugins`).

Built-in strategies and models are ordinary plugins registered through the
same hooks a third-party package implements; third-party plugins are found
through the `dataselect` entry-point group. `DATASELECT_PLUGINS` (a comma
list of entry-point names) restricts which third-party plugins load;
`DATASELECT_PLUGINS_DENY` excludes some (built-in plugins always load).
Loading is lazy and idempotent. A third-party plugin that fails to import,
implements a hook that does not exist (a misspelt name) or registers
something invalid is not loaded; `plugins()` (and `dataselect plugins`)
reports it with its error, a warning is logged, and the rest load.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import pluggy

from dataselect import __version__, hookspecs
from dataselect.errors import InvalidArgument, PluginError
from dataselect.names import MODES, POLICIES, SIGNALS

if TYPE_CHECKING:
    from dataselect.strategy import Strategy

ENTRY_POINT_GROUP = "dataselect"

log = logging.getLogger("dataselect.plugins")

#: Modules of the built-in plugins, registered before any third-party one.
DEFAULT_PLUGINS = (
    "dataselect.plugins.builtin_models",
    "dataselect.plugins.builtin_strategies",
    "dataselect.plugins.builtin_datasets",
)

pm = pluggy.PluginManager(hookspecs.PROJECT)
pm.add_hookspecs(hookspecs)


@dataclass
class Registered:
    obj: Any
    plugin: str
    distribution: str
    version: str


@dataclass
class _State:
    loaded: bool = False
    strategies: dict[str, Registered] = field(default_factory=dict)
    models: dict[str, Registered] = field(default_factory=dict)
    datasets: dict[str, Registered] = field(default_factory=dict)
    auxiliary_losses: dict[str, Registered] = field(default_factory=dict)
    #: plugin name -> (distribution, version)
    plugins: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: plugin name -> error message for plugins that failed to load
    failed: dict[str, str] = field(default_factory=dict)


_state = _State()
_lock = threading.RLock()


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def load_plugins() -> None:
    """Register built-in plugins and installed entry points (once)."""
    with _lock:
        if _state.loaded:
            return
        for modname in DEFAULT_PLUGINS:
            if pm.get_plugin(modname) is None:
                pm.register(importlib.import_module(modname), name=modname)
            _state.plugins[modname] = ("dataselect", __version__)
        allow = _env_list("DATASELECT_PLUGINS")
        deny = _env_list("DATASELECT_PLUGINS_DENY") or set()
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            if (allow is not None and ep.name not in allow) or ep.name in deny:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            dist = getattr(ep, "dist", None)
            dist_name = dist.name if dist is not None else "?"
            dist_version = dist.version if dist is not None else "?"
            label = f"plugin {ep.name!r} ({dist_name} {dist_version})"
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not stop the rest
                _fail(ep.name, f"{label} failed to import {ep.value!r}: {type(exc).__name__}: {exc}")
                continue
            try:
                pm.register(module, name=ep.name)
                pm.check_pending()
            except Exception as exc:
                if pm.get_plugin(ep.name) is not None:
                    pm.unregister(name=ep.name)
                _fail(ep.name, f"{label}: {_hook_error(module, exc)}")
                continue
            _state.plugins[ep.name] = (dist_name, dist_version)
        _state.loaded = True
        _collect()


def _fail(name: str, message: str) -> None:
    _state.failed[name] = message
    log.warning("dataselect plugin not loaded: %s", message)


def hook_names() -> list[str]:
    """The hooks a plugin may implement (the specifications in `dataselect.hookspecs`)."""
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), f"{hookspecs.PROJECT}_spec"))


def _hook_error(plugin: Any, exc: BaseException) -> str:
    """Name the misspelt hook(s) and the known ones; pluggy's own message only shows the plugin's repr."""
    known = hook_names()
    marker = f"{hookspecs.PROJECT}_impl"
    unknown = sorted(n for n in dir(plugin) if hasattr(getattr(plugin, n, None), marker) and n not in known)
    if not unknown:  # e.g. a hook argument the spec does not have; pluggy's message says which
        return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"implements unknown hook {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"{'; '.join(hints)}; dataselect's hooks are: {', '.join(known)}"


def _collect(strict: str | None = None) -> None:
    """Run the registration hooks and rebuild the registries.

    A plugin whose registration fails (a duplicate name, an invalid class, an
    exception in its hook) contributes nothing and is reported in `plugins()`;
    for the plugin named `strict` (one being registered at run time) the error
    is raised instead.
    """
    strategies: dict[str, Registered] = {}
    models: dict[str, Registered] = {}
    datasets: dict[str, Registered] = {}
    auxiliary: dict[str, Registered] = {}
    for plugin_name in list(_state.plugins):
        plugin = pm.get_plugin(plugin_name)
        if plugin is None:
            continue
        dist, version = _state.plugins[plugin_name]
        # Register into copies: a plugin that fails half-way leaves no partial registrations.
        mine_s, mine_m, mine_d, mine_a = dict(strategies), dict(models), dict(datasets), dict(auxiliary)
        try:
            for hook in ("register_strategies", "register_selectors"):  # the second is the hook's 0.1 name
                _run_hook(plugin, plugin_name, hook, _strategy_register(mine_s, plugin_name, dist, version))
            _run_hook(plugin, plugin_name, "register_models", _model_register(mine_m, plugin_name, dist, version))
            _run_hook(plugin, plugin_name, "register_datasets", _dataset_register(mine_d, plugin_name, dist, version))
            _run_hook(plugin, plugin_name, "register_auxiliary_losses",
                      _named_register("auxiliary loss", "factory", mine_a, plugin_name, dist, version))
        except Exception as exc:
            if plugin_name == strict or plugin_name in DEFAULT_PLUGINS:
                raise
            message = str(exc) if isinstance(exc, InvalidArgument) else f"{type(exc).__name__}: {exc}"
            _fail(plugin_name, f"plugin {plugin_name!r} ({dist} {version}) failed to register: {message}")
            continue
        _state.failed.pop(plugin_name, None)
        strategies, models, datasets, auxiliary = mine_s, mine_m, mine_d, mine_a
    _state.strategies = strategies
    _state.models = models
    _state.datasets = datasets
    _state.auxiliary_losses = auxiliary


def _run_hook(plugin: Any, plugin_name: str, hook: str, register: Callable) -> None:
    impls = [i for i in getattr(pm.hook, hook).get_hookimpls() if i.plugin is plugin]
    for impl in impls:
        impl.function(register=register) if "register" in impl.argnames else impl.function()


def _strategy_register(into: dict, plugin: str, dist: str, version: str) -> Callable:
    def register(cls: type) -> None:
        if not (isinstance(cls, type) and getattr(cls, "__dataselect_strategy__", False)):
            raise InvalidArgument(f"plugin {plugin!r} registered {cls!r}, which is not a Strategy subclass")
        if not cls.name or not cls.name.replace("_", "").replace("-", "").isalnum():
            raise InvalidArgument(f"plugin {plugin!r}: strategy {cls.__name__} needs a name of letters, digits, '_' or '-'")
        if cls.name in into:
            raise InvalidArgument(
                f"strategy name {cls.name!r} registered twice: by {into[cls.name].plugin!r} and by {plugin!r}"
            )
        if cls.default_mode not in MODES:
            raise InvalidArgument(f"plugin {plugin!r}: {cls.name}.default_mode must be one of {', '.join(MODES)}")
        if cls.default_policy not in POLICIES:
            raise InvalidArgument(f"plugin {plugin!r}: {cls.name}.default_policy must be one of {', '.join(POLICIES)}")
        unknown = set(cls.signals) - set(SIGNALS)
        if unknown:
            raise InvalidArgument(f"plugin {plugin!r}: {cls.name} asks for unknown signals {sorted(unknown)}; known: {', '.join(SIGNALS)}")
        into[cls.name] = Registered(cls, plugin, dist, version)

    return register


def _named_register(kind: str, what: str, into: dict, plugin: str, dist: str, version: str) -> Callable:
    """`register(name, obj)` for a registry of callables by name (models: builders; auxiliary losses: factories)."""
    def register(name: str, obj: Callable) -> None:
        if not callable(obj):
            raise InvalidArgument(f"plugin {plugin!r}: {kind} {name!r} {what} is not callable")
        if name in into:
            raise InvalidArgument(f"{kind} name {name!r} registered twice: by {into[name].plugin!r} and by {plugin!r}")
        into[name] = Registered(obj, plugin, dist, version)

    return register


def _model_register(into: dict, plugin: str, dist: str, version: str) -> Callable:
    return _named_register("model", "builder", into, plugin, dist, version)


def _dataset_register(into: dict, plugin: str, dist: str, version: str) -> Callable:
    def register(name: str, loader: Callable) -> None:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise InvalidArgument(f"plugin {plugin!r}: dataset name {name!r} must be letters, digits, '_' or '-' "
                                  "(users add an argument after a colon: NAME:ARGUMENT)")
        if not callable(loader):
            raise InvalidArgument(f"plugin {plugin!r}: dataset {name!r} loader is not callable")
        metavar = getattr(loader, "argument", None)
        if metavar is not None and (not isinstance(metavar, str) or not metavar):
            raise InvalidArgument(f"plugin {plugin!r}: dataset {name!r} loader.argument must be a non-empty string "
                                  f"such as 'DIR' (what users write after {name}:), got {metavar!r}")
        check = getattr(loader, "check", None)
        if check is not None and not callable(check):
            raise InvalidArgument(f"plugin {plugin!r}: dataset {name!r} loader.check must be callable(argument)")
        if name in into:
            raise InvalidArgument(f"dataset name {name!r} registered twice: by {into[name].plugin!r} and by {plugin!r}")
        into[name] = Registered(loader, plugin, dist, version)

    return register


def register_plugin(plugin: Any, name: str) -> None:
    """Register a plugin object at run time (tests, notebooks). Undo with `unregister_plugin`.

    Raises PluginError for a misspelt hook or a hook with unknown arguments,
    and InvalidArgument for an invalid registration; the registries are then
    unchanged.
    """
    with _lock:
        load_plugins()
        try:
            pm.register(plugin, name=name)
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
            raise PluginError(f"plugin {name!r}: {_hook_error(plugin, exc)}") from None
        _state.plugins[name] = ("(runtime)", "")
        try:
            _collect(strict=name)
        except Exception:
            pm.unregister(name=name)
            del _state.plugins[name]
            _collect()
            raise


def unregister_plugin(name: str) -> None:
    with _lock:
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
        _state.plugins.pop(name, None)
        _state.failed.pop(name, None)
        _collect()


def _failed_note() -> str:
    """Where a name may have gone: plugins that failed to load (see `dataselect plugins`)."""
    if not _state.failed:
        return ""
    return "; plugins that failed to load (see `dataselect plugins`): " + "; ".join(_state.failed.values())


def _reset_for_tests() -> None:
    """Forget every entry-point plugin and load them again on next use.

    For tests that fake `importlib.metadata.entry_points` or change
    DATASELECT_PLUGINS: call it before and (in `finally`) after. Built-in and
    run-time plugins (`register_plugin`) are kept.
    """
    with _lock:
        runtime = {n: v for n, v in _state.plugins.items() if v[0] == "(runtime)"}
        for name in list(_state.plugins) + list(_state.failed):
            if name not in DEFAULT_PLUGINS and name not in runtime and pm.get_plugin(name) is not None:
                pm.unregister(name=name)
        _state.plugins.clear()
        _state.failed.clear()
        _state.strategies, _state.models, _state.datasets, _state.auxiliary_losses = {}, {}, {}, {}
        _state.loaded = False
        load_plugins()
        _state.plugins.update(runtime)
        _collect()


def _lookup(registry: str, kind: str, kinds: str, name: str) -> Any:
    """The object registered under `name` in the registry `registry` (strategies or models); an unknown
    name lists the known ones, and the plugins that failed to load."""
    load_plugins()
    table: dict[str, Registered] = getattr(_state, registry)
    try:
        return table[name].obj
    except KeyError:
        raise InvalidArgument(f"unknown {kind} {name!r}; known {kinds}: {', '.join(sorted(table))}"
                              f"{_failed_note()}") from None


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered under `name`; unknown names list the known ones."""
    return _lookup("strategies", "strategy", "strategies", name)


def strategies() -> dict[str, Registered]:
    load_plugins()
    return dict(sorted(_state.strategies.items()))


#: The 0.1 names of `get_strategy` and `strategies`, kept for plugins and scripts written against them.
get_selector = get_strategy
selectors = strategies


def get_model_builder(name: str) -> Callable:
    return _lookup("models", "model", "models", name)


def models() -> dict[str, Registered]:
    load_plugins()
    return dict(sorted(_state.models.items()))


def _dataset_label(name: str, loader: Callable) -> str:
    metavar = getattr(loader, "argument", None)
    return f"{name}:{metavar}" if metavar else name


def get_dataset_loader(name: str) -> Callable:
    """The dataset loader registered under `name` (the part of a spec before any colon)."""
    load_plugins()
    try:
        return _state.datasets[name].obj
    except KeyError:
        known = ", ".join(_dataset_label(n, r.obj) for n, r in sorted(_state.datasets.items()))
        raise InvalidArgument(f"unknown dataset {name!r}; known datasets: {known}{_failed_note()}") from None


def datasets() -> dict[str, Registered]:
    load_plugins()
    return dict(sorted(_state.datasets.items()))


def get_auxiliary_loss(name: str) -> Callable:
    """The factory of the auxiliary loss registered under `name` (hook `register_auxiliary_losses`);
    unknown names list the known ones."""
    return _lookup("auxiliary_losses", "auxiliary loss", "auxiliary losses", name)


def auxiliary_losses() -> dict[str, Registered]:
    load_plugins()
    return dict(sorted(_state.auxiliary_losses.items()))


def plugins() -> list[dict[str, Any]]:
    """Loaded plugins (name, distribution, version, hooks) and the ones that failed."""
    load_plugins()
    out = []
    for name, (dist, version) in _state.plugins.items():
        plugin = pm.get_plugin(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or []) if plugin is not None else []
        out.append({"name": name, "distribution": dist, "version": version, "hooks": hooks, "error": _state.failed.get(name)})
    for name, err in _state.failed.items():
        if name not in _state.plugins:
            out.append({"name": name, "distribution": "?", "version": "?", "hooks": [], "error": err})
    return out
