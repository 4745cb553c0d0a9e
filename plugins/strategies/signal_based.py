"""Strategies scored from signals of one scoring pass: gradient norms and margins."""

from __future__ import annotations

import math

import torch

from dataselect.errors import InvalidArgument

from dataselect.plugins.base import Option, Pool, Selection, Selector
from dataselect.plugins.policies import apply_policy


class HighGradientSelector(Selector):
    """Largest per-sample gradient norm ‖∇_θ ℓ_i‖₂ first (seed 000).

    `scope=last_layer` (default): exact closed form for the final linear layer,
    from the forward pass alone. `scope=full`: exact norm over every parameter
    (torch.func per-sample gradients, chunked), far more expensive.
    """

    name = "high_gradient"
    description = "Largest per-sample gradient norm first (seed 000); scope=last_layer|full."
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset({"grad_norm_last"})
    options = {
        "scope": Option(str, "last_layer", "last_layer: closed form for the final layer; full: every parameter",
                        choices=("last_layer", "full")),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.signal = "grad_norm_full" if self.opts["scope"] == "full" else "grad_norm_last"
        self.signals = frozenset({self.signal})

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.signals[self.signal]


class HighInfluenceSelector(Selector):
    """Largest input-gradient norm ‖∂ℓ_i/∂x_i‖₂ first (seed 000), x in [0, 1] scale."""

    name = "high_influence"
    description = "Largest input-gradient norm first (seed 000)."
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset({"input_grad_norm"})

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.signals["input_grad_norm"]


class DynaMSSelector(Selector):
    """DynaMS (seed 002): the samples closest to (or beyond) the decision boundary.

    Score = −margin, so top-k takes the k smallest margins. `kind=boundary`
    (default) is the signed distance to the nearest boundary of the final
    linear layer in penultimate-feature space; `kind=logit` the logit margin.

    Dynamic re-selection is the trainer's job in `subset` mode: it re-scores
    the training set every `refresh` epochs (the resolved option it reads).

    `schedule=constant` selects exactly `budget`. `schedule=power` (our choice;
    the paper leaves the form open) treats `budget` as the final size and
    selects ceil(budget · ((1 + t)/2)^exponent) at training fraction t
    (Progress.fraction, or epoch/total_epochs), growing from budget/2^exponent
    to budget; the selection is then variable-size (`exact_budget` False).

    `proxy=none` (default) computes the margins with the full model.
    `proxy=psp` is the paper's parameter-sharing proxy (`dataselect.proxy`):
    the margins come from the model's slim sub-network, the first
    `width_ratio` of every layer's channels (conv FLOPs scale with about
    width_ratio²), which shares the learner's weights and is trained jointly:
    the trainer adds `proxy_weight × CE(proxy logits)` to its loss. Only models
    with such a sub-network (`slim_kwargs`: cnn-small, cnn-deep, mlp) can use
    it. Each Select reports the proxy's agreement with the full model, the
    Spearman rank correlation of their margins on the first
    `agreement_sample` pool samples (which costs a full-model forward of
    those samples; 0 turns it off).
    """

    name = "dynams"
    description = "Smallest decision-boundary margin first, re-selected every `refresh` epochs (DynaMS, seed 002)."
    default_mode = "subset"
    default_policy = "topk"
    signals = frozenset({"boundary_margin"})
    options = {
        "kind": Option(str, "boundary", "boundary: distance to the decision boundary; logit: logit margin",
                       choices=("boundary", "logit")),
        "refresh": Option(int, 1, "re-select the subset every this many epochs", min=1),
        "schedule": Option(str, "constant", "selection size over training: constant or power",
                           choices=("constant", "power")),
        "exponent": Option(float, 2.0, "schedule=power: size = budget·((1+t)/2)^exponent", min=0.0),
        "proxy": Option(str, "none", "none: margins from the full model; psp: from the parameter-sharing proxy, "
                        "a slim sub-network trained jointly", choices=("none", "psp")),
        "width_ratio": Option(float, 0.5, "proxy=psp: fraction of each layer's channels the proxy keeps, in (0, 1]",
                              min=0.0, max=1.0),
        "proxy_weight": Option(float, 1.0, "proxy=psp: weight of the proxy's loss term in training", min=0.0),
        "agreement_sample": Option(int, 512, "proxy=psp: pool samples on which each Select measures the proxy's "
                                   "rank correlation with the full model (0: off)", min=0),
    }
    PROXY_OPTIONS = ("width_ratio", "proxy_weight", "agreement_sample")

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.signal = "logit_margin" if self.opts["kind"] == "logit" else "boundary_margin"
        self.signals = frozenset({self.signal})
        self.exact_budget = self.opts["schedule"] == "constant"
        if self.opts["proxy"] == "psp":
            if not self.opts["width_ratio"] > 0.0:
                raise InvalidArgument(f"strategy 'dynams': option width_ratio={self.opts['width_ratio']} must be in (0, 1]")
            self.proxy_width_ratio = self.opts["width_ratio"]
            self.proxy_loss_weight = self.opts["proxy_weight"]
            self.proxy_agreement_sample = self.opts["agreement_sample"]
        else:
            stray = sorted(k for k in (options or {}) if k in self.PROXY_OPTIONS)
            if stray:
                raise InvalidArgument(f"strategy 'dynams': option(s) {', '.join(stray)} only apply with proxy=psp")

    def score(self, pool: Pool) -> torch.Tensor:
        return -pool.signals[self.signal]

    def scheduled_size(self, budget: int, pool: Pool) -> int:
        if self.opts["schedule"] == "constant":
            return budget
        p = pool.progress
        t = p.epoch / p.total_epochs if p.total_epochs > 0 else p.fraction
        t = min(max(t, 0.0), 1.0)
        return max(1, min(budget, math.ceil(budget * ((1.0 + t) / 2.0) ** self.opts["exponent"])))

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        return apply_policy(policy, self.score(pool), pool.labels, self.scheduled_size(budget, pool),
                            self.context.generator)
