"""Run with the package installed (`pip install -e .`): `pytest tests`."""

import pytest
import torch

from dataselect.registry import get_strategy, strategies
from dataselect.plugins.base import Pool, Progress, Report
from dataselect.testing import check_strategy


@pytest.mark.parametrize("name", ["el2n", "forgetting"])
def test_registered_from_this_distribution(name):
    assert strategies()[name].distribution == "dataselect-el2n"


@pytest.mark.parametrize("name", ["el2n", "forgetting"])
def test_conformance(name):
    check_strategy(name)


def test_el2n_is_the_error_norm():
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 0])
    pool = Pool(ids=torch.arange(3), labels=labels, signals={"probs": probs}, progress=Progress())
    scores = get_strategy("el2n")().score(pool)
    expected = torch.tensor([0.1 * 2 ** 0.5, 0.5 * 2 ** 0.5, 0.9 * 2 ** 0.5])
    assert torch.allclose(scores, expected, atol=1e-6)


def test_forgetting_counts_learned_then_forgotten():
    sel = get_strategy("forgetting")()
    ids = torch.tensor([1, 2, 3])
    zeros = torch.zeros(3)
    for correct in ([True, True, False], [False, True, False], [True, True, False], [False, True, False]):
        sel.on_report(Report(ids, zeros, None, torch.tensor(correct), Progress()))
    pool = Pool(ids=ids, labels=torch.zeros(3, dtype=torch.long), signals={}, progress=Progress())
    scores = sel.score(pool)
    assert scores[0] >= 2 and scores[0] < 3  # forgotten twice
    assert scores[1] < 1  # learned, never forgotten
    assert scores[2] > 1000  # never learned: most forgettable
