"""A seeded share of the training ids held out of training (GLISTER's validation set, RHO-LOSS's holdout).

An id is held out when a 64-bit hash of (id, seed) falls below `share` of the hash range. Membership
depends on the id and the seed alone, never on which pool the id arrives in, so the trainer, a server,
every replica and every rank agree on it without exchanging anything.
"""

from __future__ import annotations

import warnings

import torch

_MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """A 64-bit integer hash (the splitmix64 finaliser): spreads ids evenly over [0, 2^64)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def warn_if_fraction_reaches(strategy: str, option: str, share: float, mode: str, select_fraction: float) -> None:
    """Warn when a whole-set selection asks for more than the ids left after holding `share` out (the
    strategy then has to fill its subset with held-out samples)."""
    if mode != "online" and select_fraction > 1.0 - share + 1e-9:
        warnings.warn(
            f"strategy {strategy!r} holds out {option}={share:g} of the training ids and never selects them while "
            f"others remain; --select-fraction {select_fraction:g} asks for more than the rest, so the subset will "
            f"include held-out samples. Lower --select-fraction or -o {option}.", stacklevel=3)


class HoldOut:
    """Which ids a seeded share holds out; answers are cached per id."""

    def __init__(self, share: float, seed: int):
        if not 0.0 <= float(share) < 1.0:
            raise ValueError(f"a held-out share must lie in [0, 1), got {share}")
        self.share = float(share)
        self._salt = mix64(int(seed) & _MASK64)
        self._cut = self.share * float(1 << 64)
        self._known: dict[int, bool] = {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """True for the held-out ids (bool tensor aligned with `ids`)."""
        out = []
        known, salt, cut = self._known, self._salt, self._cut
        for i in ids.tolist():
            h = known.get(i)
            if h is None:
                h = known[i] = mix64((i & _MASK64) ^ salt) < cut
            out.append(h)
        return torch.tensor(out, dtype=torch.bool)
