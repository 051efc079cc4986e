"""Optimizer kernels against plain-numpy references of the update rules (and torch.optim where torch
is installed), gradient clipping, optimizer state round trips and learning-rate schedules."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn.kernels.optim import _adam, _clip_value, _rmsprop, _scale, _sgd, _sumsq
from charrnn.optim import (
    SGD,
    Adam,
    Averager,
    RMSprop,
    Schedule,
    clip_grad_norm,
    clip_grad_value,
    make_optimizer,
)

N = 37  # odd, so vectorised loops also run their remainder


def data(seed, n=N, k=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, n).astype(dtype) for _ in range(k)]


def grads(seed, steps=5, n=N):
    rng = np.random.default_rng(seed + 100)
    return [rng.normal(0, 1, n) * rng.uniform(0.01, 10) for _ in range(steps)]


# ----------------------------------------------------------------------------- numpy references
def ref_adam(theta, g, m, v, lr, b1, b2, eps, wd, t):
    g = g + wd * theta if wd else g
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    theta = theta - lr / (1 - b1**t) * m / (np.sqrt(v) / math.sqrt(1 - b2**t) + eps)
    return theta, m, v


def ref_rmsprop(theta, g, sq, lr, alpha, eps):
    sq = alpha * sq + (1 - alpha) * g * g
    return theta - lr * g / (np.sqrt(sq) + eps), sq


def ref_sgd(theta, g, buf, lr, mu, t):
    if mu == 0:
        return theta - lr * g, buf
    buf = g.copy() if t == 1 else mu * buf + g
    return theta - lr * buf, buf


# ----------------------------------------------------------------------------- kernels
def test_sumsq_scale_clip_value_kernels():
    (g,) = data(0, k=1)
    assert _sumsq(g) == pytest.approx(float(np.sum(g * g)), rel=1e-14, abs=0)
    assert _sumsq(np.zeros(0)) == 0.0
    g32 = g.astype(np.float32)
    # float64 accumulation: a float32 buffer's sum equals the float64 sum of its (exact) squares
    assert _sumsq(g32) == pytest.approx(float(np.sum(g32.astype(np.float64) ** 2)), rel=1e-14)
    h = g.copy()
    _scale(h, 0.37)
    np.testing.assert_allclose(h, g * 0.37, rtol=1e-15, atol=0)
    h = g.copy()
    _clip_value(h, 0.5)
    np.testing.assert_array_equal(h, np.clip(g, -0.5, 0.5))
    assert np.any(np.abs(g) > 0.5)  # the case clips something


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_kernel_matches_reference(wd):
    theta, m, v = data(1)
    m[:] = 0
    v[:] = 0
    rt, rm, rv = theta.copy(), m.copy(), v.copy()
    for t, g in enumerate(grads(1), start=1):
        g0 = g.copy()
        _adam(theta, g, m, v, 3e-3, 0.8, 0.99, 1e-8, wd, t, np.zeros(0), 0.0)
        rt, rm, rv = ref_adam(rt, g, rm, rv, 3e-3, 0.8, 0.99, 1e-8, wd, t)
        np.testing.assert_array_equal(g, g0)  # gradient untouched
        np.testing.assert_allclose(theta, rt, rtol=0, atol=1e-12)
        np.testing.assert_allclose(m, rm, rtol=0, atol=1e-12)
        np.testing.assert_allclose(v, rv, rtol=0, atol=1e-12)


def test_rmsprop_kernel_matches_reference():
    theta, sq, _ = data(2)
    sq[:] = 0
    rt, rs = theta.copy(), sq.copy()
    for g in grads(2):
        _rmsprop(theta, g, sq, 1e-2, 0.95, 1e-8, np.zeros(0), 0.0)
        rt, rs = ref_rmsprop(rt, g, rs, 1e-2, 0.95, 1e-8)
        np.testing.assert_allclose(theta, rt, rtol=0, atol=1e-12)
        np.testing.assert_allclose(sq, rs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_sgd_kernel_matches_reference(mu):
    theta, buf, _ = data(3)  # buf starts as garbage: t == 1 must overwrite it
    rt, rb = theta.copy(), buf.copy()
    for t, g in enumerate(grads(3), start=1):
        _sgd(theta, g, buf, 0.05, mu, t, np.zeros(0), 0.0)
        rt, rb = ref_sgd(rt, g, rb, 0.05, mu, t)
        np.testing.assert_allclose(theta, rt, rtol=0, atol=1e-12)
        if mu:
            np.testing.assert_allclose(buf, rb, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "sgd"])
def test_float32_stays_float32_and_close_to_float64(name):
    theta, _, _ = data(4)
    o64 = make_optimizer(name, N, np.float64, lr=1e-2)
    o32 = make_optimizer(name, N, np.float32, lr=1e-2)
    t64, t32 = theta.copy(), theta.astype(np.float32)
    for g in grads(4):
        o64.step(t64, g)
        o32.step(t32, g.astype(np.float32))
    assert t32.dtype == np.float32 and all(b.dtype == np.float32 for b in o32.state_buffers().values())
    np.testing.assert_allclose(t32, t64, rtol=1e-5, atol=1e-5)
    assert not np.allclose(t64, theta)  # the steps did move the parameters


# ----------------------------------------------------------------------------- weight averaging
def ref_average(thetas, rates):
    """The average of a sequence of weights, the obvious way: a_1 = theta_1 moved by rate 1 from
    anything, then a_n = a_{n-1} + rate_n (theta_n - a_{n-1})."""
    a = np.zeros_like(thetas[0])
    for th, r in zip(thetas, rates):
        a = a + r * (th - a)
    return a


@pytest.mark.parametrize("opt_name", ["adam", "rmsprop", "sgd"])
@pytest.mark.parametrize("kind,start", [("ema", 0), ("polyak", 0), ("polyak", 3)])
def test_averaging_fused_into_each_optimizer_equals_a_numpy_average_of_the_same_weights(opt_name, kind, start):
    theta, _, _ = data(7)
    plain = make_optimizer(opt_name, N, np.float64, 3e-3)
    fused = make_optimizer(opt_name, N, np.float64, 3e-3)
    av = Averager(kind, N, np.float64, decay=0.75)
    av.avg[:] = 123.0  # garbage: the first update's rate is 1 and must overwrite it
    t_plain, t_fused = theta.copy(), theta.copy()
    seen, rates = [], []
    for n, g in enumerate(grads(7, steps=8), start=1):
        plain.step(t_plain, g)
        rates.append(av.rate(n, start))
        fused.step(t_fused, g, avg=av.avg, rate=rates[-1])
        np.testing.assert_array_equal(t_fused, t_plain)  # averaging never touches the weights
        seen.append(t_plain.copy())
        np.testing.assert_allclose(av.avg, ref_average(seen, rates), rtol=1e-12, atol=1e-12)
    if kind == "polyak":  # the plain mean of the weights after updates start+1 ..
        np.testing.assert_allclose(av.avg, np.mean(seen[start:], axis=0), rtol=1e-12, atol=1e-12)
    else:  # weights on recent updates: not the plain mean, and not the last weights
        assert not np.allclose(av.avg, np.mean(seen, axis=0)) and not np.allclose(av.avg, seen[-1])


def test_ema_rate_starts_at_one_spans_a_tenth_of_the_run_and_is_floored_by_the_decay():
    av = Averager("ema", 1, np.float64, decay=0.999)
    assert av.rate(1) == 1.0
    assert av.rate(91) == pytest.approx(0.1)
    assert av.rate(10**6) == pytest.approx(0.001)
    with pytest.raises(ValueError):
        Averager("mean", 1, np.float64)
    with pytest.raises(ValueError):
        av.rate(0)


def test_step_refuses_an_average_that_overlaps_or_a_rate_outside_0_1():
    opt = Adam(N, np.float64)
    theta, g, _ = data(8)
    with pytest.raises(ValueError):
        opt.step(theta, g, avg=theta, rate=0.5)
    with pytest.raises(ValueError):
        opt.step(theta, g, avg=np.zeros(N), rate=1.5)


# ----------------------------------------------------------------------------- against torch
def _torch_run(torch_opt, ours, steps=5, seed=5, **kw):
    torch = pytest.importorskip("torch")
    theta0, _, _ = data(seed)
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = torch_opt(torch, [p])
    theta = theta0.copy()
    for g in grads(seed, steps):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        ours.step(theta, g)
        np.testing.assert_allclose(theta, p.detach().numpy(), rtol=0, atol=1e-12)
    assert not np.allclose(theta, theta0)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_matches_torch(wd):
    _torch_run(
        lambda torch, ps: torch.optim.Adam(ps, lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=wd, foreach=False),
        Adam(N, np.float64, lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=wd),
    )


def test_rmsprop_matches_torch():
    _torch_run(
        lambda torch, ps: torch.optim.RMSprop(ps, lr=1e-2, alpha=0.95, eps=1e-8, foreach=False),
        RMSprop(N, np.float64, lr=1e-2, alpha=0.95, eps=1e-8),
    )


@pytest.mark.parametrize("mu", [0.0, 0.9])
def test_sgd_matches_torch(mu):
    _torch_run(
        lambda torch, ps: torch.optim.SGD(ps, lr=0.05, momentum=mu, foreach=False),
        SGD(N, np.float64, lr=0.05, momentum=mu),
    )


@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # above and below the gradient's norm
def test_clip_grad_norm_matches_torch(max_norm):
    torch = pytest.importorskip("torch")
    (g,) = data(6, k=1)
    p = torch.nn.Parameter(torch.zeros(N, dtype=torch.float64))
    p.grad = torch.tensor(g, dtype=torch.float64)
    tn = float(torch.nn.utils.clip_grad_norm_([p], max_norm))
    n = clip_grad_norm(g, max_norm)
    assert n == pytest.approx(tn, rel=1e-14)
    np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- clipping
def test_clip_grad_norm_above_and_below():
    (g,) = data(7, k=1)
    norm = float(np.linalg.norm(g))
    h = g.copy()
    assert clip_grad_norm(h, norm * 2) == pytest.approx(norm, rel=1e-14)
    np.testing.assert_array_equal(h, g)  # below the threshold: untouched
    h = g.copy()
    assert clip_grad_norm(h, 1.0) == pytest.approx(norm, rel=1e-14)
    assert norm > 1.0
    np.testing.assert_allclose(h, g * (1.0 / (norm + 1e-6)), rtol=1e-15)
    assert np.linalg.norm(h) <= 1.0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40),
    st.floats(1e-3, 1e3),
)
def test_clip_grad_norm_property(values, max_norm):
    g = np.array(values)
    g0 = g.copy()
    norm = clip_grad_norm(g, max_norm)
    assert norm == pytest.approx(float(np.linalg.norm(g0)), rel=1e-12, abs=1e-300)
    assert np.linalg.norm(g) <= max_norm * (1 + 1e-12) or np.array_equal(g, g0)
    if norm + 1e-6 <= max_norm:
        np.testing.assert_array_equal(g, g0)
    else:  # same direction, shorter
        np.testing.assert_allclose(g, g0 * (max_norm / (norm + 1e-6)), rtol=1e-14, atol=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grad_norm_non_finite_left_untouched(bad, dtype):
    (g,) = data(8, k=1, dtype=dtype)
    g[5] = bad
    g0 = g.copy()
    n = clip_grad_norm(g, 0.1)
    assert not math.isfinite(n)
    np.testing.assert_array_equal(g, g0)


def test_clip_grad_norm_float32_overflow_is_reported_finite():
    # squares of 1e30 overflow float32 but not the float64 accumulator
    g = np.full(4, 1e30, dtype=np.float32)
    n = clip_grad_norm(g, 1.0)
    assert n == pytest.approx(2e30, rel=1e-6)
    assert np.all(np.isfinite(g)) and float(np.linalg.norm(g.astype(np.float64))) <= 1.0 + 1e-6


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(allow_infinity=True, allow_nan=True, width=32), max_size=40), st.floats(1e-3, 1e3))
def test_clip_grad_value_property(values, c):
    g = np.array(values, dtype=np.float32)
    g0 = g.copy()
    clip_grad_value(g, c)
    c32 = np.float32(c)
    np.testing.assert_array_equal(g, np.clip(g0, -c32, c32))  # np.clip also keeps NaN
    assert np.array_equal(np.isnan(g), np.isnan(g0))


def test_bad_inputs_raise():
    g = np.zeros(N)
    with pytest.raises(ValueError):
        clip_grad_norm(g, 0.0)
    with pytest.raises(ValueError):
        clip_grad_value(g, -1.0)
    with pytest.raises(ValueError):
        clip_grad_norm(np.zeros((3, 3)), 1.0)
    with pytest.raises(ValueError):
        clip_grad_norm(np.zeros(N, dtype=np.int64), 1.0)
    with pytest.raises(ValueError):
        clip_grad_value(np.zeros(2 * N)[::2], 1.0)
    opt = Adam(N, np.float64)
    with pytest.raises(ValueError):
        opt.step(np.zeros(N, dtype=np.float32), np.zeros(N, dtype=np.float32))
    with pytest.raises(ValueError):
        opt.step(np.zeros(N + 1), np.zeros(N + 1))
    theta = np.zeros(N)
    with pytest.raises(ValueError):
        opt.step(theta, theta)
    with pytest.raises(ValueError):
        opt.step(np.zeros(N), np.zeros(N), lr=float("nan"))
    assert opt.t == 0  # failed steps do not count
    with pytest.raises(ValueError):
        make_optimizer("adagrad", N, np.float64, 1e-3)
    with pytest.raises(ValueError):
        Adam(N, np.float16)
    with pytest.raises(ValueError):
        Adam(N, np.float64, betas=(1.0, 0.999))


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize(
    "name,kw",
    [("adam", dict(weight_decay=0.01)), ("rmsprop", {}), ("sgd", dict(momentum=0.9)), ("sgd", dict(momentum=0.0))],
)
def test_state_round_trip(name, kw):
    theta, _, _ = data(9)
    gs = grads(9, steps=6)
    a = make_optimizer(name, N, np.float64, lr=1e-2, **kw)
    for g in gs[:3]:
        a.step(theta, g)
    saved = {k: v.copy() for k, v in a.state_buffers().items()}
    hp = a.hparams()
    assert hp["name"] == name
    b = make_optimizer(size=N, dtype=np.float64, **hp)
    assert b.hparams() == hp
    b.load_state(saved, a.t)
    assert b.t == 3
    tb = theta.copy()
    for g in gs[3:]:
        a.step(theta, g)
        b.step(tb, g)
    np.testing.assert_array_equal(tb, theta)
    if name != "sgd" or kw["momentum"]:
        # the state mattered: a fresh optimizer from the same point goes elsewhere
        c = make_optimizer(size=N, dtype=np.float64, **hp)
        tc = theta.copy()
        ta = theta.copy()
        c.step(tc, gs[0])
        a.step(ta, gs[0])
        assert not np.allclose(tc, ta)


def test_load_state_validates():
    a = Adam(N, np.float64)
    ok = {"m": np.zeros(N), "v": np.zeros(N)}
    a.load_state(ok, 7)
    assert a.t == 7
    for bad in (
        {"m": np.zeros(N)},
        {"m": np.zeros(N), "v": np.zeros(N), "x": np.zeros(N)},
        {"m": np.zeros(N), "v": np.zeros(N + 1)},
        {"m": np.zeros(N), "v": np.zeros(N, dtype=np.float32)},
    ):
        with pytest.raises(ValueError):
            a.load_state(bad, 1)
    with pytest.raises(ValueError):
        a.load_state(ok, -1)
    assert SGD(N, np.float64, momentum=0.0).state_buffers() == {}


def test_hparams_json_able():
    import json

    for o in (Adam(3, np.float32, betas=(0.9, 0.98)), RMSprop(3, np.float32), SGD(3, np.float32)):
        h = json.loads(json.dumps(o.hparams()))
        assert h == o.hparams()


# ----------------------------------------------------------------------------- schedules
def test_constant_with_warmup():
    s = Schedule("constant", lr=1.0, warmup=4)
    assert [s.lr_at(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert Schedule("constant", lr=0.3).lr_at(0) == 0.3


def test_step_decay_points():
    s = Schedule("step", lr=1.0, warmup=2, decay_every=3, decay_factor=0.5)
    got = [s.lr_at(i) for i in range(10)]
    assert got == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]


def test_cosine_endpoints_and_monotone():
    s = Schedule("cosine", lr=2.0, warmup=5, decay_steps=50, min_lr_frac=0.1)
    assert s.lr_at(4) == 2.0 and s.lr_at(5) == 2.0
    assert s.lr_at(5 + 25) == pytest.approx(1.1, rel=1e-14)  # halfway
    assert s.lr_at(55) == pytest.approx(0.2) and s.lr_at(10_000) == pytest.approx(0.2)
    lrs = [s.lr_at(i) for i in range(5, 60)]
    assert all(a > b for a, b in zip(lrs[:50], lrs[1:51]))
    assert lrs[50:] == [lrs[50]] * len(lrs[50:])
    warm = [s.lr_at(i) for i in range(6)]
    assert all(a < b for a, b in zip(warm[:5], warm[1:5]))
    with pytest.raises(ValueError):
        Schedule("cosine", lr=1.0)


def test_wsd_flat_then_linear_to_the_floor():
    s = Schedule("wsd", lr=2.0, warmup=5, decay_steps=100, min_lr_frac=0.1)
    assert s.lr_at(4) == 2.0
    assert [s.lr_at(5 + i) for i in (0, 40, 80)] == [2.0, 2.0, 2.0]  # flat for the first 80%
    assert s.lr_at(5 + 90) == pytest.approx(1.1, rel=1e-14)  # halfway down the final 20%
    assert s.lr_at(105) == pytest.approx(0.2) and s.lr_at(10_000) == pytest.approx(0.2)
    lrs = [s.lr_at(i) for i in range(85, 106)]
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:]))
    with pytest.raises(ValueError):
        Schedule("wsd", lr=1.0)


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from(["constant", "step", "cosine", "wsd"]),
    st.floats(1e-5, 1.0),
    st.integers(0, 20),
    st.integers(1, 50),
    st.floats(0.1, 1.0),
    st.floats(0.0, 1.0),
    st.integers(0, 500),
)
def test_schedule_pure_and_bounded(kind, lr, warmup, every, factor, frac, step):
    s = Schedule(kind, lr, warmup=warmup, decay_every=every, decay_factor=factor, decay_steps=every, min_lr_frac=frac)
    a = s.lr_at(step)
    s.lr_at(step + 7)
    assert s.lr_at(step) == a  # no hidden state
    assert Schedule.from_dict(s.to_dict()).lr_at(step) == a
    assert 0.0 <= a <= lr * (1 + 1e-12)
    if lr * frac > 0 or kind in ("constant", "step") or step < warmup:
        assert a > 0.0  # only a decay to a floor of 0 reaches 0 (lr * 5e-324 is 0 too)
    if kind in ("cosine", "wsd") and step >= warmup:
        assert a >= lr * frac * (1 - 1e-12)


def test_schedule_dict_round_trip_and_validation():
    import json

    s = Schedule("cosine", lr=1e-3, warmup=10, decay_steps=100, min_lr_frac=0.05)
    d = json.loads(json.dumps(s.to_dict()))
    assert Schedule.from_dict(d) == s
    with pytest.raises(ValueError):
        Schedule.from_dict(dict(d, bogus=1))
    for bad in (dict(kind="linear"), dict(lr=-1.0), dict(warmup=-1), dict(decay_every=0), dict(min_lr_frac=1.5)):
        with pytest.raises(ValueError):
            Schedule(**bad)
    with pytest.raises(ValueError):
        s.lr_at(-1)
