"""The base class every selection strategy subclasses, and its options.

A strategy declares which per-sample signals it needs (the signals engine
computes them in one pass), turns them into scores (higher = selected
first), and names its default selection policy and training mode. Stateful
strategies keep per-sample state keyed by dataset id on `self`; the session
keeps the instance alive across checkpoint updates and drops it on close.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from dataselect.errors import InvalidArgument
from dataselect.names import MODES, SIGNALS, parse_bool
# Selection is what a policy returns, so it is defined with the policies.
from dataselect.policies import Selection, apply_policy

#: Training modes and signal names live in `dataselect.names` (one spelling for CLIs, engine and plugins).
__all__ = ["MODES", "SIGNALS", "Option", "SessionContext", "Progress", "RunPlan", "Pool", "Selection", "Strategy", "Selector",
           "IrreducibleTraining", "AuxiliaryLoss"]


@dataclass(frozen=True)
class Option:
    """One strategy option: its type, default and allowed values."""

    type: type
    default: Any
    help: str = ""
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None

    def parse(self, strategy: str, name: str, value: Any) -> Any:
        """Convert `value` (a CLI string or a JSON value) to this option's type, or raise."""
        kind = self.type.__name__
        try:
            if self.type is bool:
                parsed = parse_bool(value)
                if parsed is None:
                    raise ValueError
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                parsed = int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                parsed = float(value)
                if not math.isfinite(parsed):
                    raise ValueError
            else:
                if not isinstance(value, str):
                    raise ValueError
                parsed = value
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"strategy {strategy!r}: option {name}={value!r} is not a valid {kind}"
            ) from None
        if self.choices is not None and parsed not in self.choices:
            raise InvalidArgument(
                f"strategy {strategy!r}: option {name}={parsed!r} is not one of {', '.join(map(str, self.choices))}"
            )
        if self.min is not None and parsed < self.min:
            raise InvalidArgument(f"strategy {strategy!r}: option {name}={parsed} must be >= {self.min}")
        if self.max is not None and parsed > self.max:
            raise InvalidArgument(f"strategy {strategy!r}: option {name}={parsed} must be <= {self.max}")
        return parsed

    def describe(self) -> dict:
        out = {"type": self.type.__name__, "default": self.default, "help": self.help}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        for bound in ("min", "max"):  # the range `parse` enforces, so users see it before they hit it
            if getattr(self, bound) is not None:
                out[bound] = getattr(self, bound)
        return out


@dataclass
class SessionContext:
    """What a strategy knows about the session it lives in."""

    num_classes: int
    dataset: str = ""
    dataset_size: int = 0
    seed: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)


@dataclass
class Progress:
    """Training progress at the time of a call."""

    epoch: int = 0
    step: int = 0
    total_epochs: int = 0
    fraction: float = 0.0


@dataclass(frozen=True)
class RunPlan:
    """What the trainer knows about a run when it opens a session (see `Strategy.plan`)."""

    #: Total training epochs.
    epochs: int
    #: Training mode the run will use: online, subset or weighted.
    mode: str
    #: Training samples (0 = unknown).
    dataset_size: int = 0
    #: Samples per optimiser step.
    batch_size: int = 0
    #: --select-fraction: the share of each pool (online) or of the training set trained on.
    select_fraction: float = 1.0


@dataclass(frozen=True)
class IrreducibleTraining:
    """How the trainer trains the irreducible-loss model a strategy asks for (see `Strategy.irreducible_training`).

    The trainer holds out the ids of `dataselect.holdout.HoldOut(share, session seed)`, trains a freshly
    initialised copy of the model on them for `epochs` epochs with AdamW (`lr`, `weight_decay`), counts the
    time as selection cost, and pushes the weights to the scorer, which computes each sample's loss under
    them once (the signal `irreducible_loss`)."""

    share: float
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.01


@dataclass(frozen=True)
class AuxiliaryLoss:
    """A loss term a strategy asks the trainer to add to its own (see `Strategy.auxiliary_loss`).

    `name` is a registered auxiliary loss (hook `register_auxiliary_losses`; `dataselect plugins` lists
    the plugins): the trainer builds it for its model with `params`, and adds `weight` times its
    per-sample terms, weighted like the main loss. It reaches a remote trainer in the OpenSession reply.
    """

    name: str
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "params": dict(self.params)}


@dataclass
class Pool:
    """A scored candidate pool: ids, labels and the signals the strategy asked for."""

    ids: torch.Tensor  # int64 [n], CPU
    labels: torch.Tensor  # int64 [n], CPU
    signals: dict[str, torch.Tensor]  # each [n, ...], CPU
    progress: Progress
    #: Version of the checkpoint the signals were computed with (-1: none or unknown).
    checkpoint_version: int = -1

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class Report:
    """Training-side statistics for samples just trained on, one row per sample (what `on_report` gets).

    New fields may be added with defaults; a strategy reads the ones it needs by name."""

    ids: torch.Tensor  # int64 [n], CPU
    losses: torch.Tensor  # float32 [n]: the trainer's per-sample losses (its forward pass, train mode)
    true_class_probs: torch.Tensor | None = None  # float32 [n], when the trainer sent them
    correct: torch.Tensor | None = None  # bool [n]: argmax == label, when the trainer sent it
    progress: Progress = field(default_factory=Progress)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class Strategy:
    """Base class for selection strategies.

    Subclasses set the class attributes and override `score` (and, for
    whole-pool logic, `select`; for training-side statistics, `on_report`).
    """

    #: Marks strategy classes for the plugin manager, which checks registrations without importing torch.
    __dataselect_strategy__: ClassVar[bool] = True
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Training mode the trainer uses unless told otherwise: online|subset|weighted.
    default_mode: ClassVar[str] = "online"
    #: Selection policy applied to the scores: topk|class_balanced|sample|threshold.
    default_policy: ClassVar[str] = "topk"
    #: Signals the engine must compute for `score` (empty: no forward pass).
    signals: ClassVar[frozenset[str]] = frozenset()
    #: True when the strategy learns from training-side reports (Report RPC).
    uses_reports: ClassVar[bool] = False
    #: Declared options; anything else is rejected.
    options: ClassVar[dict[str, Option]] = {}
    #: True: `select` returns exactly `budget` positions. False: it returns
    #: between 0 and `budget` (the budget is an upper bound), for strategies that
    #: keep a variable number by nature (selective backprop, InfoBatch). The
    #: session reads the *instance* attribute, so an option may change it.
    exact_budget: ClassVar[bool] = True
    #: True: positions may repeat (a draw with replacement, e.g. importance
    #: sampling); the trainer must train on each occurrence. Such strategies
    #: always return weights (one per drawn position).
    with_replacement: ClassVar[bool] = False
    #: True: in `subset` mode the trainer selects the subset once (after any
    #: warm-up) and trains on it for the rest of the run (MRMC's core-set).
    #: False: it re-selects every `refresh` epochs (the strategy's `refresh`
    #: option when it has one, else every epoch).
    static: ClassVar[bool] = False
    #: True: the strategy decides how many samples to keep by its own rule (InfoBatch
    #: prunes a share of the well-learned samples; Selective Backprop keeps each sample
    #: with a probability). The trainer then asks with the whole pool as the budget, the
    #: selection is variable-size (0..pool), and --select-fraction only sets the size of
    #: online candidate pools. False: the budget is the trainer's fraction of the pool.
    self_sized: ClassVar[bool] = False
    #: A loss term the trainer adds to its own while this strategy selects (`AuxiliaryLoss`, by the
    #: name of a registered auxiliary loss; set it on the instance when it depends on options), e.g.
    #: DynaMS training its parameter-sharing proxy jointly. None: the trainer's loss only.
    auxiliary_loss: AuxiliaryLoss | None = None
    #: "score_then_policy": selection is `score` followed by the policy (the default `select`), so the
    #: session checks the scores before the policy and replicas merge scores exactly; "whole_pool": `select`
    #: has logic of its own. Declare it when you override `select`; left undeclared, it is set once, when the
    #: class is defined, from whether the class overrides `select`.
    select_kind: ClassVar[str] = "score_then_policy"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "select_kind" not in cls.__dict__:
            cls.select_kind = "score_then_policy" if cls.select is Strategy.select else "whole_pool"
        if cls.select_kind not in ("score_then_policy", "whole_pool"):
            raise TypeError(f"{cls.__name__}.select_kind must be 'score_then_policy' or 'whole_pool', "
                            f"got {cls.select_kind!r}")

    def __init__(self, options: dict[str, Any] | None = None, context: SessionContext | None = None):
        self.opts = self.resolve_options(options or {})
        self.context = context or SessionContext(num_classes=0)
        # The signals this instance needs; a subclass whose signals depend on an
        # option reassigns it (the class attribute is the default, shown in info()).
        self.signals = frozenset(type(self).signals)

    @classmethod
    def resolve_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Apply defaults and validate; unknown names raise listing the known ones."""
        unknown = sorted(set(given) - set(cls.options))
        if unknown:
            known = ", ".join(sorted(cls.options)) or "none"
            raise InvalidArgument(
                f"strategy {cls.name!r} has no option {', '.join(unknown)}; known options: {known}"
            )
        resolved = {k: opt.default for k, opt in cls.options.items()}
        for key, value in given.items():
            resolved[key] = cls.options[key].parse(cls.name, key, value)
        return resolved

    @classmethod
    def info(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "description": cls.description,
            "default_mode": cls.default_mode,
            "default_policy": cls.default_policy,
            "signals": sorted(cls.signals),
            "uses_reports": cls.uses_reports,
            "exact_budget": cls.exact_budget,
            "with_replacement": cls.with_replacement,
            "static": cls.static,
            "self_sized": cls.self_sized,
            "select_kind": cls.select_kind,
            "options": {k: v.describe() for k, v in cls.options.items()},
        }

    @classmethod
    def irreducible_training(cls, options: dict[str, Any]) -> IrreducibleTraining | None:
        """For a strategy whose `signals` hold `irreducible_loss`: how the trainer trains the model behind it,
        from the resolved options. Default None (no such model)."""
        return None

    @classmethod
    def plan(cls, options: dict[str, Any], run: RunPlan) -> dict[str, Any]:
        """Adapt resolved options to a run before its session opens; returns the options to use.

        Called on the trainer's side with `resolve_options`' result, e.g. to scale a
        warm-up to the run's `epochs`. The options returned are what the session is
        opened with (on a server too), so the strategy sees the same values everywhere.
        Raise `InvalidArgument` naming the fix when the strategy cannot work in this run;
        `warnings.warn` what the user should know (the trainer prints it). Default: unchanged.
        """
        return options

    # -- the strategy's own logic -------------------------------------------------
    def score(self, pool: Pool) -> torch.Tensor:
        """Per-sample scores for the pool, float [n]; higher is selected first."""
        raise NotImplementedError(f"strategy {self.name!r} does not implement score()")

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        """Choose `budget` samples. The default scores the pool and applies the policy."""
        scores = self.score(pool)
        return apply_policy(policy, scores, pool.labels, budget, self.context.generator)

    def on_report(self, report: Report) -> None:
        """Training-side statistics for samples just trained on (default: ignored). One `Report`
        argument, as `score` gets one `Pool`, so the statistics can grow without breaking strategies."""


#: The 0.1 name of `Strategy`, kept so plugins written against it still load (one concept, one word:
#: new code says Strategy).
Selector = Strategy
