"""Strategies scored from signals of one scoring pass: gradient norms and margins."""

from __future__ import annotations

import math

import torch

from dataselect.errors import InvalidArgument
from dataselect.plugins.strategies.warmup import fit_warmup
from dataselect.policies import apply_policy
from dataselect.names import SLIM_PROXY
from dataselect.strategy import AuxiliaryLoss, Option, Pool, RunPlan, Selection, Strategy


class HighGradientStrategy(Strategy):
    """Largest per-sample gradient norm ‖∇_θ ℓ_i‖₂ first.

    Gradient-norm importance as in Katharopoulos & Fleuret (ICML 2018), who
    also bound the norm by the last layer's. `scope=last_layer` (default): exact
    closed form for the final linear layer, from the forward pass alone.
    `scope=full`: exact norm over every parameter (torch.func per-sample
    gradients, chunked), far more expensive. Computed by the scoring pass, in
    eval mode.
    """

    name = "high_gradient"
    description = ("Largest per-sample gradient norm first (after Katharopoulos & Fleuret, ICML 2018); "
                   "scope=last_layer|full.")
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


class HighInfluenceStrategy(Strategy):
    """Largest input-gradient norm ‖∂ℓ_i/∂x_i‖₂ first, x in [0, 1] scale (scoring pass, eval mode).

    How strongly a sample's loss reacts to its own input: a cheap sensitivity
    heuristic, not the training-data influence of Pruthi et al. (NeurIPS 2020),
    which traces parameter gradients through training.
    """

    name = "high_influence"
    description = ("Largest input-gradient norm |dloss/dx| first (input sensitivity: a heuristic stand-in for "
                   "influence, cf. Pruthi et al., NeurIPS 2020).")
    default_mode = "online"
    default_policy = "topk"
    signals = frozenset({"input_grad_norm"})

    def score(self, pool: Pool) -> torch.Tensor:
        return pool.signals["input_grad_norm"]


class DynaMSStrategy(Strategy):
    """DynaMS (Wang et al., ICLR 2023): the samples closest to (or beyond) the decision boundary.

    Score = −margin, so top-k takes the k smallest margins. `kind=boundary`
    (default) is the signed distance to the nearest boundary of the final
    linear layer in penultimate-feature space; `kind=logit` the logit margin.
    Margins come from the scoring pass (eval mode).

    Warm-up: `warmup_epochs` (default 1) full-data epochs before the first
    selection. The margins of an untrained model say little: selecting with it
    put a subset of MNIST on a few classes (classes 5 and 8 got 0 and 1 of
    3,000 samples). Subset mode rounds the warm-up up to whole epochs, so 1 is
    its shortest; online mode takes fractions (0.25). A warm-up that would fill
    the run is cut to half the run with a warning; a 1-epoch run in subset or
    weighted mode is refused, naming the fixes (`plan`).

    Dynamic re-selection is the trainer's job in `subset` mode: it re-scores
    the training set every `refresh` epochs after warm-up (the resolved option
    it reads).

    `schedule=constant` selects exactly `budget`. `schedule=power` (our choice;
    the paper leaves the form open) treats `budget` as the final size: at
    0-based epoch e of E it selects ceil(budget · ((1 + t)/2)^exponent) with
    t = (e + 1)/E, the share of training done when that epoch ends (or
    Progress.fraction when E is unknown), so the last epoch trains on the whole
    budget and the first of a long run on about budget/2^exponent. The
    selection is then variable-size (`exact_budget` False).

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
    description = ("Smallest decision-boundary margin first after a warm-up epoch, re-selected every `refresh` "
                   "epochs (DynaMS, Wang et al., ICLR 2023).")
    default_mode = "subset"
    default_policy = "topk"
    signals = frozenset({"boundary_margin"})
    options = {
        "kind": Option(str, "boundary", "boundary: distance to the decision boundary; logit: logit margin",
                       choices=("boundary", "logit")),
        "warmup_epochs": Option(float, 1.0, "full-data epochs before the first selection (online mode: fractions "
                                "allowed, e.g. 0.25)", min=0.0, max=1000.0),
        "refresh": Option(int, 1, "re-select the subset every this many epochs", min=1, max=1000),
        "schedule": Option(str, "constant", "selection size over training: constant or power",
                           choices=("constant", "power")),
        "exponent": Option(float, 2.0, "schedule=power: size = budget·((1+t)/2)^exponent, t = share of training "
                           "done at the end of the epoch", min=0.0, max=10.0),
        "proxy": Option(str, "none", "none: margins from the full model; psp: from the parameter-sharing proxy, "
                        "a slim sub-network trained jointly", choices=("none", "psp")),
        "width_ratio": Option(float, 0.5, "proxy=psp: fraction of each layer's channels the proxy keeps, in (0, 1]",
                              min=0.0, max=1.0),
        "proxy_weight": Option(float, 1.0, "proxy=psp: weight of the proxy's loss term in training", min=0.0,
                               max=100.0),
        "agreement_sample": Option(int, 512, "proxy=psp: pool samples on which each Select measures the proxy's "
                                   "rank correlation with the full model (0: off)", min=0, max=1_000_000),
    }
    PROXY_OPTIONS = ("width_ratio", "proxy_weight", "agreement_sample")
    #: Set with proxy=psp: the scoring session computes the signals with the model's slim sub-network of
    #: this width (`dataselect.proxy`) and reports its agreement with the full model on the first
    #: `proxy_agreement_sample` samples of each pool; the trainer trains it through `auxiliary_loss`.
    proxy_width_ratio: float | None = None
    proxy_loss_weight: float = 1.0
    proxy_agreement_sample: int = 512

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
            self.auxiliary_loss = AuxiliaryLoss(SLIM_PROXY, self.proxy_loss_weight,
                                                {"width_ratio": self.proxy_width_ratio})
        else:
            stray = sorted(k for k in (options or {}) if k in self.PROXY_OPTIONS)
            if stray:
                raise InvalidArgument(f"strategy 'dynams': option(s) {', '.join(stray)} only apply with proxy=psp")

    @classmethod
    def plan(cls, options, run: RunPlan):
        return fit_warmup(
            cls.name, options, run, minimum=0.0 if run.mode == "online" else 1.0,
            needs="the margins of an untrained model put the subset on a few classes",
            fixes="Train for --epochs 2 or more, use --mode online with a fractional warm-up (-o warmup_epochs=0.25), "
                  "or pass -o warmup_epochs=0 to select with the untrained model.")

    def score(self, pool: Pool) -> torch.Tensor:
        return -pool.signals[self.signal]

    def scheduled_size(self, budget: int, pool: Pool) -> int:
        if self.opts["schedule"] == "constant":
            return budget
        p = pool.progress
        t = (p.epoch + 1) / p.total_epochs if p.total_epochs > 0 else p.fraction
        t = min(max(t, 0.0), 1.0)
        return max(1, min(budget, math.ceil(budget * ((1.0 + t) / 2.0) ** self.opts["exponent"])))

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        return apply_policy(policy, self.score(pool), pool.labels, self.scheduled_size(budget, pool),
                            self.context.generator)
