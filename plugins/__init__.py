"""The plugin system's public names: the registry (`dataselect.registry`) and the built-in plugins.

The plugin manager and the strategy API live in the core (`dataselect.registry`,
`dataselect.strategy`, `dataselect.policies`, `dataselect.hookspecs`); this package re-exports
them under the names plugins have always used, and holds the built-in plugins
(`builtin_models`, `builtin_strategies`, `builtin_datasets`) and strategies (`strategies`).
The registry's `strategies()` is not re-exported here, where `strategies` names the built-in strategies'
package; `selectors()`, its 0.1 name, is.
"""

from __future__ import annotations

from dataselect.registry import (
    DEFAULT_PLUGINS,
    ENTRY_POINT_GROUP,
    Registered,
    _reset_for_tests,
    datasets,
    get_dataset_loader,
    get_model_builder,
    get_selector,
    get_strategy,
    hook_names,
    load_plugins,
    models,
    plugins,
    pm,
    register_plugin,
    selectors,
    unregister_plugin,
)

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "Registered", "datasets", "get_dataset_loader", "get_model_builder",
           "get_strategy", "hook_names", "load_plugins", "models", "plugins", "pm", "register_plugin",
           "unregister_plugin", "get_selector", "selectors"]
