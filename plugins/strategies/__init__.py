"""The published strategies beyond the baselines (registered by `plugins.builtin_strategies`)."""

from dataselect.plugins.strategies.glister import GlisterStrategy
from dataselect.plugins.strategies.mrmc import MRMCStrategy
from dataselect.plugins.strategies.report_based import (
    ImportanceSamplingStrategy,
    InfoBatchStrategy,
    SelectiveBackpropStrategy,
)
from dataselect.plugins.strategies.rho_loss import RhoLossStrategy
from dataselect.plugins.strategies.signal_based import DynaMSStrategy, HighGradientStrategy, HighInfluenceStrategy
from dataselect.plugins.strategies.tracin import TracInStrategy

STRATEGIES = [
    HighGradientStrategy,
    HighInfluenceStrategy,
    DynaMSStrategy,
    MRMCStrategy,
    ImportanceSamplingStrategy,
    SelectiveBackpropStrategy,
    InfoBatchStrategy,
    TracInStrategy,
    GlisterStrategy,
    RhoLossStrategy,
]
