"""The strategy API, re-exported from `dataselect.strategy` (where it lives) for plugins that import it from here."""

from __future__ import annotations

from dataselect.strategy import (
    MODES,
    SIGNALS,
    IrreducibleTraining,
    Option,
    Pool,
    Progress,
    Report,
    RunPlan,
    Selection,
    Selector,
    Strategy,
    SessionContext,
)

__all__ = ["MODES", "SIGNALS", "Option", "SessionContext", "Progress", "RunPlan", "Pool", "Selection", "Strategy", "Selector",
           "IrreducibleTraining"]
