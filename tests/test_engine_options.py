"""The scoring engine's speed options: precision, channels-last, compile, auto micro-batch, downscaled inputs.

Everything runs on the CPU: autocast is exercised with CPU bf16, the auto
micro-batch with a mocked `torch.cuda.mem_get_info`.
"""

from __future__ import annotations

import logging
import math

import grpc
import pytest
import torch
from click.testing import CliRunner

import dataselect.scoring as scoring
from dataselect import engine
from dataselect.client.scorer import EmbeddedScorer, SessionSpec
from dataselect.client.train import TrainConfig, validate_config
from dataselect.engine import (
    AUTO_MICRO_BATCH_MAX,
    AUTO_MICRO_BATCH_MIN,
    DEFAULT_MICRO_BATCH,
    free_device_memory,
    parse_micro_batch,
    pick_micro_batch,
    resolve_channels_last,
    resolve_precision,
    signal_bytes_per_sample,
)
from dataselect.errors import InvalidArgument
from dataselect.models import build_model
from dataselect.scoring import PoolChunk, ScoringSession

KW = dict(num_classes=10, in_channels=1, image_size=28, mean=(0.5,), std=(0.25,))
N, BUDGET = 256, 64


def _pool(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n), torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def _state(model="cnn-small", seed=0):
    torch.manual_seed(seed)
    state = build_model(model, **KW).state_dict()
    # A larger classifier spreads the losses the way a trained model's are spread.
    return {k: v * 8 if k.startswith("classifier") else v for k, v in state.items()}


def _session(model="cnn-small", strategy="high_loss", **options):
    s = ScoringSession(strategy, {}, model, KW, num_classes=10, **options)
    s.load_state_dict(_state(model), 1)
    return s


def _select(session, pool=None):
    ids, x, y = pool or _pool()
    return session.select([PoolChunk(ids=ids, labels=y, inputs=x)], BUDGET, return_scores=True)


def _overlap(a, b) -> float:
    return len(set(a.selected_ids.tolist()) & set(b.selected_ids.tolist())) / BUDGET


# -- precision -------------------------------------------------------------------------


def test_precision_resolves_per_device(monkeypatch):
    assert resolve_precision("auto", "cpu") is None  # fp32 on the CPU unless asked
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    assert resolve_precision("FP16", "cpu") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") is None
    with pytest.raises(InvalidArgument, match="does not support bfloat16; use fp16 or auto"):
        resolve_precision("bf16", "cuda")
    with pytest.raises(InvalidArgument, match="unknown precision 'fp64'; use one of: auto, fp32, bf16, fp16"):
        resolve_precision("fp64", "cpu")


@pytest.mark.parametrize("model", ["cnn-small", "cnn-deep"])
def test_bf16_autocast_selects_like_fp32(model):
    ref = _select(_session(model, precision="fp32", channels_last="off"))
    got = _select(_session(model, precision="bf16", channels_last="off"))
    assert got.scores.dtype == torch.float32  # losses computed in float32 from the logits
    assert not torch.equal(got.scores, ref.scores)  # the bf16 path really ran
    assert torch.allclose(got.scores, ref.scores, atol=0.05)
    assert _overlap(got, ref) >= 0.9


def test_gradient_signals_stay_float32_under_autocast():
    ref = _select(_session(strategy="high_influence", precision="fp32", channels_last="off"))
    got = _select(_session(strategy="high_influence", precision="bf16", channels_last="off"))
    assert torch.equal(got.scores, ref.scores)


# -- channels-last -------------------------------------------------------------------------


def test_channels_last_resolution():
    assert resolve_channels_last("auto", "cpu") and resolve_channels_last("auto", "cuda")
    assert not resolve_channels_last("auto", "mps")
    assert resolve_channels_last("on", "cpu") and not resolve_channels_last("off", "cuda")
    assert resolve_channels_last(True, "mps") and not resolve_channels_last(False, "cpu")
    with pytest.raises(InvalidArgument, match="channels_last must be auto, on or off"):
        resolve_channels_last("sideways", "cpu")


@pytest.mark.parametrize("model", ["cnn-small", "cnn-deep"])
def test_channels_last_selects_exactly_like_the_default_layout(model):
    ref = _select(_session(model, channels_last="off"))
    session = _session(model, channels_last="on")
    conv = next(m for m in session.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    got = _select(session)
    assert torch.equal(got.selected_ids, ref.selected_ids)
    assert torch.allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-5)
    # A checkpoint loaded later keeps the layout (load_state_dict copies into the parameters).
    session.load_state_dict(_state(model, seed=1), 2)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


# -- compile --------------------------------------------------------------------------------


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    def broken(fn, **kw):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="dataselect.scoring"):
        session = _session(compile=True, channels_last="off")
    assert session.scoring_model.compiled is None
    assert "torch.compile failed" in caplog.text and "no compiler here" in caplog.text
    assert torch.equal(_select(session).selected_ids, _select(_session(channels_last="off")).selected_ids)


def test_a_compiled_forward_that_fails_later_falls_back_to_eager(caplog):
    session = _session(channels_last="off")
    calls = []

    def flaky(x):
        calls.append(x.shape[0])
        raise RuntimeError("guard failure on an unseen shape")

    session.scoring_model.compiled = flaky
    with caplog.at_level(logging.WARNING, logger="dataselect.scoring"):
        got = _select(session)
    assert calls and session.scoring_model.compiled is None and "scoring without compile from now on" in caplog.text
    assert torch.equal(got.selected_ids, _select(_session(channels_last="off")).selected_ids)


@pytest.mark.slow
def test_compiled_model_selects_like_eager():
    """A real torch.compile on the CPU (needs a C compiler; takes several seconds)."""
    kw = dict(KW)
    s = ScoringSession("high_loss", {}, "mlp", kw, num_classes=10, compile=True, channels_last="off")
    torch.manual_seed(0)
    state = build_model("mlp", **kw).state_dict()
    s.load_state_dict(state, 1)
    if s.scoring_model.compiled is None:
        pytest.skip("torch.compile is not usable on this machine (the session fell back to eager)")
    e = ScoringSession("high_loss", {}, "mlp", kw, num_classes=10, channels_last="off")
    e.load_state_dict(state, 1)
    got, ref = _select(s), _select(e)
    assert s.scoring_model.compiled is not None  # still compiled after scoring
    assert _overlap(got, ref) >= 0.95 and torch.allclose(got.scores, ref.scores, atol=1e-4)


# -- micro-batch ----------------------------------------------------------------------------


def test_parse_micro_batch():
    assert parse_micro_batch("auto") == "auto" and parse_micro_batch(" AUTO ") == "auto"
    assert parse_micro_batch("256") == 256 and parse_micro_batch(7) == 7
    for bad in ("0", "-3", "many", 0, 2.5, True):
        with pytest.raises(InvalidArgument, match="micro-batch must be 'auto' or a positive integer"):
            parse_micro_batch(bad)
    with pytest.raises(InvalidArgument, match="micro-batch must be 'auto'"):
        ScoringSession("high_loss", {}, "cnn-small", KW, num_classes=10, micro_batch="lots")


def test_free_memory_comes_from_mem_get_info_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    assert free_device_memory("cuda") == 3 * 2**30
    assert free_device_memory("cuda:0") == 3 * 2**30
    assert free_device_memory("cpu") is None and free_device_memory("mps") is None


def test_pick_micro_batch_fills_the_budget_within_bounds():
    assert pick_micro_batch(1000 * 100, 100) == 500  # half of the free memory by default
    assert pick_micro_batch(1000 * 100, 100, fraction=1.0, low=1) == 1000
    assert pick_micro_batch(10, 100) == AUTO_MICRO_BATCH_MIN
    assert pick_micro_batch(2**50, 100) == AUTO_MICRO_BATCH_MAX


def test_auto_micro_batch_from_a_mocked_free_memory_figure(monkeypatch):
    model = build_model("cnn-deep", **KW).eval()
    _, x, _ = _pool(16)
    per = signal_bytes_per_sample(model, x, {"loss"})
    # cnn-deep's activations: at least the first stage's 32 x 28 x 28 float32 outputs per sample.
    assert per >= 32 * 28 * 28 * 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    free = free_device_memory("cuda")
    mb = pick_micro_batch(free, per)
    assert free == 2**30 and AUTO_MICRO_BATCH_MIN <= mb <= AUTO_MICRO_BATCH_MAX
    # Gradient signals keep activations for the backward pass: fewer samples fit.
    assert pick_micro_batch(free, signal_bytes_per_sample(model, x, {"input_grad_norm"})) < mb
    # Half-size inputs need about a quarter of the memory; bf16 autocast less too.
    assert signal_bytes_per_sample(model, x, {"loss"}, input_size=(14, 14)) < per / 3
    assert signal_bytes_per_sample(model, x, {"loss"}, autocast_dtype=torch.bfloat16) < per


def test_session_auto_micro_batch_uses_free_memory_and_keeps_an_oom_cap(monkeypatch):
    monkeypatch.setattr(scoring, "free_device_memory", lambda device: 64 * 2**20)
    real, seen, fits = scoring.compute_signals, [], {"up_to": None}

    def recording(*args, micro_batch, **kw):
        seen.append(micro_batch)
        if fits["up_to"] is not None and micro_batch > fits["up_to"]:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, micro_batch=micro_batch, **kw)

    monkeypatch.setattr(scoring, "compute_signals", recording)
    session = _session("cnn-deep", micro_batch="auto")
    ids, x, y = _pool()
    got = _select(session, (ids, x, y))
    expected = pick_micro_batch(64 * 2**20, signal_bytes_per_sample(session.model, x, {"loss"}, channels_last=True))
    assert seen == [expected] and AUTO_MICRO_BATCH_MIN <= expected < N
    assert torch.equal(got.selected_ids, _select(_session("cnn-deep", micro_batch=N)).selected_ids)
    # Out of memory halves the size; the size that fitted caps later picks.
    fits["up_to"] = 8
    seen.clear()
    _select(session)
    assert seen[0] == expected and seen[-1] <= 8 and all(a // 2 == b for a, b in zip(seen, seen[1:]))
    assert session.micro_batch == seen[-1]
    fits["up_to"] = None
    seen.clear()
    _select(session)
    assert seen == [session.micro_batch]


def test_auto_micro_batch_on_cpu_is_the_fixed_default(monkeypatch):
    seen = []
    real = scoring.compute_signals
    monkeypatch.setattr(scoring, "compute_signals", lambda *a, micro_batch, **k: seen.append(micro_batch) or
                        real(*a, micro_batch=micro_batch, **k))
    _select(_session(micro_batch="auto"))
    assert seen == [DEFAULT_MICRO_BATCH]


# -- downscaled inputs ------------------------------------------------------------------------


def test_input_scale_is_refused_for_a_model_with_a_fixed_flatten_size():
    with pytest.raises(InvalidArgument) as err:
        ScoringSession("high_loss", {}, "cnn-small", KW, num_classes=10, input_scale=0.5)
    msg = str(err.value)
    assert "'cnn-small' cannot score inputs downscaled to 14x14 (input_scale 0.5 of 28x28)" in msg
    assert "use input_scale 1.0, or a model with adaptive pooling such as cnn-deep or resnet18" in msg


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, math.nan, "half"])
def test_input_scale_out_of_range_is_refused(bad):
    with pytest.raises(InvalidArgument, match=r"input_scale must be .*\(0, 1\]"):
        ScoringSession("high_loss", {}, "cnn-deep", KW, num_classes=10, input_scale=bad)


def test_input_scale_scores_downscaled_inputs_on_cnn_deep():
    session = _session("cnn-deep", input_scale=0.5)
    shapes = []
    first_conv = next(m for m in session.model.modules() if isinstance(m, torch.nn.Conv2d))
    handle = first_conv.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape[-2:])))
    got = _select(session)
    handle.remove()
    assert shapes and set(shapes) == {(14, 14)}
    assert got.selected_ids.numel() == BUDGET and torch.isfinite(got.scores).all()
    # Scores differ from full size, but the same samples stand out for the most part.
    full = _select(_session("cnn-deep"))
    assert not torch.equal(got.scores, full.scores)
    assert _overlap(got, full) >= 0.6


def test_embedded_scorer_passes_the_session_options_on():
    spec = SessionSpec("high_loss", {}, "cnn-deep", KW, num_classes=10, input_scale=0.5)
    scorer = EmbeddedScorer(spec, precision="bf16", channels_last="off")
    assert scorer.session.input_scale == 0.5 and scorer.session.autocast_dtype is torch.bfloat16
    assert not scorer.session.channels_last
    scorer.close()
    with pytest.raises(InvalidArgument, match="cnn-small"):
        EmbeddedScorer(SessionSpec("high_loss", {}, "cnn-small", KW, num_classes=10, input_scale=0.5))


def test_trainer_config_checks_the_scoring_options():
    for bad, match in ((dict(score_input_scale=0.0), "--score-input-scale: "),
                       (dict(score_input_scale=2.0), "--score-input-scale: "),
                       (dict(score_precision="fp8"), "--score-precision: ")):
        with pytest.raises(InvalidArgument, match=match):
            validate_config(TrainConfig(dataset="synthetic", **bad))
    from dataselect.client.cli import train_command

    result = CliRunner().invoke(train_command, ["--score-input-scale", "0", "--dataset", "synthetic"])
    assert result.exit_code == 2 and "--score-input-scale" in result.output


# -- through the server -------------------------------------------------------------------------


def test_server_session_input_scale_and_engine_options():
    from dataselect.client.remote import RemoteScorer
    from dataselect.server import serve

    with serve(port=0, device="cpu", precision="bf16", channels_last="off", micro_batch="auto") as running:
        assert running.servicer.engine_options == dict(precision="bf16", channels_last="off", compile=False)
        spec = SessionSpec("high_loss", {}, "cnn-small", KW, num_classes=10, input_scale=0.5)
        with pytest.raises(InvalidArgument, match="'cnn-small' cannot score inputs downscaled"):
            RemoteScorer(running.address, spec, retry_seconds=0)
        spec = SessionSpec("high_loss", {}, "cnn-deep", KW, num_classes=10, input_scale=0.5)
        with RemoteScorer(running.address, spec, retry_seconds=0) as remote:
            session = running.store.get(remote.info.session_id)
            assert session.input_scale == 0.5 and session.autocast_dtype is torch.bfloat16
            assert not session.channels_last
            from dataselect.plugins.base import Progress

            remote.push_checkpoint(build_model("cnn-deep", **KW), 1, 0)
            ids, x, y = _pool(64)
            reply = remote.select(ids, x, y, 16, Progress())
            assert reply.selected_ids.numel() == 16


def test_serve_refuses_bad_engine_options():
    from dataselect.server import serve

    for kw, match in ((dict(micro_batch=0), "micro-batch must be"), (dict(precision="fp64"), "unknown precision"),
                      (dict(channels_last="maybe"), "channels_last must be auto, on or off")):
        with pytest.raises(InvalidArgument, match=match):
            with serve(port=0, device="cpu", **kw):
                pass


@pytest.mark.parametrize("args, message", [
    (["--micro-batch", "0"], "micro-batch must be 'auto' or a positive integer, got 0"),
    (["--micro-batch", "big"], "micro-batch must be 'auto' or a positive integer"),
    (["--precision", "fp64"], "'fp64' is not one of 'auto', 'fp32', 'bf16', 'fp16'"),
    (["--channels-last", "maybe"], "'maybe' is not one of 'auto', 'on', 'off'"),
    (["--threads", "0"], "--threads"),
])
def test_server_cli_refuses_bad_engine_flags(args, message):
    from dataselect.server.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output


def test_server_cli_accepts_the_engine_flags(monkeypatch):
    """Good values reach serve() (which is replaced, so nothing listens)."""
    import contextlib

    import dataselect.server.app as app
    from dataselect.server.cli import main

    got = {}

    @contextlib.contextmanager
    def fake_serve(host, port, **kw):
        got.update(kw)
        raise app.AddressInUse("stop here")
        yield  # pragma: no cover

    monkeypatch.setattr(app, "serve", fake_serve)
    result = CliRunner().invoke(main, ["--device", "cpu", "--micro-batch", "auto", "--precision", "BF16",
                                       "--channels-last", "off", "--compile", "--threads", "1"])
    assert result.exit_code == 2 and "stop here" in result.output
    assert got["micro_batch"] == "auto" and got["precision"] == "bf16"
    assert got["channels_last"] == "off" and got["compile"] is True
    result = CliRunner().invoke(main, ["--device", "cpu", "--micro-batch", "512"])
    assert got["micro_batch"] == 512 and got["precision"] == "auto" and got["compile"] is False
