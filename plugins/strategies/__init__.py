"""The published strategies beyond the baselines (registered by `plugins.builtin_strategies`)."""

from dataselect.plugins.strategies.glister import GlisterSelector
from dataselect.plugins.strategies.mrmc import MRMCSelector
from dataselect.plugins.strategies.report_based import (
    ImportanceSamplingSelector,
    InfoBatchSelector,
    SelectiveBackpropSelector,
)
from dataselect.plugins.strategies.rho_loss import RhoLossSelector
from dataselect.plugins.strategies.signal_based import DynaMSSelector, HighGradientSelector, HighInfluenceSelector
from dataselect.plugins.strategies.tracin import TracInSelector

STRATEGIES = [
    HighGradientSelector,
    HighInfluenceSelector,
    DynaMSSelector,
    MRMCSelector,
    ImportanceSamplingSelector,
    SelectiveBackpropSelector,
    InfoBatchSelector,
    TracInSelector,
    GlisterSelector,
    RhoLossSelector,
]
