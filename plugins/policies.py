"""The selection policies, re-exported from `dataselect.policies` (where they live) for plugins that import them from here."""

from __future__ import annotations

from dataselect.policies import (
    POLICIES,
    VARIABLE_SIZE_POLICIES,
    Selection,
    apply_policy,
    class_balanced,
    sample,
    threshold,
    topk,
)

__all__ = ["POLICIES", "VARIABLE_SIZE_POLICIES", "Selection", "apply_policy", "class_balanced", "sample", "threshold",
           "topk"]
