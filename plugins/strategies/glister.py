"""GLISTER-ONLINE (Killamsetty et al., AAAI 2021): greedy subsets that raise a held-out validation log-likelihood."""

from __future__ import annotations

import math
import random

import torch

from dataselect.holdout import HoldOut, warn_if_fraction_reaches
from dataselect.plugins.strategies.warmup import fit_warmup
from dataselect.policies import apply_policy
from dataselect.strategy import Option, Pool, RunPlan, Selection, Strategy


def last_layer_inputs(features: torch.Tensor | None, n: int) -> torch.Tensor:
    """[h, 1] per sample (the final layer's input with its bias column), or [1] alone without features."""
    ones = torch.ones(n, 1, dtype=torch.float64)
    return ones if features is None else torch.cat([features.double().reshape(n, -1), ones], dim=1)


def validation_gradient(logits: torch.Tensor, onehot: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean over the validation samples of ∂ℓ/∂[W, b] = (softmax(z) − e_y) ⊗ [h, 1]: a [C, D + 1] matrix."""
    return _gradient_t(logits.T, onehot.T, inputs)


def _gradient_t(logits_t: torch.Tensor, onehot_t: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    # Class-major [C, n] logits: a softmax over dim 0 of few rows is several times faster on the CPU than
    # one over dim 1 of few columns, and the greedy calls this once per pick.
    return (logits_t.softmax(dim=0) - onehot_t) @ inputs / logits_t.shape[1]


def taylor_gains(errors: torch.Tensor, inputs: torch.Tensor, val_grad: torch.Tensor) -> torch.Tensor:
    """g_i · ∇L_V for each candidate, g_i = e_i ⊗ a_i: Σ_c e_ic (G a_i)_c, without forming g_i."""
    return ((inputs @ val_grad.T) * errors).sum(dim=1)


def glister_greedy(errors: torch.Tensor, inputs: torch.Tensor, val_logits: torch.Tensor, val_onehot: torch.Tensor,
                   val_inputs: torch.Tensor, k: int, *, eta: float, greedy: str = "stochastic", rounds: int = 15,
                   epsilon: float = 0.01, rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GLISTER's greedy on the last-layer Taylor approximation; returns (picks in the order taken, first gains).

    Candidate i has last-layer gradient g_i = e_i ⊗ a_i (e_i = p_i − e_{y_i}, a_i = [h_i, 1]). A candidate's gain
    is g_i · ∇L_V(θ_S), ∇L_V the mean validation gradient at the parameters after one SGD step of size `eta` on
    the summed gradient of the picks S so far: only the last layer moves, so the validation logits become
    z_v − eta Σ_{s∈S} (a_v · a_s) e_s and ∇L_V is recomputed from them after each pick (`stochastic`) or each
    round (`rgreedy`).

    `stochastic`: k steps, each taking the best of ⌊(N/k) ln(1/epsilon)⌋ remaining candidates drawn at random
    (at least 1, at most all that remain). `rgreedy`: min(rounds, k) rounds, each taking the top share of the
    remaining candidates (k split as evenly as possible); rounds=k is the plain greedy.
    """
    n = errors.shape[0]
    k = min(int(k), n)
    z = val_logits.T.contiguous()  # [C, n_val], updated in place
    onehot = val_onehot.T.contiguous()
    grad = _gradient_t(z, onehot, val_inputs)
    first = taylor_gains(errors, inputs, grad)
    picks: list[int] = []
    if k <= 0:
        return torch.empty(0, dtype=torch.long), first
    if greedy == "rgreedy":
        r = max(1, min(rounds, k))
        sizes = [k // r + (1 if j < k % r else 0) for j in range(r)]
        remaining = torch.ones(n, dtype=torch.bool)
        gains = first
        for size in sizes:
            pos = torch.nonzero(remaining, as_tuple=True)[0]
            order = torch.argsort(gains[pos], descending=True, stable=True)[:size]
            chosen = pos[order]
            remaining[chosen] = False
            picks.extend(chosen.tolist())
            z -= eta * errors[chosen].T @ (inputs[chosen] @ val_inputs.T)
            grad = _gradient_t(z, onehot, val_inputs)
            gains = taylor_gains(errors, inputs, grad)
        return torch.tensor(picks, dtype=torch.long), first
    rng = rng or random.Random(0)
    sample_size = max(1, int(n / k * math.log(1.0 / epsilon)))
    remain = list(range(n))
    for _ in range(k):
        m = len(remain)
        drawn = rng.sample(range(m), min(sample_size, m))
        cands = torch.tensor([remain[j] for j in drawn], dtype=torch.long)
        best = int(torch.argmax(taylor_gains(errors[cands], inputs[cands], grad)))
        j = drawn[best]
        e = remain[j]
        remain[j] = remain[-1]
        remain.pop()
        picks.append(e)
        z.addr_(errors[e], val_inputs @ inputs[e], alpha=-eta)
        grad = _gradient_t(z, onehot, val_inputs)
    return torch.tensor(picks, dtype=torch.long), first


class GlisterStrategy(Strategy):
    """GLISTER-ONLINE (Killamsetty et al., AAAI 2021) against a validation share held out of the training ids.

    GLISTER picks the training subset S (|S| = k) that most raises the
    log-likelihood of a validation set after training on S. GLISTER-ONLINE
    re-selects every few epochs with two approximations: one SGD step of size
    η stands for training on S, and a first-order Taylor expansion of the
    validation loss around the current parameters makes each candidate's gain
    the dot product of its gradient with the validation gradient. Picks are
    made greedily, the validation gradient being recomputed at the parameters
    moved by the picks so far (see `glister_greedy`). As in CORDS'
    GLISTERStrategy, all gradients are last-layer gradients in closed form from
    the signals `logits` and `features` (eval mode): g_i = (p_i − e_{y_i}) ⊗
    [h_i, 1]; `gradient=bias` keeps only the bias part p_i − e_{y_i} (CORDS'
    `linear_layer=False`, which its MNIST configuration uses).

    Validation split. The scorer only sees training pools, so a fixed share
    `validation` (default 0.1) of the training ids is held out: an id belongs to
    it when a 64-bit hash of (id, session seed) falls below that share of the
    hash range. Membership depends on the id and the seed alone, not on the pool,
    so the same samples are held out in every selection, on every replica, and
    in online pools. Held-out samples are never selected (unless the budget
    exceeds the other samples: the rest of the budget is then filled with them,
    in pool order, and `plan` warns about such a --select-fraction); they only
    provide the validation gradient, at the current checkpoint, from the same
    scoring pass. Consequences to keep in mind: about `validation` of the
    training set is never trained on, and the validation labels carry whatever
    noise the training split has (GLISTER's paper assumes a clean validation
    set; here a noisy one pulls the selection towards its own noise). A pool
    with no held-out sample (a small online pool) is validated on its own
    candidates, CORDS' training-set fallback.

    Mode: `subset` (default), re-selected every `refresh` epochs (CORDS'
    `select_every`) after `warmup_epochs` full-data epochs (default 0: CORDS'
    GLISTER starts selecting at once; `warmup_epochs` is its warm-start
    variant). In subset mode a Select holds the whole training set, so the
    validation gradient uses the whole held-out share. `eta` is the one-step
    size; CORDS passes the optimiser's learning rate, and 0.05 is the
    trainer's default --lr, so set it to yours. Weights are 1, as in CORDS.

    `greedy=stochastic` (default; CORDS' MNIST configuration): k steps, each
    the best of ⌊(N/k) ln(1/epsilon)⌋ random remaining candidates, with the
    validation gradient updated after every pick; `greedy=rgreedy`: `rounds`
    rounds of top-k/rounds picks (much cheaper; rounds ≥ k is plain greedy).
    Policy `topk` (default) runs the greedy; other policies are applied to the
    first-round gains of the candidates (the held-out samples rank last).
    """

    name = "glister"
    description = ("GLISTER-ONLINE: greedy subset maximising a held-out validation log-likelihood under a "
                   "one-step last-layer Taylor approximation, re-selected every `refresh` epochs; validation = a "
                   "fixed seeded share of the training ids, never trained on (Killamsetty et al., AAAI 2021).")
    default_mode = "subset"
    default_policy = "topk"
    signals = frozenset({"logits", "features"})
    options = {
        "validation": Option(float, 0.1, "share of the training ids held out as the validation set (never "
                             "selected)", min=0.001, max=0.5),
        "eta": Option(float, 0.05, "step size of the one-step update (CORDS: the optimiser's learning rate)",
                      min=0.0, max=100.0),
        "greedy": Option(str, "stochastic", "stochastic: best of a random sample per pick (CORDS' MNIST setting); "
                         "rgreedy: `rounds` rounds of top picks", choices=("stochastic", "rgreedy")),
        "rounds": Option(int, 15, "greedy=rgreedy: rounds (the validation gradient is updated after each)", min=1,
                         max=1_000_000),
        "epsilon": Option(float, 0.01, "greedy=stochastic: each pick looks at (N/k) ln(1/epsilon) candidates",
                          min=1e-9, max=0.999),
        "gradient": Option(str, "last_layer", "last_layer: weights and bias of the final layer; bias: the bias "
                           "only (CORDS' linear_layer=False)", choices=("last_layer", "bias")),
        "refresh": Option(int, 1, "re-select the subset every this many epochs", min=1, max=1000),
        "warmup_epochs": Option(float, 0.0, "full-data epochs before the first selection", min=0.0, max=1000.0),
    }

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self.signals = frozenset({"logits"} if self.opts["gradient"] == "bias" else {"logits", "features"})
        self._held_out = HoldOut(self.opts["validation"], self.context.seed)

    @classmethod
    def plan(cls, options, run: RunPlan):
        options = fit_warmup(cls.name, options, run, needs="its first selection comes after the warm-up")
        warn_if_fraction_reaches(cls.name, "validation", options["validation"], run.mode, run.select_fraction)
        return options

    def held_out(self, ids: torch.Tensor) -> torch.Tensor:
        """True for the ids in the validation share (fixed by id and seed: `dataselect.holdout`)."""
        return self._held_out(ids)

    def select(self, pool: Pool, budget: int, policy: str) -> Selection:
        n = len(pool)
        held = self.held_out(pool.ids)
        cand = torch.nonzero(~held, as_tuple=True)[0]
        val = torch.nonzero(held, as_tuple=True)[0]
        # float32: the greedy's cost is one [C, n_val] x [n_val, D + 1] product per pick; gains differ from
        # float64 by about 1e-7 relative.
        logits = pool.signals["logits"].float()
        onehot = torch.nn.functional.one_hot(pool.labels, logits.shape[1]).float()
        inputs = last_layer_inputs(pool.signals.get("features") if self.opts["gradient"] == "last_layer" else None,
                                   n).float()
        errors = logits.softmax(dim=1) - onehot
        on = val if val.numel() else cand  # no held-out sample in this pool: validate on the candidates
        k = min(budget, cand.numel())
        if policy == "topk":
            seed = int(torch.randint(0, 2**62, (1,), generator=self.context.generator))
            picks, first = glister_greedy(errors[cand], inputs[cand], logits[on], onehot[on], inputs[on], k,
                                          eta=self.opts["eta"], greedy=self.opts["greedy"], rounds=self.opts["rounds"],
                                          epsilon=self.opts["epsilon"], rng=random.Random(seed))
            chosen = cand[picks]
        else:
            first = taylor_gains(errors[cand], inputs[cand],
                                 validation_gradient(logits[on], onehot[on], inputs[on]))
            chosen = cand[apply_policy(policy, first, pool.labels[cand], k, self.context.generator).indices]
        if budget > chosen.numel():  # more than the candidates: fill with held-out samples, in pool order
            chosen = torch.cat([chosen, val[:budget - chosen.numel()]])
        scores = torch.zeros(n)
        if cand.numel():
            scores[cand] = first
            scores[val] = float(first.min()) - 1.0
        return Selection(indices=chosen, scores=scores, diagnostics={
            "glister_validation": int(on.numel()), "glister_own_validation": int(val.numel() == 0)})
