"""Property tests over random pools, through ScoringSession (the contract check included)."""

import torch
from hypothesis import given, settings, strategies as st

from dataselect.models import build_model
from dataselect.plugins.base import Progress
from dataselect.scoring import PoolChunk, ScoringSession

MODEL_KW = dict(num_classes=4, in_channels=1, image_size=8, mean=(0.5,), std=(0.5,))
FIXED = [("random", {}), ("high_loss", {}), ("tracin", {}), ("glister", {}), ("rho_loss", {}), ("high_gradient", {}), ("high_gradient", {"scope": "full"}),
         ("high_influence", {}), ("dynams", {}), ("dynams", {"kind": "logit"}), ("mrmc", {"warmup_epochs": 2}),
         ("importance_sampling", {"warmup_epochs": 0})]
VARIABLE = [("selective_backprop", {}), ("infobatch", {}), ("dynams", {"schedule": "power"})]
_STATE = build_model("mlp", **MODEL_KW).state_dict()
_IRREDUCIBLE = build_model("mlp", **MODEL_KW).state_dict()


def session(name, opts, seed):
    s = ScoringSession(name, opts, "mlp", MODEL_KW, num_classes=4, seed=seed)
    s.load_state_dict(_STATE, 1)
    if "irreducible_loss" in s.signals:
        s.load_irreducible(_IRREDUCIBLE)
    return s


pools = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.just(n),
    st.integers(1, n),
    st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.integers(0, 2**31 - 1),
    st.integers(0, 3),
))


def run(name, opts, n, budget, labels, seed, epoch):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * n, generator=g)[:n]
    labels = torch.tensor(labels)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    s = session(name, opts, seed)
    progress = Progress(epoch=epoch, total_epochs=4)
    if s.strategy_object.uses_reports:
        for e in range(epoch + 1):  # reports for a random part of the pool
            part = ids[: max(1, n // 2)]
            s.report(part, torch.rand(part.numel(), generator=g) * 3, None, None, Progress(epoch=e, total_epochs=4))
    res = s.select([PoolChunk(ids=ids, labels=labels, inputs=x)], budget, progress=progress)
    return ids, res, s.strategy_object


@settings(max_examples=25, deadline=None)
@given(pools, st.sampled_from(FIXED))
def test_fixed_budget_contract(p, strategy):
    n, budget, labels, seed, epoch = p
    name, opts = strategy
    ids, res, sel = run(name, opts, n, budget, labels, seed, epoch)
    got = res.selected_ids
    assert got.numel() == budget
    assert set(got.tolist()) <= set(ids.tolist())
    if not sel.with_replacement:
        assert got.unique().numel() == budget
    else:
        assert res.weights is not None and res.weights.numel() == budget
    _, again, _ = run(name, opts, n, budget, labels, seed, epoch)
    assert torch.equal(got, again.selected_ids)


@settings(max_examples=25, deadline=None)
@given(pools, st.sampled_from(VARIABLE))
def test_variable_budget_bounds(p, strategy):
    n, budget, labels, seed, epoch = p
    name, opts = strategy
    ids, res, sel = run(name, opts, n, budget, labels, seed, epoch)
    got = res.selected_ids
    assert not sel.exact_budget
    assert 0 <= got.numel() <= budget  # variable-size selections may be empty (nothing worth training on)
    assert got.unique().numel() == got.numel()
    assert set(got.tolist()) <= set(ids.tolist())
    if res.weights is not None:
        assert res.weights.numel() == got.numel() and bool((res.weights > 0).all())
    _, again, _ = run(name, opts, n, budget, labels, seed, epoch)
    assert torch.equal(got, again.selected_ids)


# -- the server's boundary checks: any input gives a value or InvalidArgument, nothing else ---------------
from hypothesis import HealthCheck  # noqa: E402

from dataselect import codec  # noqa: E402
from dataselect.errors import InvalidArgument  # noqa: E402
from dataselect.server.service import MAX_INPUT_MAGNITUDE, check_magnitude, parse_json_object, progress_from  # noqa: E402
from dataselect.v1 import selection_pb2 as pb  # noqa: E402

BOUNDARY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_texts = st.text(max_size=60) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=20).map(lambda v: __import__("json").dumps(v)) | st.sampled_from(
    ["[" * 3000 + "]" * 3000, '{"a": NaN}', '{"a": -Infinity}', "1" * 5000, '{"a": ' + "{" * 40 + "}" * 40 + "}"])


@BOUNDARY
@given(json_texts)
def test_parse_json_object_returns_a_bounded_dict_or_invalid_argument(text):
    try:
        value = parse_json_object(text, "options_json")
    except InvalidArgument as exc:
        assert "options_json" in str(exc)
        return
    assert isinstance(value, dict)
    __import__("json").dumps(value, allow_nan=False)  # raises ValueError on any NaN or infinity inside


@BOUNDARY
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=30),
       st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
def test_inputs_that_pass_the_check_stay_finite_in_float32(values, dtype):
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    try:
        check_magnitude(t, "inputs", MAX_INPUT_MAGNITUDE)
    except InvalidArgument as exc:
        assert "inputs" in str(exc)
        return
    as32 = t.float()
    assert bool(torch.isfinite(as32).all()) and float(as32.abs().max()) <= MAX_INPUT_MAGNITUDE
    # Even squared and summed over 10^6 such values (a gradient norm), float32 does not overflow.
    assert bool(torch.isfinite((as32.double() ** 2).sum() * 1e6 / len(values)).all())
    assert float((as32.double() ** 2).max()) * 1e6 < torch.finfo(torch.float32).max


@BOUNDARY
@given(st.integers(-2**31, 2**31 - 1), st.integers(-2**63, 2**63 - 1), st.integers(-2**31, 2**31 - 1),
       st.floats(allow_nan=True, allow_infinity=True))
def test_progress_is_in_range_or_invalid_argument(epoch, step, total, fraction):
    msg = pb.Progress(epoch=epoch, step=step, total_epochs=total, fraction=fraction)
    try:
        p = progress_from(msg)
    except InvalidArgument as exc:
        assert "progress." in str(exc)
        return
    assert 0 <= p.epoch <= 10**6 and 0 <= p.total_epochs <= 10**6 and 0 <= p.step and 0.0 <= p.fraction <= 1.0


@BOUNDARY
@given(st.sampled_from(list(codec.DTYPES) + ["", "complex64"]),
       st.lists(st.integers(0, 2**62) | st.integers(-3, 9), max_size=9), st.binary(max_size=64))
def test_decoding_any_tensor_message_gives_a_tensor_or_invalid_argument(dtype, shape, data):
    try:
        t = codec.decode(pb.Tensor(dtype=dtype, shape=shape, data=data), name="inputs")
    except InvalidArgument as exc:
        assert "inputs" in str(exc)
        return
    assert list(t.shape) == shape and t.dtype == codec.DTYPES[dtype]
