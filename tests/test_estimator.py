"""The ZO gradient estimate against hand-computed formulas.

The directions are recovered from the parameter values each probe saw (see
zo_probe.py), so the expected updates are computed without the optimizer's code.
"""

import math

import pytest
import torch

from hybridzo import HybridZOOptimizer
from zo_probe import RecordingClosure, quadratic, random_spd

DIM = 4


def make_quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = random_spd(DIM, g)
    b = torch.randn(DIM, generator=g, dtype=torch.float64)
    theta0 = torch.randn(DIM, generator=g, dtype=torch.float64)
    return a, b, theta0


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("estimator", ["central", "forward"])
def test_estimator_is_unbiased_on_a_quadratic(estimator, distribution):
    a, b, theta0 = make_quadratic()
    true_grad = a @ theta0 + b
    theta = torch.nn.Parameter(theta0.clone())
    opt = HybridZOOptimizer([theta], lr=1.0, eps=1e-3, estimator=estimator, distribution=distribution, seed=123)
    closure = quadratic(a, b)
    n = 4000
    estimates = torch.empty(n, DIM, dtype=torch.float64)
    for i in range(n):
        with torch.no_grad():
            theta.copy_(theta0)
        opt.step(lambda: closure([theta]))
        estimates[i] = theta0 - theta.detach()  # lr = 1: the update is the estimate
    mean = estimates.mean(0)
    stderr = estimates.std(0) / math.sqrt(n)
    assert torch.all((mean - true_grad).abs() < 5 * stderr + 1e-3), (mean, true_grad, stderr)
    # and the estimate is genuinely random: a single one is far from the mean
    assert (estimates[0] - true_grad).norm() > 0.05 * true_grad.norm()


def _single_estimates(record, eps, estimator, queries):
    """(coefficient d/eps, direction z) per query, from the recorded probes."""
    theta0 = record.seen[0][0] if estimator == "forward" else None
    out = []
    if estimator == "central":
        for i in range(queries):
            plus, minus = record.seen[2 * i][0], record.seen[2 * i + 1][0]
            centre = (plus + minus) / 2
            z = (plus - centre) / eps
            d = (record.losses[2 * i] - record.losses[2 * i + 1]) / 2
            out.append((d / eps, z, d))
    else:
        for i in range(queries):
            plus = record.seen[1 + i][0]
            z = (plus - theta0) / eps
            d = record.losses[1 + i] - record.losses[0]
            out.append((d / eps, z, d))
    return out


@pytest.mark.parametrize("estimator", ["central", "forward"])
@pytest.mark.parametrize("sign", [None, "coordinate", "scalar"])
def test_each_sign_mode_matches_its_formula(sign, estimator):
    a, b, theta0 = make_quadratic(1)
    theta = torch.nn.Parameter(theta0.clone())
    eps, lr = 1e-3, 0.05
    record = RecordingClosure([theta], quadratic(a, b))
    opt = HybridZOOptimizer([theta], lr=lr, eps=eps, sign=sign, estimator=estimator, seed=7)
    opt.step(record)
    ((c, z, d),) = _single_estimates(record, eps, estimator, 1)
    if sign is None:
        expected = theta0 - lr * c * z
    elif sign == "coordinate":
        expected = theta0 - lr * torch.sign(c * z)
    else:
        expected = theta0 - lr * math.copysign(1.0, d) * z
    torch.testing.assert_close(theta.detach(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("estimator", ["central", "forward"])
def test_query_averaging_is_the_mean_of_single_estimates(estimator):
    a, b, theta0 = make_quadratic(2)
    theta = torch.nn.Parameter(theta0.clone())
    eps, lr, q = 1e-3, 0.1, 3
    record = RecordingClosure([theta], quadratic(a, b))
    opt = HybridZOOptimizer([theta], lr=lr, eps=eps, queries=q, estimator=estimator, seed=9)
    opt.step(record)
    singles = _single_estimates(record, eps, estimator, q)
    mean_estimate = sum(c * z for c, z, _ in singles) / q
    torch.testing.assert_close(theta.detach(), theta0 - lr * mean_estimate, rtol=1e-9, atol=1e-9)
    # three different directions were used
    assert not torch.allclose(singles[0][1], singles[1][1])


def test_each_zo_group_divides_by_its_own_eps():
    g = torch.Generator().manual_seed(3)
    w_vision = torch.randn(3, generator=g, dtype=torch.float64)
    w_language = torch.randn(2, generator=g, dtype=torch.float64)
    vision = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    language = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    eps_v, eps_l, lr = 2e-4, 1e-3, 0.1

    def loss_fn(params):
        v, l = params
        return (w_vision @ v) ** 2 + w_vision @ v + w_language @ l

    record = RecordingClosure([vision, language], loss_fn)
    opt = HybridZOOptimizer(
        [{"params": [vision], "eps": eps_v}, {"params": [language], "eps": eps_l}], lr=lr, seed=5
    )
    opt.step(record)
    plus, minus = record.seen[0], record.seen[1]
    z_v, z_l = plus[0] / eps_v, plus[1] / eps_l
    torch.testing.assert_close(minus[0], -eps_v * z_v)  # both groups perturbed together
    d = (record.losses[0] - record.losses[1]) / 2
    torch.testing.assert_close(vision.detach(), -lr * d / eps_v * z_v, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(language.detach(), -lr * d / eps_l * z_l, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "config, with_fo, expected",
    [
        (dict(), False, 2),  # central: +eps and -eps
        (dict(estimator="forward"), False, 2),  # f(theta) and +eps
        (dict(queries=3), False, 6),
        (dict(estimator="forward", queries=3), False, 4),
        (dict(conservative=True), False, 5),  # theta, +-eps, theta-Delta, theta+Delta
        (dict(candidates=3), False, 9),  # 3 x (+-eps) and 3 candidates
        (dict(candidates=2, conservative=True), False, 9),  # theta, 2 x (+-eps), 4 moves
        (dict(), True, 3),  # FO pass, then +-eps
        (dict(estimator="forward"), True, 2),  # the FO pass gives f(theta)
    ],
)
def test_forward_passes_per_step(config, with_fo, expected):
    zo = torch.nn.Parameter(torch.randn(3))
    fo = torch.nn.Parameter(torch.randn(3))
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return (zo**2).sum() + (fo**2).sum()

    groups = [{"params": [zo], **config}]
    if with_fo:
        groups.append({"params": [fo], "mode": "fo"})
    opt = HybridZOOptimizer(groups, lr=0.01, seed=0)
    opt.step(closure)
    assert len(calls) == expected == opt.last_step_info["forwards"]
    assert opt.last_step_info["backwards"] == int(with_fo)
    # only the FO pass runs with autograd
    assert calls == [with_fo] + [False] * (expected - 1)


def test_rademacher_directions_are_signs_drawn_fresh_each_step():
    theta0 = torch.randn(64, dtype=torch.float64)
    theta = torch.nn.Parameter(theta0.clone())
    record = RecordingClosure([theta], lambda params: (params[0] ** 2).sum())
    opt = HybridZOOptimizer([theta], lr=0.0, eps=1e-3, distribution="rademacher", seed=7)
    directions = []
    for _ in range(3):
        record.reset()
        opt.step(record)
        z = (record.seen[0][0] - theta0) / 1e-3
        torch.testing.assert_close(z.abs(), torch.ones(64, dtype=torch.float64), rtol=0, atol=1e-9)
        torch.testing.assert_close((record.seen[1][0] - theta0) / 1e-3, -z, rtol=0, atol=1e-9)  # the mirror
        directions.append(z.sign())
    assert not torch.equal(directions[0], directions[1]) and not torch.equal(directions[1], directions[2])
