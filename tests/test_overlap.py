"""Overlapped scoring (`--overlap`), staleness accounting and lean checkpoint pushes (delta, half precision)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dataselect.client.pipeline import ScorerPipeline
from dataselect.client.remote import RemoteScorer
from dataselect.client.scorer import EmbeddedScorer, SessionSpec
from dataselect.client.train import TrainConfig, train
from dataselect.errors import InvalidArgument
from dataselect.models import build_model
from dataselect.plugins.base import Progress
from pools import random_pool

KWARGS = dict(num_classes=10, in_channels=1, image_size=8)


def _config(**kw) -> TrainConfig:
    base = dict(dataset="synthetic", device="cpu", epochs=1, train_subset=1200, test_subset=300, progress=False,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def server_options():
    return {"workers": 4}  # conftest's `server` fixture, with more RPC threads


# -- the pipeline ----------------------------------------------------------------------
def test_pipeline_runs_calls_in_submission_order_and_times_them():
    pipe = ScorerPipeline()
    seen: list[int] = []
    gate = threading.Event()
    try:
        first = pipe.submit("select", lambda: (gate.wait(5), seen.append(0), "a")[-1])
        later = [pipe.submit("push", seen.append, i) for i in range(1, 6)]
        time.sleep(0.05)
        assert seen == []  # the worker is held by the first call; nothing overtook it
        gate.set()
        assert pipe.wait("select", first).value == "a"
        for fut in later:
            fut.result(timeout=5)
        assert seen == [0, 1, 2, 3, 4, 5]
        assert pipe.busy_seconds["select"] >= pipe.wait_seconds["select"] * 0.5
        assert 0.0 <= pipe.hidden_fraction("select") <= 1.0
    finally:
        pipe.close()


def test_pipeline_drain_raises_the_first_failure_and_skips_cancelled_calls():
    pipe = ScorerPipeline()
    gate = threading.Event()
    try:
        pipe.submit("push", gate.wait, 5)
        pipe.submit("push", lambda: 1 / 0)
        cancelled = pipe.submit("select", lambda: "never")
        assert cancelled.cancel()
        gate.set()
        with pytest.raises(ZeroDivisionError):
            pipe.drain()
        pipe.drain()  # nothing left
    finally:
        pipe.close()
    with pytest.raises(RuntimeError, match="closed"):
        pipe.submit("push", print)


def test_hidden_fraction_is_all_when_the_trainer_never_waits():
    pipe = ScorerPipeline()
    try:
        fut = pipe.submit("select", time.sleep, 0.05)
        time.sleep(0.2)  # "training" while the scorer works
        pipe.wait("select", fut)
        assert pipe.hidden_fraction("select") > 0.9
    finally:
        pipe.close()


# -- the trainer --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inline_and_overlapped():
    inline = train(_config(overlap=False))
    overlapped = train(_config(overlap=True, ramp_steps=0))  # the pipeline alone, no ramp
    return inline, overlapped


def test_overlapped_training_trains_as_much_with_a_model_one_step_stale(inline_and_overlapped):
    inline, over = inline_and_overlapped
    assert inline["overlap"] is False and over["overlap"] is True
    assert inline["staleness_max_steps"] == 0 and inline["hidden_score_fraction"] == 0.0
    # Pool t+1 is scored before step t trains: exactly one step stale, after the first pool.
    assert over["staleness_max_steps"] == 1
    assert 0.5 < over["staleness_mean_steps"] <= 1.0
    multi = train(_config(overlap=True, epochs=2, ramp_steps=0))  # short last pools must not deepen the look-ahead
    assert multi["staleness_max_steps"] == 1
    assert over["samples_trained"] == inline["samples_trained"]
    assert over["samples_scored"] == inline["samples_scored"]
    assert over["steps"] == inline["steps"]
    assert over["background_score_seconds"] > 0 and over["background_checkpoint_seconds"] > 0
    assert 0.0 <= over["hidden_score_fraction"] <= 1.0
    # The trainer waited for at most what the scorer worked (plus a little bookkeeping).
    assert over["score_seconds"] <= over["background_score_seconds"] + 0.5


def test_with_model_free_selections_overlap_changes_nothing_but_the_timing():
    # random never looks at the model, so staleness cannot matter: identical runs.
    inline = train(_config(strategy="random", overlap=False))
    over = train(_config(strategy="random", overlap=True, ramp_steps=0))
    assert over["selection_sha256"] == inline["selection_sha256"]
    assert over["test_accuracy"] == pytest.approx(inline["test_accuracy"])
    assert over["test_accuracy"] > 0.5  # chance is 0.1


def test_overlapped_selections_are_deterministic(inline_and_overlapped):
    _, over = inline_and_overlapped
    again = train(_config(overlap=True, ramp_steps=0))
    assert again["selection_sha256"] == over["selection_sha256"]
    ramped = train(_config(overlap=True))
    assert train(_config(overlap=True))["selection_sha256"] == ramped["selection_sha256"]


def test_staleness_is_bounded_by_sync_every():
    summary = train(_config(overlap=True, sync_every=3))
    assert 1 <= summary["staleness_max_steps"] <= 3
    assert summary["checkpoint_pushes"] < summary["steps"] / 2


@pytest.mark.parametrize("strategy,mode", [("infobatch", "online"), ("dynams", "subset"),
                                           ("importance_sampling", "weighted")])
def test_overlap_works_in_every_mode_and_with_reports(strategy, mode):
    options = {"warmup_epochs": 1} if strategy == "importance_sampling" else {}
    epochs = 3 if strategy == "infobatch" else 2  # InfoBatch prunes while epoch + 1 <= 0.875 * epochs
    summary = train(_config(overlap=True, strategy=strategy, mode=mode, epochs=epochs, options=options))
    assert summary["overlap"] is True and summary["mode"] == mode
    assert summary["test_accuracy"] > 0.3
    if strategy in ("infobatch", "importance_sampling"):  # training-side reports go through the pipeline too
        assert summary["background_report_seconds"] > 0


def test_a_budget_stop_with_a_selection_in_flight_finishes_cleanly(tmp_path):
    summary = train(_config(overlap=True, budget_samples=300, output=str(tmp_path)))
    assert summary["stopped_by"] == "budget_samples"
    assert 300 <= summary["samples_trained"] < 400
    assert (tmp_path / "summary.json").is_file()


def test_remote_runs_overlap_by_default(server):
    summary = train(_config(server=server.address, sync_every=2))
    assert summary["scorer"] == "remote" and summary["overlap"] is True
    assert 1 <= summary["staleness_max_steps"] <= 2
    off = train(_config(server=server.address, sync_every=2, overlap=False))
    assert off["overlap"] is False and off["staleness_max_steps"] <= 1
    assert off["samples_scored"] == summary["samples_scored"]
    assert off["samples_trained"] < summary["samples_trained"]  # the ramp's first pools keep more
    # Model-free selections are the same remote as embedded, both overlapped (ramp included).
    remote_random = train(_config(server=server.address, strategy="random"))
    embedded_random = train(_config(strategy="random", overlap=True))
    assert remote_random["overlap"] is True and embedded_random["overlap"] is True
    assert remote_random["selection_sha256"] == embedded_random["selection_sha256"]


def test_bad_checkpoint_dtype_is_refused_before_any_work():
    with pytest.raises(InvalidArgument, match="--checkpoint-dtype"):
        train(_config(checkpoint_dtype="int8"))


# -- the ramp ------------------------------------------------------------------------------
def test_the_ramp_grows_the_pools_to_full_size_and_keeps_one_step_staleness():
    """With overlap the first pools are small (one batch, all kept) and grow to batch / fraction over
    `ramp_steps` steps; each pool still fills one step, so staleness stays one step."""
    inline = train(_config(overlap=False))
    ramped = train(_config(overlap=True, ramp_steps=20))
    assert ramped["staleness_max_steps"] == 1
    assert ramped["samples_scored"] == inline["samples_scored"] == 1200
    # step k keeps a share 1 - 0.5 k / 20 of a pool of 64 / that share: one batch of 64 per step, so
    # more steps than inline's 1200 / 128 pools
    assert ramped["steps"] > inline["steps"] == 10
    assert ramped["samples_trained"] == pytest.approx(64 * ramped["steps"], abs=64)


def test_a_session_ramps_only_overlapped_online_selection():
    from dataselect import Session

    model = torch.nn.Linear(4, 3)
    s = Session("high_loss", model, fraction=0.25, overlap=True, ramp_steps=10, num_classes=3)
    s.open(dataset_size=100, batch_size=8)
    assert [round(s.fraction_at(k), 3) for k in (0, 5, 10, 50)] == [1.0, 0.625, 0.25, 0.25]
    assert s.budget_for(40) == 40  # step 0: the whole pool
    s.close()
    inline = Session("high_loss", model, fraction=0.25, num_classes=3)
    inline.open(dataset_size=100, batch_size=8)
    assert inline.ramp_steps == 0 and inline.budget_for(40) == 10
    inline.close()
    for fraction, steps in ((0.25, 100), (0.1, 250), (0.5, 50)):  # default: 25 / fraction steps
        d = Session("high_loss", model, fraction=fraction, overlap=True, num_classes=3)
        d.open(dataset_size=100, batch_size=8)
        assert d.ramp_steps == steps
        d.close()
    subset = Session("dynams", model, fraction=0.25, overlap=True, num_classes=3)
    assert subset.fraction_at(0) == 0.25  # whole-set selections are never ramped
    with pytest.raises(InvalidArgument, match="ramp_steps"):
        Session("high_loss", model, ramp_steps=-1)


def test_the_ramp_starts_with_online_selection_after_a_warm_up():
    """Selective Backprop primes on full data first; the ramp counts from its first pool, not step 0."""
    s = train(_config(strategy="selective_backprop", overlap=True, ramp_steps=5, options={"warmup_epochs": 0.5}))
    assert s["steps"] > 5  # the priming alone takes more steps than the ramp
    from dataselect import Session

    model = torch.nn.Linear(4, 3)
    session = Session("high_loss", model, fraction=0.25, overlap=True, ramp_steps=10, num_classes=3)
    session.open(dataset_size=100, batch_size=8)
    session.steps = 40  # forty steps of warm-up on full data
    assert session.fraction_at(40) == 1.0  # not started: the ramp is all ahead
    session.start_ramp()
    assert [round(session.fraction_at(k), 3) for k in (40, 45, 50)] == [1.0, 0.625, 0.25]
    assert session.state_dict()["ramp_origin"] == 40
    session.close()


def test_a_self_sized_strategy_is_topped_up_during_the_ramp():
    """Selective Backprop keeps about a quarter (beta 3); during the ramp its selection is topped up
    uniformly to the ramp's share, so the first overlapped pools are not its few hardest samples."""
    s = train(_config(strategy="selective_backprop", overlap=True, ramp_steps=1000,
                      options={"warmup_epochs": 0}))
    bare = train(_config(strategy="selective_backprop", overlap=True, ramp_steps=0, options={"warmup_epochs": 0}))
    assert s["samples_trained"] > 0.9 * 1200  # pools of about one batch, nearly all kept
    assert bare["samples_trained"] < 0.5 * 1200
    assert 1 <= s["staleness_max_steps"] <= 2


# -- lean checkpoint pushes ---------------------------------------------------------------
def _pool(n=64, seed=0):
    return random_pool(n, seed, size=8)


def _scores(scorer, model=None):
    ids, inputs, labels = _pool()
    return scorer.select(ids, inputs, labels, 8, Progress(), return_scores=True).scores


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("mlp", **KWARGS).eval()


def _spec():
    return SessionSpec("high_loss", {}, "mlp", dict(KWARGS), num_classes=10, seed=1)


def test_a_delta_push_sends_only_changed_tensors_and_scores_like_a_full_one(server, model):
    reference = EmbeddedScorer(_spec())
    with RemoteScorer(server.address, _spec(), checkpoint_delta=True) as remote:
        remote.push_checkpoint(model, 1, 0)
        full_bytes = remote.counters.checkpoint_bytes
        with torch.no_grad():
            model.classifier.weight.add_(0.5)  # only the last layer's weight changes
        remote.push_checkpoint(model, 2, 1)
        delta_bytes = remote.counters.checkpoint_bytes - full_bytes
        reference.push_checkpoint(model, 2, 1)
        assert delta_bytes < full_bytes / 10
        torch.testing.assert_close(_scores(remote), _scores(reference))


def test_a_delta_against_a_version_the_server_lacks_is_resent_in_full(server, model):
    reference = EmbeddedScorer(_spec())
    with RemoteScorer(server.address, _spec(), checkpoint_delta=True) as remote:
        remote.push_checkpoint(model, 1, 0)
        state, _ = remote._shadow
        remote._shadow = (state, 99)  # the client believes the server holds version 99
        with torch.no_grad():
            model.classifier.bias.add_(1.0)
        before = remote.counters.checkpoint_bytes
        remote.push_checkpoint(model, 2, 1)
        assert remote.counters.checkpoint_bytes - before > before / 2  # a full checkpoint went
        reference.push_checkpoint(model, 2, 1)
        torch.testing.assert_close(_scores(remote), _scores(reference))


def test_half_precision_pushes_halve_the_bytes_and_score_nearly_alike(server, model):
    reference = EmbeddedScorer(_spec())
    reference.push_checkpoint(model, 1, 0)
    with RemoteScorer(server.address, _spec()) as full, \
            RemoteScorer(server.address, _spec(), checkpoint_dtype="bfloat16") as half:
        full.push_checkpoint(model, 1, 0)
        half.push_checkpoint(model, 1, 0)
        assert half.counters.checkpoint_bytes < 0.6 * full.counters.checkpoint_bytes
        torch.testing.assert_close(_scores(full), _scores(reference))
        torch.testing.assert_close(_scores(half), _scores(reference), rtol=0.05, atol=0.05)


def test_session_refuses_a_delta_without_its_base(model):
    from dataselect.checkpoint import make_checkpoint
    from dataselect.errors import FailedPrecondition

    session = EmbeddedScorer(_spec()).session
    ckpt = make_checkpoint("mlp", KWARGS, model, version=2)
    ckpt["delta_of"] = 1
    with pytest.raises(FailedPrecondition, match="push a full checkpoint"):
        session.load_checkpoint(ckpt, 2)
    session.load_checkpoint(make_checkpoint("mlp", KWARGS, model, version=1), 1)
    bad = {"format": ckpt["format"], "model": "mlp", "state_dict": {"nope": torch.zeros(1)}, "delta_of": 1}
    with pytest.raises(InvalidArgument, match="unexpected keys"):
        session.load_checkpoint(bad, 2)
    session.load_checkpoint(ckpt, 2)
    assert session.checkpoint_version == 2


# -- time to accuracy ------------------------------------------------------------------------
def test_eval_every_records_points_and_a_target_stops_the_run(tmp_path):
    points = train(_config(strategy="random", eval_every=256))
    evals = points["eval_points"]
    assert [p["samples_trained"] for p in evals[:-1]] == sorted({p["samples_trained"] for p in evals[:-1]})
    assert len(evals) >= 600 // 256  # 600 trained samples: mid-epoch points plus the epoch's end
    assert all(b["seconds"] >= a["seconds"] for a, b in zip(evals, evals[1:]))
    target = max(p["test_accuracy"] for p in evals[:-1])  # reached at a mid-epoch point
    stopped = train(_config(strategy="random", eval_every=256, target_accuracy=target, epochs=3,
                            output=str(tmp_path)))
    assert stopped["stopped_by"] == "target_accuracy"
    assert stopped["samples_to_target"] < 3 * 600
    assert stopped["test_accuracy"] >= target - 1e-9
    assert 0 < stopped["time_to_target_seconds"] <= stopped["wall_seconds"]
    never = train(_config(strategy="random", target_accuracy=1.0))
    assert never["time_to_target_seconds"] is None and never["stopped_by"] is None


def test_bad_eval_settings_are_refused():
    with pytest.raises(InvalidArgument, match="--target-accuracy"):
        train(_config(target_accuracy=99))
    with pytest.raises(InvalidArgument, match="--eval-every"):
        train(_config(eval_every=0))


def test_overlap_asks_for_enough_pools_to_fill_a_batch():
    from dataselect.client.session import MAX_POOLS_AHEAD, Session

    def pools(budget, kept):
        s = Session("high_loss", torch.nn.Linear(2, 2))
        s.budget_selected, s.kept_selected = budget, kept
        return s.pools_per_batch()

    assert pools(0, 0) == 1  # nothing known yet
    assert pools(640, 640) == 1  # exact budget: one pool per batch
    assert pools(31 * 64 + 16, 31 * 64 + 16) == 1  # a short last pool changes nothing
    assert pools(640, 320) == 2  # Selective Backprop keeping half
    assert pools(640, 300) == 3
    assert pools(640, 10) == MAX_POOLS_AHEAD


def test_variable_size_selections_overlap_with_bounded_staleness():
    summary = train(_config(strategy="selective_backprop", overlap=True))
    inline = train(_config(strategy="selective_backprop", overlap=False))
    assert summary["overlap"] is True
    assert summary["samples_scored"] == inline["samples_scored"]  # every pool of the epoch, once
    # Enough pools are asked ahead to fill the next batch (~3 here, keeping ~1/3 of each pool):
    # selections are scored up to about two batches before they are trained on.
    assert 1 <= summary["staleness_max_steps"] <= 3
    assert summary["staleness_mean_steps"] <= 2
