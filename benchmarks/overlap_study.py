"""Overlapped (stale) scoring: why it can collapse training, and which fix keeps the model.

With overlap the scorer chooses the samples for step t while the trainer runs
step t-1, so the pool is scored with weights one step old (up to N steps at
`--sync-every N`). This script reproduces that in a plain loop that mimics the
trainer's online mode exactly (same shuffle, candidate pools of
ceil(batch / fraction) samples, budget round(pool x fraction), cnn-small, SGD
lr 0.05 momentum 0.9, batch 64) and measures candidate fixes against fresh
scoring. Everything runs on the CPU with one thread, one training at a time.

The simulated scorer holds a copy of the weights from the last push; pushes
happen every `--sync-every` steps, and with overlap the pools needed for the
next batch are scored as soon as they are asked for, one batch ahead (for a
variable-size strategy, ceil(batch / mean kept per pool) pools ahead), in the
order the trainer's scoring pipeline runs them.

Subcommands (each writes under --out, default docs/results/overlap_study):

  grid     runs strategy x fraction x seed x fix cells; one JSON line per run in
           runs.jsonl, written as soon as the run ends; cells already there are
           skipped, so an interrupted study loses nothing.
  trace    one run per fix with per-step diagnostics of the chosen batches (class
           mix, loss under the scoring and the current model, gradient norm,
           predicted-class distribution and dead ReLUs on 1,000 test images,
           agreement with what fresh scoring would have chosen): trace_*.json
           and a PNG.
  table    accuracy mean ± std per strategy x fraction for chosen fixes, with
           the worst per-seed gap to a reference fix and the hidden share.
  product  the proposed CI collapse test through the product itself:
           dataselect.Session(..., overlap=True) embedded in a plain SGD loop on a
           few thousand MNIST images, ramp off (ramp_steps=0) against the default.
  report   tables (Markdown) from runs.jsonl: accuracy against fresh scoring per
           cell and seed, the hidden share of scoring, the costs.
  check    the real trainer (`dataselect-train`) against this loop, one cell.
  ci       the proposed CI collapse test as a timed probe on a few thousand
           MNIST images: plain one-step-stale high_loss against the fix.

Fixes (`--fixes`, comma-separated; parts of one fix joined by '+'):

  fresh          no overlap: every pool scored with the current weights.
  stale          overlap from the first step (today's default with a server).
  warm=K         fresh scoring for the first K steps, then overlap.
  auto=TAU       fresh scoring until the pool loss settles, then overlap. The
                 scorer returns each pool's mean loss; E is its exponential
                 moving average over pools (alpha 2/11) and E0 its value at the
                 10th pool. After at least 20 steps, overlap starts at the first
                 pool where E <= E0 / 2 and (E[-11] - E[-1]) / (E[-11] x steps
                 between them) < TAU: the loss has halved and now falls by less
                 than a share TAU of itself per step.
  rerank=M       the scorer proposes the M x budget best candidates by stale
                 score; the trainer computes their losses with the current
                 weights (a forward pass, no gradient) and trains the budget
                 with the highest fresh losses. Selective Backprop: candidates
                 are kept with probability q = min(1, M p_stale) and accepted
                 with probability p_fresh / q (p from fresh losses).
  mix=R          a share R of each stale batch is drawn uniformly from the rest
                 of the pool.
  anneal=K       the selected fraction rises linearly from 1 to --fraction over
                 the first K steps (Selective Backprop: beta from 0 to 3).
  guard=SIG:THR  divergence detection with fallback to fresh scoring for 20
                 steps, from what the trainer computes anyway. SIG=ratio: the
                 5-step mean of (chosen batch's mean loss in the trainer's
                 forward) / (its mean loss when the scorer chose it) is below
                 THR; SIG=conc: the 5-step mean share of the batch predicted as
                 one class is above THR; SIG=mis: the 5-step mean of
                 mean |trainer's loss - scorer's loss| / mean trainer's loss
                 over the chosen samples is above THR (with exact replay it is
                 zero). Every run records where each signal (ratio < 0.9,
                 conc > 0.9, mis > 0.05) would have fired: false alarms.
  replay=full    the scorer replays the trainer's coming optimiser steps on
                 the batches it already chose (same loss, SGD with the pushed
                 momentum buffers) and scores with the weights the pool will be
                 trained from; replay=head replays only the final layer's part.
  extrap=C       the scorer scores with w + C (w - w_previous_push).
  full=K         the first K steps train on every sample (pools of one batch, all
                 kept, not selected: Selective Backprop's priming, warmup_epochs,
                 which the product halves to 0.5 epoch for a 1-epoch run: K=234
                 at 30,000 images), then the rest of the fix applies.
  staleuntil=K   overlap for the first K steps, then fresh scoring: how early
                 must a detector switch to fresh scoring to save the run?
  half           (a modifier, e.g. fresh+half) weights and momentum buffers
                 reach the scorer rounded to float16, as with
                 --checkpoint-dtype float16: fresh+half is a null comparison
                 that shows how far a run drifts from a tiny numerical change.

Examples:

  python benchmarks/overlap_study.py grid --strategies high_loss --fractions 0.25 --seeds 1,2,3 --fixes fresh,stale
  python benchmarks/overlap_study.py trace --strategy high_loss --fraction 0.25 --seed 1 --fixes fresh,stale
  python benchmarks/overlap_study.py report
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

STRATEGIES = ("high_loss", "high_gradient", "high_influence", "selective_backprop")
#: The scoring signal of each strategy (Selective Backprop keeps by loss percentile).
SIGNAL = {"high_loss": "loss", "high_gradient": "grad_norm_last", "high_influence": "input_grad_norm",
          "selective_backprop": "loss"}
VARIABLE_SIZE = {"selective_backprop"}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "overlap_study"
#: Steps of the adaptive rule's look-back and its minimum fresh phase.
AUTO_WINDOW = 10
AUTO_MIN_STEPS = 20
#: Selective Backprop (Jiang et al., 2019): kept with probability percentile(loss)^beta over recent losses.
SB_BETA = 3.0
SB_HISTORY = 1024
#: Guard: steps averaged, and fresh steps after the signal recovers.
GUARD_WINDOW = 5
GUARD_HOLD = 20
#: Thresholds at which the guard signals are recorded as alarms in every run (false-alarm counts on fresh runs).
GUARD_RATIO = 0.9
GUARD_CONC = 0.9
GUARD_MIS = 0.05


# -- configuration ----------------------------------------------------------------------------------
@dataclass
class Fix:
    """One candidate fix, parsed from e.g. 'auto=0.01+rerank=2'."""

    spec: str
    overlap: bool = True
    warm_steps: int = 0
    auto_tau: float | None = None
    rerank: float = 0.0
    mix: float = 0.0
    anneal: int = 0
    guard: tuple[str, float] | None = None
    replay: str = ""
    extrap: float = 0.0
    half: bool = False
    stale_until: int = 0
    full_steps: int = 0

    @classmethod
    def parse(cls, spec: str) -> "Fix":
        fix = cls(spec=spec)
        for part in spec.split("+"):
            key, _, value = part.partition("=")
            try:
                if key == "fresh" and not value:
                    fix.overlap = False
                elif key == "stale" and not value:
                    pass
                elif key == "warm":
                    fix.warm_steps = int(value)
                elif key == "auto":
                    fix.auto_tau = float(value)
                elif key == "rerank":
                    fix.rerank = float(value)
                    if fix.rerank < 1:
                        raise ValueError("rerank needs M >= 1")
                elif key == "mix":
                    fix.mix = float(value)
                    if not 0.0 <= fix.mix <= 1.0:
                        raise ValueError("mix is a share in [0, 1]")
                elif key == "anneal":
                    fix.anneal = int(value)
                elif key == "guard":
                    sig, _, thr = value.partition(":")
                    if sig not in ("ratio", "conc", "mis"):
                        raise ValueError("guard signal must be 'ratio', 'conc' or 'mis'")
                    fix.guard = (sig, float(thr))
                elif key == "replay":
                    if value not in ("full", "head"):
                        raise ValueError("replay is 'full' or 'head'")
                    fix.replay = value
                elif key == "extrap":
                    fix.extrap = float(value)
                elif key == "half" and not value:
                    fix.half = True
                elif key == "full":
                    fix.full_steps = int(value)
                elif key == "staleuntil":
                    fix.stale_until = int(value)
                else:
                    raise ValueError(f"unknown part {part!r}")
            except ValueError as exc:
                raise SystemExit(f"--fixes: cannot read {spec!r}: {exc}; see --help for the forms") from None
        return fix


@dataclass
class RunConfig:
    strategy: str
    fraction: float
    seed: int
    fix: str
    sync_every: int = 1
    train_subset: int = 30000
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    #: Selective Backprop: "reference" (percentile counts losses < l, no cap, may keep none; Jiang et al.'s
    #: code) or "capped" (<= l, at most the budget by percentile, the top loss when none is kept).
    sb_rule: str = "reference"

    def key(self) -> str:
        return (f"{self.strategy}|{self.fraction:g}|{self.seed}|{self.fix}|sync{self.sync_every}|n{self.train_subset}"
                f"|{self.sb_rule if self.strategy in VARIABLE_SIZE else '-'}")


# -- the loop ---------------------------------------------------------------------------------------
class SelectiveBackprop:
    """Keep each candidate with probability percentile(loss)^beta over the last `history` losses."""

    def __init__(self, generator, rule: str = "reference", beta: float = SB_BETA, history: int = SB_HISTORY):
        self.hist: deque[float] = deque(maxlen=history)
        self.generator, self.rule, self.beta = generator, rule, beta

    def probabilities(self, loss, beta: float | None = None, *, record: bool = True):
        import torch

        if record:  # the pool's losses join the history first, as in the authors' code
            self.hist.extend(loss.double().tolist())
        h = torch.tensor(list(self.hist), dtype=torch.float64).sort().values
        pct = torch.searchsorted(h, loss.double(), right=self.rule == "capped").double() / max(1, h.numel())
        return pct.pow(self.beta if beta is None else beta), pct

    def select(self, loss, budget: int, beta: float | None = None):
        import torch

        p, pct = self.probabilities(loss, beta)
        draw = torch.rand(loss.numel(), generator=self.generator, dtype=torch.float64)
        kept = torch.nonzero(draw < p, as_tuple=True)[0]
        if self.rule == "capped":
            if kept.numel() == 0:
                kept = loss.argmax().view(1)
            elif kept.numel() > budget:
                kept = kept[torch.argsort(pct[kept], descending=True, stable=True)[:budget]]
        return kept, p


def topk(scores, k: int):
    """`dataselect.plugins.policies.topk`'s rule: highest first, ties by pool order."""
    import torch

    return torch.argsort(scores, descending=True, stable=True)[:k]


class Probe:
    """Diagnostics on a fixed probe set: predicted-class distribution, dead ReLUs, accuracy and loss."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __call__(self, model) -> dict:
        import torch
        import torch.nn.functional as F

        acts: list = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out.detach().clone()))
                 for m in model.modules() if isinstance(m, torch.nn.ReLU)]
        try:
            with torch.no_grad():
                logits = model(self.x)
        finally:
            for h in hooks:
                h.remove()
        pred = logits.argmax(1)
        dead = []
        for a in acts:  # a unit (conv: a channel) is dead when it is zero on every probe image and position
            a = a.transpose(0, 1).reshape(a.shape[1], -1)
            dead.append(float((a.amax(1) <= 0).float().mean()))
        return {"pred_dist": torch.bincount(pred, minlength=10).div(len(pred)).tolist(),
                "probe_acc": float((pred == self.y).float().mean()),
                "probe_loss": float(F.cross_entropy(logits, self.y)),
                "dead_relu": dead}


def evaluate(model, x, y, micro: int = 1024) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for s in range(0, len(y), micro):
            logits = model(x[s:s + micro])
            correct += int((logits.argmax(1) == y[s:s + micro]).sum())
            total_loss += float(F.cross_entropy(logits, y[s:s + micro], reduction="sum"))
    return correct / len(y), total_loss / len(y)


def score(model, x, y, strategy: str) -> dict:
    """The scorer's reply for a pool: the strategy's signal and the loss (for the adaptive rules)."""
    from dataselect.engine import compute_signals

    wanted = {"loss", SIGNAL[strategy]}
    return compute_signals(model, x, y, wanted, device="cpu")


class Scorer:
    """The scorer's copy of the model: weights from the last push, optionally brought forward.

    `replay`: after each push the scorer applies the trainer's coming optimiser steps itself, on the
    batches it already chose (it knows them: it selected them, and the trainer fills batches in
    selection order), so it scores with the weights the pool will actually be trained from.
    "full" replays the whole step (same loss, same SGD with the pushed momentum buffers); "head" only
    the final linear layer's part of it (body features computed once, no backward through the body).
    `extrap`: scores with w + c (w - w_previous_push) instead (no data needed).
    """

    def __init__(self, model, opt, fix: "Fix", cfg: "RunConfig", xs, ys, model_kwargs: dict):
        import copy

        from dataselect.models import build_model

        self.fix, self.cfg, self.xs, self.ys = fix, cfg, xs, ys
        self.model = build_model("cnn-small", **model_kwargs)
        self.trainer_model, self.trainer_opt = model, opt
        self.copy = copy
        self.step = 0  # trainer step whose weights were pushed last
        self.at = 0  # step the scoring weights correspond to (after replay)
        self.prev = None
        self.rep_opt = None
        self.seconds = 0.0
        self.replayed_steps = 0
        self.push(0)

    def push(self, step: int, *, for_fresh: bool = False) -> None:
        import torch

        state = self.trainer_model.state_dict()
        if self.fix.extrap:
            new = {k: v.detach().clone() for k, v in state.items()}
            if self.prev is not None and not for_fresh:
                state = {k: v + self.fix.extrap * (v - self.prev[k]) for k, v in new.items()}
            self.prev = new
        if self.fix.half:  # pushed as float16 (--checkpoint-dtype float16): the scorer's numbers differ a little
            state = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
        self.model.load_state_dict(state)
        self.step = self.at = step
        if self.fix.replay:
            self.rep_opt = torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum)
            opt_state = self.copy.deepcopy(self.trainer_opt.state_dict())
            if self.fix.half:
                for entry in opt_state["state"].values():
                    buf = entry.get("momentum_buffer")
                    if buf is not None:
                        entry["momentum_buffer"] = buf.half().float()
            self.rep_opt.load_state_dict(opt_state)

    def bring_to(self, target: int, batch_positions) -> None:
        """Replay the trainer's steps self.at+1 .. target; batch_positions(j) gives step j's samples."""
        import torch
        import torch.nn.functional as F

        while self.fix.replay and self.at < target:
            t0 = time.perf_counter()
            pos = batch_positions(self.at + 1)
            x, y = self.xs[pos], self.ys[pos]
            self.rep_opt.zero_grad(set_to_none=True)
            if self.fix.replay == "full":
                F.cross_entropy(self.model(x), y, reduction="none").mean().backward()
            else:  # head: the final layer's gradient from the body's features; the body stays as pushed
                with torch.no_grad():
                    h = self.model.features(x)
                F.cross_entropy(self.model.classifier(h), y, reduction="none").mean().backward()
            self.rep_opt.step()
            self.at += 1
            self.replayed_steps += 1
            self.seconds += time.perf_counter() - t0


def run(cfg: RunConfig, data, *, trace: Probe | None = None, log=None) -> dict:
    """One epoch of online selection under `cfg`; returns the summary (and the per-step trace when asked)."""
    import torch
    import torch.nn.functional as F

    from dataselect.models import build_model

    fix = Fix.parse(cfg.fix)
    strategy = cfg.strategy
    variable = strategy in VARIABLE_SIZE
    torch.manual_seed(cfg.seed)
    kwargs = data.info.model_kwargs()
    model = build_model("cnn-small", **kwargs)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    xs, ys = data.train_tensors.inputs, data.train_tensors.labels
    scorer = Scorer(model, opt, fix, cfg, xs, ys, kwargs)
    gen = torch.Generator().manual_seed(cfg.seed)  # random mixing
    sb = SelectiveBackprop(torch.Generator().manual_seed(cfg.seed + 7), cfg.sb_rule) if variable else None
    n = len(ys)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    bs = cfg.batch_size

    st = {"steps": 0, "cursor": 0, "overlap": fix.overlap and not fix.warm_steps and fix.auto_tau is None,
          "guard_until": -1}
    initial_steps: list[int] = [0] if st["overlap"] else []
    pending: deque[dict] = deque()
    buffer: list[tuple] = []  # (positions, scorer's losses, scored ahead?, agreement count)
    trained_log: list = []  # positions of every step (the replaying scorer reads past batches from it)
    kept_total, pools_total = 0, 0
    counts = {"pools": 0, "pools_fresh": 0, "pools_hidden": 0, "pools_fresh_after_initial": 0,
              "pools_rescored": 0, "rerank_forward_samples": 0, "samples_trained": 0, "samples_scored": 0}
    secs = {"train": 0.0, "score": 0.0, "rerank": 0.0}
    steps_trace: list[dict] = []
    loss_curve: list[tuple[int, float]] = []
    ema: list[tuple[int, float]] = []
    guard_ratio: deque[float] = deque(maxlen=GUARD_WINDOW)
    guard_conc: deque[float] = deque(maxlen=GUARD_WINDOW)
    guard_mis: deque[float] = deque(maxlen=GUARD_WINDOW)
    mismatch: list[float] = []  # per overlapped step: mean |trainer's loss - scorer's loss| / mean trainer's loss
    alarms = {"ratio": [], "conc": [], "mis": []}  # steps where each guard signal crossed its threshold (acted on or not)
    fallbacks: list[int] = []
    digest = hashlib.sha256()
    stale_stats = {"sum": 0, "n": 0, "max": 0}

    def priming() -> bool:
        return st["steps"] < fix.full_steps

    def fraction_now() -> float:
        if priming():
            return 1.0
        if fix.anneal and not variable:
            return cfg.fraction + (1.0 - cfg.fraction) * max(0.0, 1.0 - (st["steps"] - fix.full_steps) / fix.anneal)
        return cfg.fraction

    def beta_now() -> float:
        # (the anneal starts when any full-data priming ends)
        return SB_BETA * min(1.0, (st["steps"] - fix.full_steps) / fix.anneal) if fix.anneal and variable else SB_BETA

    def next_pool() -> dict | None:
        if st["cursor"] >= n:
            return None
        f = fraction_now()
        pos = order[st["cursor"]:st["cursor"] + math.ceil(bs / f)]
        st["cursor"] += len(pos)
        return {"pos": pos, "budget": len(pos) if variable else max(1, round(len(pos) * f))}

    def fresh_phase() -> bool:
        if fix.stale_until and st["steps"] >= fix.stale_until:
            return True
        return not st["overlap"] or st["steps"] < st["guard_until"]

    def queued_positions():
        """Samples chosen but not trained yet, in the order the trainer will train them."""
        parts = [b[0] for b in buffer] + [p["rows_pos"] for p in pending if "rows_pos" in p]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def serve(pool: dict, ahead: bool) -> None:
        """The scorer's Select: score `pool` and choose (ahead: with the pushed/replayed weights, else fresh)."""
        if not ahead:
            if scorer.step != st["steps"] or scorer.at != st["steps"]:
                scorer.push(st["steps"], for_fresh=True)
            use = scorer.model
        else:
            queued = queued_positions()
            target = st["steps"] + len(queued) // bs  # steps trained before this pool's first sample
            done = st["steps"]

            def batch_positions(j):
                if j <= done:
                    return trained_log[j - 1]
                k = j - done - 1
                return queued[k * bs:(k + 1) * bs]
            scorer.bring_to(target, batch_positions)
            use = scorer.model
        t0 = time.perf_counter()
        sig = score(use, xs[pool["pos"]], ys[pool["pos"]], strategy)
        secs["score"] += time.perf_counter() - t0
        counts["samples_scored"] += len(pool["pos"])
        pool.update(signals=sig, ahead=ahead, scored_at=scorer.at)
        s, budget = sig[SIGNAL[strategy]], pool["budget"]
        if priming():  # full-data steps: everything kept, nothing selected (Selective Backprop's history untouched)
            pool["rows"] = torch.arange(len(s))
        elif variable:
            if fix.rerank and ahead:
                p_stale, _ = sb.probabilities(sig["loss"], beta_now())
                q = (fix.rerank * p_stale).clamp(max=1.0)
                draw = torch.rand(len(q), generator=sb.generator, dtype=torch.float64)
                pool["cand"], pool["q"] = torch.nonzero(draw < q, as_tuple=True)[0], q
            else:
                pool["rows"], _ = sb.select(s, budget, beta_now())
        elif fix.rerank and ahead:
            pool["cand"] = topk(s, min(len(s), max(budget, round(fix.rerank * budget))))
        elif fix.mix and ahead:
            n_rand = round(fix.mix * budget)
            top = topk(s, budget - n_rand)
            rest = torch.ones(len(s), dtype=torch.bool)
            rest[top] = False
            others = torch.nonzero(rest, as_tuple=True)[0]
            pool["rows"] = torch.cat([top, others[torch.randperm(len(others), generator=gen)[:n_rand]]])
        else:
            pool["rows"] = topk(s, budget)
        if "rows" in pool:
            pool["rows_pos"] = pool["pos"][pool["rows"]]

    def fresh_losses(pos):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = F.cross_entropy(model(xs[pos]), ys[pos], reduction="none")
        secs["rerank"] += time.perf_counter() - t0
        counts["rerank_forward_samples"] += len(pos)
        return out

    def trainer_rows(pool: dict):
        """The trainer's part: re-rank proposed candidates with fresh losses (rerank), else take the Select's rows."""
        if "cand" in pool:
            cand = pool["cand"]
            fresh = fresh_losses(pool["pos"][cand])
            if variable:
                p_fresh, _ = sb.probabilities(fresh, beta_now(), record=False)
                draw = torch.rand(len(cand), generator=sb.generator, dtype=torch.float64)
                return cand[draw < p_fresh / pool["q"][cand]]
            return cand[topk(fresh, pool["budget"])]
        return pool["rows"]

    def agreement(pool: dict, rows) -> int:
        """How many of `rows` fresh scoring would also choose (trace only, exact-budget strategies)."""
        if trace is None or variable:
            return len(rows)
        if not pool["ahead"]:
            return len(rows)
        sig = score(model, xs[pool["pos"]], ys[pool["pos"]], strategy)
        return int(torch.isin(rows, topk(sig[SIGNAL[strategy]], pool["budget"])).sum())

    def auto_rule(pool: dict) -> None:
        """Adaptive initial phase: overlap once the pool loss has halved and falls by less than tau per step."""
        m = float(pool["signals"]["loss"].mean())
        loss_curve.append((st["steps"], m))
        if st["overlap"] or fix.auto_tau is None or not fix.overlap:
            return
        alpha = 2.0 / (AUTO_WINDOW + 1)
        ema.append((st["steps"], m if not ema else alpha * m + (1 - alpha) * ema[-1][1]))
        if st["steps"] >= AUTO_MIN_STEPS and len(ema) > AUTO_WINDOW:
            (s_old, old), (s_new, new) = ema[-1 - AUTO_WINDOW], ema[-1]
            start = ema[min(len(ema), AUTO_WINDOW) - 1][1]
            if new <= 0.5 * start and s_new > s_old and (old - new) / ((s_new - s_old) * old) < fix.auto_tau:
                st["overlap"] = True
                initial_steps.append(st["steps"])

    def train_step(parts: list[tuple]) -> None:
        pos = torch.cat([p[0] for p in parts])
        stale_l = torch.cat([p[1] for p in parts])
        ahead = any(p[2] for p in parts)
        x, y = xs[pos], ys[pos]
        # Staleness: steps between the weights that scored each sample and the ones this step starts from.
        lag = [st["steps"] - p[4] for p in parts]
        stale_stats["sum"] += sum(g * len(p[0]) for g, p in zip(lag, parts))
        stale_stats["n"] += len(pos)
        stale_stats["max"] = max(stale_stats["max"], max(lag))
        rec: dict = {}
        if trace is not None:
            with torch.no_grad():
                cur = F.cross_entropy(model(x), y, reduction="none")
            rec = {"class_counts": torch.bincount(y, minlength=10).tolist(),
                   "agreement": sum(p[3] for p in parts) / max(1, len(pos)),
                   "chosen_loss_current_mean": float(cur.mean())}
        t0 = time.perf_counter()
        logits = model(x)
        per = F.cross_entropy(logits, y, reduction="none")
        opt.zero_grad(set_to_none=True)
        per.mean().backward()
        if trace is not None:
            rec["grad_norm"] = float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())))
        opt.step()
        secs["train"] += time.perf_counter() - t0
        st["steps"] += 1
        steps = st["steps"]
        trained_log.append(pos)
        counts["samples_trained"] += len(pos)
        digest.update(pos.long().numpy().tobytes())  # ids = training-set positions, as the trainer's digest
        # Guard signals, from what the trainer has anyway: its forward's losses and predictions.
        fresh_mean, stale_mean = float(per.detach().mean()), float(stale_l.mean())
        pred = logits.detach().argmax(1)
        conc = float(torch.bincount(pred, minlength=10).max()) / len(pred)
        guard_conc.append(conc)
        if ahead:
            guard_ratio.append(fresh_mean / max(stale_mean, 1e-12))
            mis = float((per.detach() - stale_l).abs().mean()) / max(fresh_mean, 1e-12)
            guard_mis.append(mis)
            mismatch.append(mis)
        fired = {}
        for name, hist, thr, below in (("ratio", guard_ratio, GUARD_RATIO, True),
                                       ("conc", guard_conc, GUARD_CONC, False),
                                       ("mis", guard_mis, GUARD_MIS, False)):
            if len(hist) == GUARD_WINDOW:
                mean = sum(hist) / GUARD_WINDOW
                fired[name] = mean < thr if below else mean > thr
                if fired[name]:
                    alarms[name].append(steps)
        if fix.guard is not None and st["overlap"]:
            sig, thr = fix.guard
            hist = {"ratio": guard_ratio, "conc": guard_conc, "mis": guard_mis}[sig]
            if len(hist) == GUARD_WINDOW:
                mean = sum(hist) / GUARD_WINDOW
                if (mean < thr) if sig == "ratio" else (mean > thr):
                    if steps >= st["guard_until"]:
                        fallbacks.append(steps)
                    st["guard_until"] = steps + GUARD_HOLD
                    hist.clear()
        if trace is not None:
            rec.update(step=steps, batch_loss=fresh_mean, chosen_loss_scorer_mean=stale_mean,
                       chosen_loss_scorer_max=float(stale_l.max()), chosen_loss_current_max=float(per.max()),
                       overlapped=ahead, pred_concentration=conc, staleness=max(lag))
            rec.update(trace(model))
            steps_trace.append(rec)
        if steps % cfg.sync_every == 0:  # the trainer's push (fresh scoring pushes before it scores anyway)
            scorer.push(steps)

    t_run = time.perf_counter()
    buffered = 0
    while True:
        if not st["overlap"] and fix.overlap and fix.warm_steps and st["steps"] >= fix.warm_steps:
            st["overlap"] = True
            initial_steps.append(st["steps"])
        fresh_now = fresh_phase()
        if not fresh_now:
            ahead_n = 1 if not variable or kept_total == 0 else min(8, math.ceil(bs * pools_total / max(kept_total, 1)))
            while len(pending) < 1 + ahead_n:
                pool = next_pool()
                if pool is None:
                    break
                serve(pool, ahead=True)
                pending.append(pool)
        if not pending:
            pool = next_pool()
            if pool is None:
                break
            pending.append(pool)
        pool = pending.popleft()
        if fresh_now or "signals" not in pool:
            if "signals" in pool:  # asked for ahead before a fallback: scored again with the current weights
                counts["pools_rescored"] += 1
                for k in ("rows", "rows_pos", "cand", "q"):
                    pool.pop(k, None)
            serve(pool, ahead=False)
        counts["pools"] += 1
        if pool["ahead"]:
            counts["pools_hidden"] += 1
        else:
            counts["pools_fresh"] += 1
            if initial_steps:
                counts["pools_fresh_after_initial"] += 1
        auto_rule(pool)
        rows = trainer_rows(pool)
        kept_total += len(rows)
        pools_total += 1
        if len(rows):
            buffer.append((pool["pos"][rows], pool["signals"]["loss"][rows], pool["ahead"], agreement(pool, rows),
                           pool["scored_at"]))
            buffered += len(rows)
        while buffered >= bs:
            take, need = [], bs
            while need:
                p = buffer[0]
                if len(p[0]) <= need:
                    take.append(buffer.pop(0))
                    need -= len(p[0])
                else:
                    take.append((p[0][:need], p[1][:need], p[2], 0, p[4]))
                    buffer[0] = (p[0][need:], p[1][need:], p[2], p[3], p[4])
                    need = 0
            buffered -= bs
            train_step(take)
    if buffered:
        train_step(buffer)
        buffer.clear()
    wall = time.perf_counter() - t_run
    acc, test_loss = evaluate(model, data.test_tensors.inputs, data.test_tensors.labels)
    steps = st["steps"]
    after = counts["pools_hidden"] + counts["pools_fresh_after_initial"]
    out = {"key": cfg.key(), **asdict(cfg), "test_accuracy": acc, "test_loss": test_loss, "steps": steps,
           **counts, "initial_fresh_steps": initial_steps[0] if initial_steps else steps,
           "hidden_share_after_initial": counts["pools_hidden"] / after if after else 0.0,
           "hidden_share": counts["pools_hidden"] / max(1, counts["pools"]),
           "staleness_mean_steps": stale_stats["sum"] / max(1, stale_stats["n"]), "staleness_max_steps": stale_stats["max"],
           "guard_fallbacks": fallbacks, "alarms_ratio": alarms["ratio"], "alarms_conc": alarms["conc"],
           "alarms_mis": alarms["mis"],
           "mismatch_mean": sum(mismatch) / len(mismatch) if mismatch else None,
           "mismatch_max5": max((sum(mismatch[i:i + GUARD_WINDOW]) / GUARD_WINDOW
                                 for i in range(len(mismatch) - GUARD_WINDOW + 1)), default=None),
           "mean_kept_per_pool": kept_total / max(1, pools_total),
           "train_seconds": secs["train"], "score_seconds": secs["score"], "rerank_seconds": secs["rerank"],
           "replay_seconds": scorer.seconds, "replayed_steps": scorer.replayed_steps,
           "rerank_cost_per_step": secs["rerank"] / secs["train"] if secs["train"] else 0.0,
           "replay_cost_per_step": scorer.seconds / secs["train"] if secs["train"] else 0.0,
           "score_cost_per_step": secs["score"] / secs["train"] if secs["train"] else 0.0,
           "wall_seconds": wall, "selection_sha256": digest.hexdigest(),
           "pool_loss_curve": loss_curve[::5], "torch_threads": torch.get_num_threads()}
    if trace is not None:
        out["trace"] = steps_trace
    if log:
        log(f"{cfg.key()}: accuracy {acc:.4f}, loss {test_loss:.3f}, {steps} steps, initial fresh "
            f"{out['initial_fresh_steps']}, hidden after it {out['hidden_share_after_initial']:.2f}, "
            f"fallbacks {len(fallbacks)}, {wall:.0f}s")
    return out


# -- commands ---------------------------------------------------------------------------------------
def load(train_subset: int, data_dir: str):
    from dataselect.datasets import open_dataset

    return open_dataset("mnist", data_dir, download=False, train_subset=train_subset)


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            keys.add(json.loads(line)["key"])
    return keys


def cmd_grid(args) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / args.file
    done = done_keys(path)
    cells = [RunConfig(s, f, seed, fx, sync_every=args.sync_every, train_subset=args.train_subset, sb_rule=args.sb_rule)
             for fx in args.fixes for s in args.strategies for f in args.fractions for seed in args.seeds]
    for fx in args.fixes:
        Fix.parse(fx)
    todo = [c for c in cells if c.key() not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already in {path}, {len(todo)} to run", file=sys.stderr)
    if not todo:
        return
    data = load(args.train_subset, args.data_dir)
    for cfg in todo:
        res = run(cfg, data, log=lambda m: print(m, file=sys.stderr, flush=True))
        res["machine_load"] = os.getloadavg()[0]
        with open(path, "a") as fh:
            fh.write(json.dumps(res) + "\n")


def cmd_trace(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load(args.train_subset, args.data_dir)
    probe = Probe(data.test_tensors.inputs[:1000], data.test_tensors.labels[:1000])
    runs = {}
    for fx in args.fixes:
        cfg = RunConfig(args.strategy, args.fraction, args.seed, fx, sync_every=args.sync_every,
                        train_subset=args.train_subset, sb_rule=args.sb_rule)
        res = run(cfg, data, trace=probe, log=lambda m: print(m, file=sys.stderr, flush=True))
        runs[fx] = res
    stem = f"trace_{args.strategy}_f{args.fraction:g}_s{args.seed}_sync{args.sync_every}"
    (out / f"{stem}.json").write_text(json.dumps(runs))
    summary = trace_summary(runs)
    (out / f"{stem}_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    plot_trace(runs, out / f"{stem}.png", title=f"{args.strategy}, fraction {args.fraction:g}, seed {args.seed}",
               steps=args.plot_steps)
    print(f"wrote {out / stem}.json and .png", file=sys.stderr)


def _top(counts) -> int:
    return max(range(len(counts)), key=lambda i: counts[i])


def trace_series(tr: list[dict], key: str) -> list[float]:
    """One per-step series of a trace (derived ones included)."""
    if key == "top_class_share":
        return [max(r["class_counts"]) / max(1, sum(r["class_counts"])) for r in tr]
    if key == "repeat_class":  # 10-step share of batches whose commonest class is the previous batch's
        same = [0.0] + [float(_top(a["class_counts"]) == _top(b["class_counts"])) for b, a in zip(tr, tr[1:])]
        return [sum(same[max(0, i - 9):i + 1]) / len(same[max(0, i - 9):i + 1]) for i in range(len(same))]
    if key == "pred_top_share":
        return [max(r["pred_dist"]) for r in tr]
    if key == "dead_fc":
        return [r["dead_relu"][-1] for r in tr]
    if key == "dead_conv2":
        return [r["dead_relu"][1] for r in tr]
    if key == "loss_ratio":
        return [r["batch_loss"] / max(r["chosen_loss_scorer_mean"], 1e-12) for r in tr]
    return [r[key] for r in tr]


def trace_summary(runs: dict, cut: int = 30) -> dict:
    """Per run, means over steps 2..cut-1 and cut..end of the mechanism's figures (and the dead shares at each end)."""
    keys = ("repeat_class", "top_class_share", "pred_top_share", "agreement", "grad_norm", "loss_ratio",
            "batch_loss", "chosen_loss_scorer_mean")
    out = {}
    for name, res in runs.items():
        tr = res["trace"]
        seg = {}
        for label, lo, hi in (("early", 2, cut), ("late", cut, len(tr) + 1)):
            idx = [i for i, r in enumerate(tr) if lo <= r["step"] < hi]
            if not idx:
                continue
            row = {}
            for k in keys:
                series = trace_series(tr, k)
                row[k] = sum(series[i] for i in idx) / len(idx)
            row["grad_norm_max"] = max(tr[i]["grad_norm"] for i in idx)
            row["dead_fc_at_end"] = tr[idx[-1]]["dead_relu"][-1]
            row["dead_conv2_at_end"] = tr[idx[-1]]["dead_relu"][1]
            row["test_loss_at_end"] = tr[idx[-1]]["probe_loss"]
            row["steps"] = [tr[idx[0]]["step"], tr[idx[-1]]["step"]]
            seg[label] = row
        out[name] = {"test_accuracy": res["test_accuracy"], **seg}
    return out


def plot_trace(runs: dict, path: Path, title: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("probe_loss", "test loss (1,000 test images)"),
              ("batch_loss", "chosen batch: mean loss, current weights"),
              ("chosen_loss_scorer_mean", "chosen batch: mean loss, scoring weights"),
              ("grad_norm", "gradient norm of the step"),
              ("agreement", "chosen batch: share fresh scoring also picks"),
              ("top_class_share", "chosen batch: share of its commonest class"),
              ("repeat_class", "commonest class = previous batch's (10-step mean)"),
              ("pred_top_share", "test predictions: share of the commonest class"),
              ("dead_conv2", "dead ReLUs: second conv layer (channels)"),
              ("dead_fc", "dead ReLUs: hidden layer (units)")]
    fig, axes = plt.subplots(2, 5, figsize=(20, 7.5))
    for ax, (key, label) in zip(axes.flat, panels):
        for name, res in runs.items():
            tr = res["trace"][:steps]
            ax.plot([r["step"] for r in tr], trace_series(tr, key), label=f"{name} (acc {res['test_accuracy']:.3f})",
                    lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def cmd_check(args) -> None:
    """This loop against `dataselect-train` on one cell, overlap on and off."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load(args.train_subset, args.data_dir)
    rows = []
    for flag, fx in (("--overlap", "stale"), ("--no-overlap", "fresh")):
        cmd = ["dataselect-train", "--strategy", args.strategy, "--dataset", "mnist", "--data-dir", args.data_dir,
               "--train-subset", str(args.train_subset), "--epochs", "1", "--seed", str(args.seed),
               "--select-fraction", f"{args.fraction:g}", flag, "--device", "cpu", "--threads", "1", "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        trainer = None
        if proc.returncode == 0:
            try:
                trainer = json.loads(proc.stdout)
            except json.JSONDecodeError:
                trainer = None
        cfg = RunConfig(args.strategy, args.fraction, args.seed, fx, train_subset=args.train_subset)
        mine = run(cfg, data)
        rows.append({"trainer_command": " ".join(cmd), "trainer_rc": proc.returncode,
                     "trainer_seconds": time.perf_counter() - t0,
                     "trainer_accuracy": trainer.get("test_accuracy") if trainer else None,
                     "trainer_staleness_mean": trainer.get("staleness_mean_steps") if trainer else None,
                     "trainer_selection_sha256": trainer.get("selection_sha256") if trainer else None,
                     "study_selection_sha256": mine["selection_sha256"],
                     "trainer_error": None if trainer else proc.stderr[-2000:],
                     "study_fix": fx, "study_accuracy": mine["test_accuracy"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (out / f"trainer_check_{args.strategy}_f{args.fraction:g}_s{args.seed}.json").write_text(json.dumps(rows, indent=1))


def cmd_ci(args) -> None:
    """The proposed CI test as a probe: few MNIST (or synthetic) images, stale high_loss against the fix."""
    if args.dataset == "synthetic":
        from dataselect.datasets import open_dataset

        data = open_dataset("synthetic", train_subset=args.train_subset)
    else:
        data = load(args.train_subset, args.data_dir)
    rows = []
    for fx in args.fixes:
        for seed in args.seeds:
            cfg = RunConfig("high_loss", args.fraction, seed, fx, train_subset=args.train_subset)
            t0 = time.perf_counter()
            res = run(cfg, data)
            rows.append({"dataset": args.dataset, "train_subset": args.train_subset, "fix": fx, "seed": seed,
                         "accuracy": res["test_accuracy"], "test_loss": res["test_loss"],
                         "selection_sha256": res["selection_sha256"],
                         "steps": res["steps"], "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ci_probe_{args.dataset}_n{args.train_subset}_f{args.fraction:g}.json").write_text(json.dumps(rows, indent=1))


def product_run(data, strategy: str, fraction: float, seed: int, overlap: bool, ramp_steps: int | None,
                batch_size: int = 64) -> dict:
    """One epoch through the product: `dataselect.Session(..., overlap=...)` embedded, its loader, and a
    plain SGD loop (lr 0.05, momentum 0.9, cnn-small), as a user's own loop would run it."""
    import torch
    from torch.utils.data import TensorDataset

    import dataselect
    from dataselect.models import build_model

    torch.manual_seed(seed)
    model = build_model("cnn-small", **data.info.model_kwargs())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    session = dataselect.Session(strategy, model, fraction=fraction, epochs=1, overlap=overlap,
                                 ramp_steps=ramp_steps, seed=seed, device="cpu")
    t0 = time.perf_counter()
    try:
        loader = session.loader(TensorDataset(data.train_tensors.inputs, data.train_tensors.labels), batch_size=batch_size)
        model.train()
        for x, y in loader:
            loss = session.loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        figures = session.overlap_figures()
        steps = session.steps
    finally:
        session.close()
    model.eval()
    acc, test_loss = evaluate(model, data.test_tensors.inputs, data.test_tensors.labels)
    return {"strategy": strategy, "fraction": fraction, "seed": seed, "overlap": overlap, "ramp_steps": ramp_steps,
            "train_subset": len(data.train_tensors.labels), "test_images": len(data.test_tensors.labels), "accuracy": acc,
            "test_loss": test_loss, "steps": steps, "seconds": time.perf_counter() - t0,
            "overlap_figures": figures}


def cmd_product(args) -> None:
    """The proposed CI collapse test through the product: Session(overlap=True) with the ramp off and on."""
    from dataselect.datasets import open_dataset

    data = open_dataset("mnist", args.data_dir, download=False, train_subset=args.train_subset,
                        test_subset=args.test_subset or None)
    rows = []
    for variant in args.variants:
        overlap, _, ramp = variant.partition(":")
        for strategy in args.strategies:
            for seed in args.seeds:
                res = product_run(data, strategy, args.fraction, seed, overlap == "overlap",
                                  None if ramp in ("", "default") else int(ramp))
                res["variant"] = variant
                rows.append(res)
                print(json.dumps({k: v for k, v in res.items() if k != "overlap_figures"}), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"product_probe_n{args.train_subset}_f{args.fraction:g}.json").write_text(json.dumps(rows, indent=1))


def cmd_report(args) -> None:
    path = Path(args.out) / args.file
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(report(runs, args))


def pairs_for(runs: list[dict], fx: str, sync: int | None = None) -> dict:
    """{(strategy, fraction): [(fresh run, fix run) per seed]} for fix `fx` (and sync_every, if given)."""
    fresh = {(r["strategy"], r["fraction"], r["seed"], r["train_subset"], r["sb_rule"]): r
             for r in runs if r["fix"] == "fresh"}
    out: dict = {}
    for r in runs:
        if r["fix"] != fx or (sync is not None and r["sync_every"] != sync):
            continue
        a = fresh.get((r["strategy"], r["fraction"], r["seed"], r["train_subset"], r["sb_rule"]))
        if a is not None:
            out.setdefault((r["strategy"], r["fraction"], r["sync_every"]), []).append((a, r))
    for v in out.values():
        v.sort(key=lambda p: p[1]["seed"])
    return out


def gap_points(a: dict, b: dict) -> float:
    """How many accuracy points the fix run `b` is below the fresh run `a` of the same seed (negative: above)."""
    return 100.0 * (a["test_accuracy"] - b["test_accuracy"])


def report(runs: list[dict], args) -> str:
    """Markdown: a summary row per fix, then per fix each strategy x fraction with the per-seed accuracies."""
    fixes = [f for f in dict.fromkeys(r["fix"] for r in runs) if f != "fresh"]
    lines = ["| fix | sync | cells x seeds | within 0.5 pts | worst gap (pts) | mean gap (pts) | same selections "
             "as fresh | hidden after initial (min) | hidden overall (mean) | initial fresh steps (mean) | "
             "trainer fwd / step | scorer replay / step | fallbacks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    detail = []
    syncs = sorted({r["sync_every"] for r in runs})
    for fx in fixes:
        for sync in syncs:
            cells = pairs_for(runs, fx, sync)
            if not cells:
                continue
            flat = [p for v in cells.values() for p in v]
            gaps = [gap_points(a, b) for a, b in flat]
            ok = sum(g <= 0.5 for g in gaps)
            same = sum(a["selection_sha256"] == b["selection_sha256"] for a, b in flat)
            mean = lambda k: sum(b[k] for _, b in flat) / len(flat)  # noqa: E731
            lines.append(
                f"| `{fx}` | {sync} | {len(flat)} | {ok}/{len(flat)} | {max(gaps):+.2f} | {sum(gaps) / len(gaps):+.2f} | "
                f"{same}/{len(flat)} | {min(b['hidden_share_after_initial'] for _, b in flat):.2f} | "
                f"{mean('hidden_share'):.2f} | {mean('initial_fresh_steps'):.0f} | {mean('rerank_cost_per_step'):.2f} | "
                f"{mean('replay_cost_per_step'):.2f} | {sum(len(b['guard_fallbacks']) for _, b in flat)} |")
            detail.append(f"\n#### `{fx}`, sync every {sync}\n")
            detail.append("| strategy | fraction | fresh accuracy per seed | fix accuracy per seed | worst gap (pts) | "
                          "hidden after initial | initial fresh steps |")
            detail.append("|---|---|---|---|---|---|---|")
            for (strat, frac, _), pairs in sorted(cells.items()):
                g = max(gap_points(a, b) for a, b in pairs)
                fresh_accs = " / ".join(f"{a['test_accuracy']:.4f}" for a, _ in pairs)
                fix_accs = " / ".join(f"{b['test_accuracy']:.4f}" for _, b in pairs)
                detail.append(
                    f"| {strat} | {frac:g} | {fresh_accs} | {fix_accs} | {g:+.2f}{'' if g <= 0.5 else ' ✗'} | "
                    f"{min(b['hidden_share_after_initial'] for _, b in pairs):.2f} | "
                    f"{'/'.join(str(b['initial_fresh_steps']) for _, b in pairs)} |")
    return "\n".join(lines + detail)


def _mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def table(runs: list[dict], fixes: list[str], seeds: list[int], reference: str = "fresh") -> str:
    """Markdown: per strategy x fraction, test accuracy mean ± std over `seeds` for each fix, the gap to
    `reference` in points (mean over seeds of the same-seed differences, ✗ above 0.5; the worst seed's in
    brackets; positive: below the reference) and the smallest
    hidden share after the initial phase. A cell missing a seed is shown with the seeds it has (n=...)."""
    by = {}
    for r in runs:
        if r["sync_every"] == 1 and r["train_subset"] == 30000 and r["seed"] in seeds \
                and (r["strategy"] not in VARIABLE_SIZE or r["sb_rule"] == "reference"):
            by[(r["fix"], r["strategy"], r["fraction"], r["seed"])] = r
    head = ["strategy", "f"] + [f"`{fx}`" for fx in fixes]
    head += [f"gap `{fx}` vs `{reference}`: mean (worst seed), pts" for fx in fixes if fx != reference]
    head += [f"hidden `{fx}` (min)" for fx in fixes if fx not in ("fresh",) and not fx.startswith("fresh+")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for strat in STRATEGIES:
        for frac in (0.1, 0.25, 0.33, 0.5):
            row = [strat, f"{frac:g}"]
            got = {fx: [by[(fx, strat, frac, sd)] for sd in seeds if (fx, strat, frac, sd) in by] for fx in fixes}
            if not any(got.values()):
                continue
            for fx in fixes:
                accs = [r["test_accuracy"] for r in got[fx]]
                row.append((_mean_std(accs) + ("" if len(accs) == len(seeds) else f" (n={len(accs)})")) if accs else "–")
            for fx in fixes:
                if fx == reference:
                    continue
                gaps = [100 * (by[(reference, strat, frac, r["seed"])]["test_accuracy"] - r["test_accuracy"])
                        for r in got[fx] if (reference, strat, frac, r["seed"]) in by]
                mean_gap = sum(gaps) / len(gaps) if gaps else 0.0
                row.append(f"{mean_gap:+.1f}{'' if mean_gap <= 0.5 else ' ✗'} ({max(gaps):+.1f})" if gaps else "–")
            for fx in fixes:
                if fx == "fresh" or fx.startswith("fresh+"):
                    continue
                row.append(f"{min(r['hidden_share_after_initial'] for r in got[fx]):.2f}" if got[fx] else "–")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def cmd_table(args) -> None:
    path = Path(args.out) / args.file
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    text = table(runs, args.fixes, args.seeds, args.reference)
    if args.markdown:
        cmd = "python benchmarks/overlap_study.py table " + " ".join(
            f"--{k} {','.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in (("fixes", args.fixes), ("seeds", args.seeds), ("reference", args.reference)))
        Path(args.markdown).write_text(f"<!-- made by: {cmd} -->\n\n{text}\n")
    print(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default docs/results/overlap_study)")
        p.add_argument("--data-dir", default="../shared/datasets", help="where MNIST is (no download)")
        p.add_argument("--train-subset", type=int, default=30000, help="first N training images (default 30000)")
        p.add_argument("--sync-every", type=int, default=1, help="push the weights every N steps (staleness up to N)")
        p.add_argument("--sb-rule", choices=("reference", "capped"), default="reference",
                       help="Selective Backprop's rule: the authors' (default) or the capped one")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")

    def floats(s):
        return [float(v) for v in s.split(",")]

    def ints(s):
        return [int(v) for v in s.split(",")]

    def names(s):
        return [v for v in s.split(",") if v]

    g = sub.add_parser("grid", help="run cells; append to runs.jsonl; skip cells already there")
    common(g)
    g.add_argument("--strategies", type=names, default=list(STRATEGIES))
    g.add_argument("--fractions", type=floats, default=[0.1, 0.25, 0.33, 0.5])
    g.add_argument("--seeds", type=ints, default=[1, 2, 3])
    g.add_argument("--fixes", type=names, default=["fresh", "stale"])
    g.add_argument("--file", default="runs.jsonl")
    t = sub.add_parser("trace", help="per-step diagnostics and a PNG for one cell")
    common(t)
    t.add_argument("--strategy", default="high_loss", choices=STRATEGIES)
    t.add_argument("--fraction", type=float, default=0.25)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--fixes", type=names, default=["fresh", "stale"])
    t.add_argument("--plot-steps", type=int, default=120, help="steps shown in the PNG")
    c = sub.add_parser("check", help="dataselect-train against this loop on one cell")
    common(c)
    c.add_argument("--strategy", default="high_loss", choices=STRATEGIES)
    c.add_argument("--fraction", type=float, default=0.25)
    c.add_argument("--seed", type=int, default=1)
    ci = sub.add_parser("ci", help="the proposed CI collapse test as a timed probe")
    common(ci)
    ci.set_defaults(train_subset=4000)
    ci.add_argument("--fraction", type=float, default=0.25)
    ci.add_argument("--dataset", choices=("mnist", "synthetic"), default="mnist")
    ci.add_argument("--seeds", type=ints, default=[0, 1, 2])
    ci.add_argument("--fixes", type=names, default=["fresh", "stale"])
    r = sub.add_parser("report", help="Markdown tables from runs.jsonl")
    common(r)
    r.add_argument("--file", default="runs.jsonl")
    pr = sub.add_parser("product", help="the CI collapse probe through dataselect.Session (embedded)")
    common(pr)
    pr.set_defaults(train_subset=4000)
    pr.add_argument("--test-subset", type=int, default=2000)
    pr.add_argument("--fraction", type=float, default=0.25)
    pr.add_argument("--strategies", type=names, default=["high_loss"])
    pr.add_argument("--seeds", type=ints, default=[0, 1, 2])
    pr.add_argument("--variants", type=names, default=["overlap:0", "overlap:default", "fresh"],
                    help="overlap:RAMP (RAMP an int, or 'default' for the session's) or fresh")
    tb = sub.add_parser("table", help="Markdown: accuracy mean ± std per strategy x fraction for chosen fixes")
    common(tb)
    tb.add_argument("--file", default="runs.jsonl")
    tb.add_argument("--fixes", type=names, default=["fresh", "stale", "anneal=100"])
    tb.add_argument("--seeds", type=ints, default=[1, 2, 3])
    tb.add_argument("--reference", default="fresh", help="the fix the gaps are measured against")
    tb.add_argument("--markdown", default="", help="also write the table to this file")
    args = ap.parse_args(argv)
    for name in ("fixes",):
        for fx in getattr(args, name, []) or []:
            Fix.parse(fx)
    import torch

    torch.set_num_threads(args.threads)
    {"grid": cmd_grid, "trace": cmd_trace, "check": cmd_check, "ci": cmd_ci, "report": cmd_report,
     "table": cmd_table, "product": cmd_product}[args.command](args)


if __name__ == "__main__":
    main()
