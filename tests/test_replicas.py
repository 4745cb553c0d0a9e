"""ReplicatedScorer: pools sharded over several scoring replicas by id, a global budget, per-sample
state on the replica that owns the id, and a replica that goes down handing its share to the others."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from dataselect.client.remote import ServerUnavailable
from dataselect.client.replicas import ReplicatedScorer, apportion, merge_kind, owners, parse_servers
from dataselect.client.scorer import EmbeddedScorer, SessionSpec
from dataselect.errors import InvalidArgument
from dataselect.models import build_model
from dataselect.plugins.base import Progress
from dataselect.server import serve

KWARGS = dict(num_classes=10, in_channels=1, image_size=8)


def spec(strategy="high_loss", **options):
    return SessionSpec(strategy, dict(options), "mlp", dict(KWARGS), num_classes=10, seed=3)


def pool(n=200, seed=0, start=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(start, start + n), torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("mlp", **KWARGS).eval()


class FakeReplica(EmbeddedScorer):
    """An in-process replica that can be 'killed': afterwards every call is UNAVAILABLE."""

    def __init__(self, address, sp):
        super().__init__(sp)
        self.address, self.dead, self.calls = address, False, []

    def _check(self, what):
        self.calls.append(what)
        if self.dead:
            raise ServerUnavailable(f"cannot reach dataselect-server at {self.address}")

    def push_checkpoint(self, model, version, step):
        self._check("push")
        super().push_checkpoint(model, version, step)

    def select(self, *args, **kwargs):
        self._check("select")
        return super().select(*args, **kwargs)

    def report(self, *args, **kwargs):
        self._check("report")
        return super().report(*args, **kwargs)


def fake_cluster(sp, n=2, **kw):
    made: dict[str, FakeReplica] = {}
    down: set[str] = set()

    def connect(address, retry, timeout):
        if address in down:
            raise ServerUnavailable(f"cannot reach dataselect-server at {address}")
        made[address] = FakeReplica(address, sp)
        return made[address]

    addresses = [f"replica{k}:5005{k}" for k in range(n)]
    scorer = ReplicatedScorer(addresses, sp, connect=connect, **kw)
    return scorer, made, down


# -- pieces --------------------------------------------------------------------------------
def test_parse_servers_names_the_bad_entry():
    assert parse_servers("a:1,b.example:50051") == ["a:1", "b.example:50051"]
    assert parse_servers(" 127.0.0.1:5 , [::1]:6 ") == ["127.0.0.1:5", "[::1]:6"]
    for text, needle in (("a:1,b", "entry 2"), ("a:1,,b:2", "entry 2 of --server 'a:1,,b:2' is empty"),
                         ("a:1,a:1", "listed twice"), ("a:99999", "port 1-65535"), ("", "--server is empty")):
        with pytest.raises(InvalidArgument, match=needle):
            parse_servers(text)


def test_ownership_is_stable_balanced_and_only_a_dead_replicas_ids_move():
    ids = torch.arange(100_000) * 7 + 13
    own = owners(ids, 3)
    assert torch.equal(own, owners(ids, 3)), "ownership must not depend on anything but the id and the list"
    counts = torch.bincount(own, minlength=3).double() / ids.numel()
    assert bool(((counts - 1 / 3).abs() < 0.01).all()), counts
    after = owners(ids, 3, [True, False, True])
    moved = own != after
    assert bool((own[moved] == 1).all()), "only replica 1's ids may move"
    assert not bool((after == 1).any())
    # replica 1's ids are spread evenly over the other two
    share = torch.bincount(after[own == 1], minlength=3).double() / int((own == 1).sum())
    assert abs(float(share[0]) - 0.5) < 0.02 and abs(float(share[2]) - 0.5) < 0.02


def test_apportion_is_exact_and_bounded():
    for budget, sizes in ((7, [3, 3, 4]), (1, [5, 5]), (10, [10, 0]), (64, [60, 68]), (3, [1, 1, 1])):
        shares = apportion(budget, sizes)
        assert sum(shares) == budget and all(0 <= b <= s for b, s in zip(shares, sizes)), (budget, sizes, shares)


def test_merge_kind_by_strategy():
    assert merge_kind("high_loss") == "exact" and merge_kind("high_gradient") == "exact"
    assert merge_kind("tracin") == "exact"  # score-then-policy (its scores are per-sample totals)
    for s in ("random", "selective_backprop", "importance_sampling", "infobatch", "dynams", "mrmc", "glister"):
        assert merge_kind(s) == "proportional", s


# -- selection -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["topk", "class_balanced", "threshold"])
def test_exact_merge_equals_one_scorer(model, policy):
    sp = SessionSpec("high_loss", {}, "mlp", dict(KWARGS), num_classes=10, seed=3, policy=policy)
    one = EmbeddedScorer(sp)
    scorer, made, _ = fake_cluster(sp, n=3)
    one.push_checkpoint(model, 1, 0)
    scorer.push_checkpoint(model, 1, 0)
    ids, inputs, labels = pool(300)
    a = one.select(ids, inputs, labels, 90, Progress())
    b = scorer.select(ids, inputs, labels, 90, Progress(), return_scores=True)
    assert sorted(a.selected_ids.tolist()) == sorted(b.selected_ids.tolist())
    assert b.samples_scored == 300 and b.scores.shape == (300,)
    # every replica scored only the ids it owns
    own = owners(ids, 3)
    for j, address in enumerate(scorer.addresses):
        assert made[address].calls.count("select") == 1
    assert sum(int(scorer.counters.extra[f"replica{j}_samples_scored"]) for j in range(3)) == 300
    assert all(int((own == j).sum()) == scorer.counters.extra[f"replica{j}_samples_scored"] for j in range(3))


def test_proportional_merge_keeps_the_global_budget(model):
    sp = spec("importance_sampling", warmup_epochs=0)
    scorer, _, _ = fake_cluster(sp, n=2)
    ids, inputs, labels = pool(101)
    for budget in (1, 2, 33, 101):
        reply = scorer.select(ids, None, labels, budget, Progress(epoch=1))
        assert reply.selected_ids.numel() == budget and reply.weights.numel() == budget
        assert set(reply.selected_ids.tolist()) <= set(ids.tolist())
    with pytest.raises(InvalidArgument, match="budget"):
        scorer.select(ids, None, labels, 102, Progress())


def test_per_sample_state_lives_on_the_replica_that_owns_the_id():
    """importance_sampling learns from reports; if a report reached a replica other than the one that
    later scores the id, the strategy would see no history and draw uniformly."""
    sp = spec("importance_sampling", warmup_epochs=0, epsilon=0.0)
    scorer, made, _ = fake_cluster(sp, n=2)
    ids, _, labels = pool(400)
    hard = ids % 2 == 0  # reported as never right: importance 1; the others always right: importance 0
    scorer.report(ids, torch.where(hard, 5.0, 0.0), torch.where(hard, 0.0, 1.0), None, Progress())
    own = owners(ids, 2)
    for j, address in enumerate(scorer.addresses):
        table = made[address].session.strategy_object.table
        assert set(table.row_of) == set(ids[own == j].tolist()), "state must sit on the owner only"
    reply = scorer.select(ids, None, labels, 200, Progress(epoch=1))
    picked_hard = hard[torch.searchsorted(ids, reply.selected_ids)].float().mean()
    assert float(picked_hard) == 1.0, "only the reported-hard ids have any importance"


def test_a_replica_going_down_hands_its_share_to_the_others(model, caplog):
    sp = spec("selective_backprop", beta=0.0)  # beta 0: keeps every sample, so the counts are exact
    scorer, made, _ = fake_cluster(sp, n=2, revive_seconds=0)
    scorer.push_checkpoint(model, 1, 0)
    ids, inputs, labels = pool(120)
    first = scorer.select(ids, inputs, labels, 120, Progress())
    assert sorted(first.selected_ids.tolist()) == ids.tolist()
    made[scorer.addresses[1]].dead = True
    with caplog.at_level(logging.WARNING, logger="dataselect.client"):
        second = scorer.select(ids, inputs, labels, 120, Progress())
    assert sorted(second.selected_ids.tolist()) == ids.tolist(), "the dead replica's ids were scored elsewhere"
    assert scorer.live == [True, False] and scorer.counters.extra["replicas_down"] == 1
    assert "replica1:50051 is down" in caplog.text
    # later calls go straight to the live replica; reports too
    before = len(made[scorer.addresses[1]].calls)
    scorer.push_checkpoint(model, 2, 1)
    scorer.select(ids, inputs, labels, 60, Progress())
    assert len(made[scorer.addresses[1]].calls) == before
    assert scorer.owner_of(ids).unique().tolist() == [0]


def test_a_down_replica_is_revived_with_the_latest_weights(model):
    sp = spec("high_loss")
    scorer, made, down = fake_cluster(sp, n=2, revive_seconds=0.01)
    scorer.push_checkpoint(model, 1, 0)
    made[scorer.addresses[1]].dead = True
    down.add(scorer.addresses[1])
    ids, inputs, labels = pool(50)
    scorer.select(ids, inputs, labels, 10, Progress())
    assert scorer.live == [True, False]
    down.clear()  # the server is back
    import time
    time.sleep(0.02)
    scorer.push_checkpoint(model, 2, 1)
    assert scorer.live == [True, True] and scorer.counters.extra["replicas_revived"] == 1
    assert made[scorer.addresses[1]].session.checkpoint_version == 2


def test_all_replicas_down_falls_back_or_fails(model):
    ids, inputs, labels = pool(50)
    scorer, made, down = fake_cluster(spec(), n=2, on_server_failure="fallback", revive_seconds=0)
    scorer.push_checkpoint(model, 1, 0)
    for rep in made.values():
        rep.dead = True
    down.update(made)
    reply = scorer.select(ids, inputs, labels, 10, Progress())
    assert reply.selected_ids.numel() == 10 and scorer.counters.extra["fallback"] == 1

    scorer, made, down = fake_cluster(spec(), n=2, retry_seconds=0.2, revive_seconds=0)
    scorer.push_checkpoint(model, 1, 0)
    for rep in made.values():
        rep.dead = True
    down.update(made)
    with pytest.raises(ServerUnavailable, match="every scoring replica is down"):
        scorer.select(ids, inputs, labels, 10, Progress())


def test_replicas_must_agree_and_be_reachable_at_start():
    def connect_mixed(address, retry, timeout):
        return EmbeddedScorer(spec("high_loss" if address.startswith("a") else "high_gradient"))

    with pytest.raises(InvalidArgument, match="disagree on strategy"):
        ReplicatedScorer(["a:1", "b:2"], spec(), connect=connect_mixed)

    def connect_down(address, retry, timeout):
        if address == "b:2":
            raise ServerUnavailable("cannot reach dataselect-server at b:2")
        return EmbeddedScorer(spec())

    with pytest.raises(ServerUnavailable, match=r"replica 2 of 2: cannot reach dataselect-server at b:2"):
        ReplicatedScorer(["a:1", "b:2"], spec(), connect=connect_down)


# -- real servers --------------------------------------------------------------------------
def test_two_real_servers_and_one_stops(model):
    """Through gRPC: the merged selection equals one server's, and stopping a server mid-run loses nothing."""
    ids, inputs, labels = pool(256)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(serve(port=0, device="cpu", workers=2))
        second_cm = serve(port=0, device="cpu", workers=2)
        second = second_cm.__enter__()
        try:
            one = EmbeddedScorer(spec())
            one.push_checkpoint(model, 1, 0)
            expected = sorted(one.select(ids, inputs, labels, 64, Progress()).selected_ids.tolist())
            scorer = stack.enter_context(ReplicatedScorer([first.address, second.address], spec(),
                                                          replica_retry_seconds=0.5, revive_seconds=0, timeout=20))
            scorer.push_checkpoint(model, 1, 0)
            assert sorted(scorer.select(ids, inputs, labels, 64, Progress()).selected_ids.tolist()) == expected
        finally:
            second_cm.__exit__(None, None, None)
        reply = scorer.select(ids, inputs, labels, 64, Progress())
        assert sorted(reply.selected_ids.tolist()) == expected, "same weights, same scores: same selection"
        assert scorer.live == [True, False] and scorer.counters.extra["replicas_down"] == 1
        assert reply.samples_scored == 256
