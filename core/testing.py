"""Conformance kit for selection strategies, built-in or third-party.

Run it on your strategy before you publish it:

    python -m dataselect.testing my_strategy            # one strategy
    python -m dataselect.testing --all                  # every registered one
    python -m dataselect.testing my_strategy -o k=v     # with options

or from pytest: `dataselect.testing.check_strategy("my_strategy")` raises
`ConformanceError` (an AssertionError) naming the broken rule.

Every check goes through `dataselect.scoring.ScoringSession` — the code the
server and the embedded trainer both run — with a tiny model on random
images, so it takes seconds and needs no data set. The rules:

* budget: exactly `budget` positions (or 0..budget for `exact_budget=False`);
* ids: every selected id comes from the pool; no repeats unless the
  strategy declares `with_replacement` (which must then return weights);
* weights, when returned: one per selected id, finite and positive;
* determinism: two sessions with the same seed select the same ids;
* micro-batching: scoring in micro-batches of 1 selects what one batch does;
* state: a checkpoint update keeps the strategy instance (and its state),
  and selection still follows the rules after reports and a new checkpoint;
* options: an unknown option is refused with InvalidArgument;
* robustness: a strategy that raises, returns scores of the wrong shape or
  NaN/infinite scores fails the checks with the scoring session's message
  (naming the strategy and its plugin); nothing crashes the kit.

It works on any registered strategy: built-in, registered at run time
(`dataselect.plugins.register_plugin`), or installed through an entry point
(`pip install -e .` of your plugin package).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dataselect.checkpoint import make_checkpoint
from dataselect.errors import DataselectError, InvalidArgument
from dataselect.models import build_model
from dataselect.registry import get_strategy, strategies
from dataselect.scoring import PoolChunk, ScoringSession
from dataselect.strategy import Progress

TINY_MODEL = "mlp"
TINY_KWARGS = dict(num_classes=4, in_channels=1, image_size=8, mean=(0.5,), std=(0.25,))


class ConformanceError(AssertionError):
    """A strategy broke one of the selection contract's rules."""


@dataclass
class CheckResult:
    strategy: str
    check: str
    ok: bool
    message: str = ""


def _pool(n: int, seed: int, start_id: int = 1000) -> PoolChunk:
    g = torch.Generator().manual_seed(seed)
    size = TINY_KWARGS["image_size"]
    inputs = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, TINY_KWARGS["num_classes"], (n,), generator=g)
    ids = torch.randperm(10 * n, generator=g)[:n] + start_id
    return PoolChunk(ids=ids, labels=labels, inputs=inputs)


def _session(strategy: str, options: dict[str, Any], seed: int, micro_batch: int = 1024,
             dataset_size: int = 4096) -> ScoringSession:
    session = ScoringSession(strategy, options, TINY_MODEL, TINY_KWARGS, num_classes=TINY_KWARGS["num_classes"],
                             seed=seed, dataset="conformance", dataset_size=dataset_size, micro_batch=micro_batch)
    # Seed only the weights: the global RNG must keep moving, or a strategy that
    # (wrongly) draws from it would look deterministic.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(TINY_MODEL, **TINY_KWARGS)
    session.load_checkpoint(make_checkpoint(TINY_MODEL, TINY_KWARGS, model, version=1), version=1)
    if "irreducible_loss" in session.signals:  # RHO-LOSS: a second model, as the trainer would push it
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            irreducible = build_model(TINY_MODEL, **TINY_KWARGS)
        session.load_irreducible(irreducible.state_dict())
    return session


def _report(session: ScoringSession, chunk: PoolChunk, epoch: int, total_epochs: int) -> None:
    g = torch.Generator().manual_seed(epoch)
    n = chunk.ids.numel()
    losses = torch.rand(n, generator=g) * 3
    session.report(chunk.ids, losses, torch.exp(-losses), torch.rand(n, generator=g) > 0.5,
                   Progress(epoch=epoch, total_epochs=total_epochs, fraction=epoch / total_epochs))


def _check_selection(session: ScoringSession, chunk: PoolChunk, budget: int, result) -> None:
    strategy = session.strategy_object
    name = session.strategy
    chosen = result.selected_ids
    exact = getattr(strategy, "exact_budget", True)
    repeats = getattr(strategy, "with_replacement", False)
    if exact and chosen.numel() != budget:
        raise ConformanceError(f"{name}: selected {chosen.numel()} ids for a budget of {budget}")
    if not exact and not 0 <= chosen.numel() <= budget:
        raise ConformanceError(f"{name}: variable selection of {chosen.numel()} ids is outside 0..{budget}")
    pool_ids = set(chunk.ids.tolist())
    stray = [i for i in chosen.tolist() if i not in pool_ids]
    if stray:
        raise ConformanceError(f"{name}: selected ids not in the pool: {stray[:5]}")
    if not repeats and len(set(chosen.tolist())) != chosen.numel():
        raise ConformanceError(f"{name}: selected an id twice without declaring with_replacement")
    if result.weights is not None:
        w = result.weights
        if w.numel() != chosen.numel() or not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
            raise ConformanceError(f"{name}: weights must be one finite positive value per selected id")


def _select(session: ScoringSession, chunk: PoolChunk, budget: int, epoch: int = 0, total_epochs: int = 4):
    progress = Progress(epoch=epoch, step=epoch * 10, total_epochs=total_epochs, fraction=epoch / total_epochs)
    return session.select([chunk], budget, progress=progress)


def check_budget_and_ids(strategy: str, options: dict[str, Any]) -> None:
    for n, budget in ((64, 16), (33, 1), (40, 40)):
        session = _session(strategy, options, seed=1)
        chunk = _pool(n, seed=n)
        _check_selection(session, chunk, budget, _select(session, chunk, budget))


def check_determinism(strategy: str, options: dict[str, Any]) -> None:
    chunk = _pool(96, seed=7)
    runs = []
    for _ in range(2):
        session = _session(strategy, options, seed=123)
        picks = []
        for epoch in range(3):
            if session.strategy_object.uses_reports:
                _report(session, chunk, epoch, 4)
            picks.append(_select(session, chunk, 24, epoch=epoch).selected_ids.tolist())
        runs.append(picks)
    if runs[0] != runs[1]:
        raise ConformanceError(f"{strategy}: two sessions with the same seed selected different ids")


def check_micro_batching(strategy: str, options: dict[str, Any]) -> None:
    chunk = _pool(50, seed=3)
    whole = _select(_session(strategy, options, seed=5, micro_batch=1024), chunk, 10).selected_ids
    tiny = _select(_session(strategy, options, seed=5, micro_batch=1), chunk, 10).selected_ids
    if whole.tolist() != tiny.tolist():
        raise ConformanceError(f"{strategy}: micro-batches of 1 select differently from one batch "
                               f"({tiny.tolist()[:5]}... vs {whole.tolist()[:5]}...)")


def check_state_survives_checkpoints(strategy: str, options: dict[str, Any]) -> None:
    session = _session(strategy, options, seed=9)
    instance = session.strategy_object
    chunk = _pool(80, seed=11)
    for epoch in range(4):
        if instance.uses_reports:
            _report(session, chunk, epoch, 4)
        _check_selection(session, chunk, 20, _select(session, chunk, 20, epoch=epoch))
        model = build_model(TINY_MODEL, **TINY_KWARGS)
        session.load_checkpoint(make_checkpoint(TINY_MODEL, TINY_KWARGS, model, version=epoch + 2), version=epoch + 2)
        if session.strategy_object is not instance:
            raise ConformanceError(f"{strategy}: a checkpoint update replaced the strategy instance (state lost)")


def check_options_validated(strategy: str, options: dict[str, Any]) -> None:
    try:
        _session(strategy, {**options, "no_such_option_xyz": 1}, seed=0)
    except InvalidArgument:
        return
    raise ConformanceError(f"{strategy}: an unknown option was accepted instead of raising InvalidArgument")


CHECKS: dict[str, Callable[[str, dict[str, Any]], None]] = {
    "budget and ids": check_budget_and_ids,
    "deterministic with a seed": check_determinism,
    "micro-batching": check_micro_batching,
    "state survives checkpoint updates": check_state_survives_checkpoints,
    "options validated": check_options_validated,
}


def run_checks(strategy: str, options: dict[str, Any] | None = None) -> list[CheckResult]:
    """Run every check; never raises for a broken strategy (see each result)."""
    options = dict(options or {})
    results = []
    for label, check in CHECKS.items():
        try:
            check(strategy, options)
            results.append(CheckResult(strategy, label, True))
        except ConformanceError as exc:
            results.append(CheckResult(strategy, label, False, str(exc)))
        except DataselectError as exc:
            results.append(CheckResult(strategy, label, False, f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # a crash is a failed check, reported with its type
            results.append(CheckResult(strategy, label, False, f"crashed: {type(exc).__name__}: {exc}"))
    return results


def check_strategy(strategy: str, options: dict[str, Any] | None = None) -> None:
    """Pytest helper: raise ConformanceError listing every failed rule."""
    failed = [r for r in run_checks(strategy, options) if not r.ok]
    if failed:
        raise ConformanceError("; ".join(f"[{r.check}] {r.message}" for r in failed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataselect.testing",
                                     description="Check that selection strategies follow dataselect's selection contract.")
    parser.add_argument("strategies", nargs="*", help="registered strategy names")
    parser.add_argument("--all", action="store_true", help="check every registered strategy")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="strategy option (repeatable)")
    args = parser.parse_args(argv)
    names = list(strategies()) if args.all else args.strategies
    if not names:
        parser.error("name a strategy or pass --all")
    options = {}
    for item in args.option:
        if "=" not in item:
            parser.error(f"option {item!r} is not KEY=VALUE")
        key, value = item.split("=", 1)
        options[key] = value
    try:
        for name in names:
            get_strategy(name)
    except DataselectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    registered = strategies()
    for name in names:
        reg = registered[name]
        origin = " ".join(p for p in (reg.distribution, reg.version) if p)
        print(f"{name}: from plugin {reg.plugin} ({origin})")
        for r in run_checks(name, options):
            mark = "ok  " if r.ok else "FAIL"
            print(f"{mark} {name}: {r.check}" + ("" if r.ok else f" — {r.message}"))
            failures += not r.ok
    print(f"{sum(len(CHECKS) for _ in names) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
