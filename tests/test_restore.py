"""Exact restore, failure handling and the no-extra-buffer promise of plain ZO-SGD."""

import warnings

import pytest
import torch
from torch import nn

from hybridzo import HybridZOOptimizer


def small_model(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)).to(dtype)


def naive_round_trip(params, eps, seed):
    """The MeZO pattern: +eps z, -2 eps z, +eps z, with z regenerated from a global seed."""
    for scale in (eps, -2 * eps, eps):
        torch.manual_seed(seed)
        for p in params:
            p.data.add_(torch.randn_like(p), alpha=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lr_zero_restores_bit_for_bit_over_1000_steps(dtype):
    model = small_model(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 16).to(dtype), torch.randn(8, 1)
    opt = HybridZOOptimizer(model.parameters(), lr=0.0, eps=1e-3, seed=0)
    for _ in range(1000):
        opt.step(lambda: nn.functional.mse_loss(model(x).float(), y))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)

    # The same test catches the naive round trip, which drifts in low precision.
    if dtype != torch.float32:
        naive = [b.clone() for b in before]
        for step in range(1000):
            naive_round_trip(naive, 1e-3, step)
        assert not all(torch.equal(n, b) for n, b in zip(naive, before))


@pytest.mark.parametrize("config", [dict(conservative=True), dict(candidates=3), dict(rule="adamw", queries=2)])
def test_lr_zero_restores_with_candidates_and_state(config):
    model = small_model(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 16).bfloat16(), torch.randn(8, 1)
    opt = HybridZOOptimizer(model.parameters(), lr=0.0, seed=1, **config)
    for _ in range(100):
        opt.step(lambda: nn.functional.mse_loss(model(x).float(), y))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_plain_zo_sgd_keeps_no_per_parameter_state():
    model = small_model(torch.float32)
    opt = HybridZOOptimizer(model.parameters(), lr=1e-3, seed=0)
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    for _ in range(3):
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert len(opt.state) == 0
    assert opt.state_dict()["state"] == {}
    assert all(p.grad is None for p in model.parameters())


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_exception_in_closure_restores_parameters_before_propagating(fail_at):
    model = small_model(torch.float32)
    zo, fo = model[0], model[2]
    opt = HybridZOOptimizer(
        [{"params": zo.parameters(), "rule": "adamw"}, {"params": fo.parameters(), "mode": "fo", "rule": "adamw"}],
        lr=0.1, conservative=True, seed=0,
    )
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v["exp_avg"].clone() for k, v in opt.state.items()}
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == fail_at + 1:  # call 1 is the FO pass; later calls are probes/candidates
            raise Boom("closure failed")
        return nn.functional.mse_loss(model(x), y)

    with pytest.raises(Boom):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for k, v in state_before.items():
        assert torch.equal(opt.state[k]["exp_avg"], v)
    assert all(g["steps"] == 1 for g in opt.param_groups)


@pytest.mark.parametrize("bad_call", [0, 1, 2, 3])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_loss_skips_the_step(bad_call, bad_value):
    model = small_model(torch.float32)
    opt = HybridZOOptimizer(
        [{"params": model[0].parameters(), "momentum": 0.9}, {"params": model[2].parameters(), "mode": "fo", "rule": "adamw"}],
        lr=0.1, conservative=True, seed=0,
    )
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {id(k): {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()} for k, v in opt.state.items()}
    calls = []

    def closure():
        loss = nn.functional.mse_loss(model(x), y)
        calls.append(1)
        return loss * bad_value if len(calls) == bad_call + 1 else loss

    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.step(closure)
    assert opt.last_step_info["skipped"]
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for k, v in opt.state.items():
        for n, t in v.items():
            expected = state_before[id(k)][n]
            assert torch.equal(t, expected) if torch.is_tensor(t) else t == expected
    assert [g["nonfinite_steps"] for g in opt.param_groups] == [1, 1]
    # the next finite step proceeds normally
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert not opt.last_step_info["skipped"]
