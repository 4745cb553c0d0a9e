"""The hook specifications, re-exported from `dataselect.hookspecs` (where they live, with the plugin API's
documentation) for plugins that import `hookimpl` from here."""

from __future__ import annotations

from dataselect.hookspecs import PROJECT, hookimpl, hookspec, register_datasets, register_models, register_strategies

__all__ = ["PROJECT", "hookimpl", "hookspec", "register_datasets", "register_models", "register_strategies"]
