"""Exact and in-place restore, failure handling and the no-extra-buffer promise of plain ZO-SGD."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
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


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lr_zero_restores_bit_for_bit_over_1000_steps(dtype, distribution):
    model = small_model(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 16).to(dtype), torch.randn(8, 1)
    opt = HybridZOOptimizer(model.parameters(), lr=0.0, eps=1e-3, distribution=distribution, seed=0)
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


# ---------------------------------------------------------------- restore="inplace"

ZO_SETTINGS = {
    "estimator": st.sampled_from(["central", "forward"]),
    "queries": st.integers(1, 2),
    "candidates": st.integers(1, 3),
    "conservative": st.booleans(),
    "sign": st.sampled_from([None, "coordinate", "scalar"]),
    "rule": st.sampled_from(["sgd", "adamw"]),
    "momentum": st.sampled_from([0.0, 0.9]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "distribution": st.sampled_from(["gaussian", "rademacher"]),
}
"""Strategies for every ZO setting a step's path depends on (tests/test_reference.py adds ``restore``)."""
inplace_configs = st.fixed_dictionaries(ZO_SETTINGS)


@settings(max_examples=40, deadline=None)
@given(config=inplace_configs, with_fo=st.booleans())
def test_inplace_follows_the_exact_trajectory_in_fp64(config, with_fo):
    """Exact restore is the reference: in fp64 the in-place round trips differ from it by rounding only."""
    runs = []
    for restore in ("exact", "inplace"):
        model = small_model(torch.float64)
        x, y = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), torch.ones(8, 1)
        groups = [{"params": model[0].parameters(), "restore": restore, **config}]
        groups.append({"params": model[2].parameters(), "mode": "fo" if with_fo else "zo",
                       "restore": restore, **({} if with_fo else config)})
        opt = HybridZOOptimizer(groups, lr=0.05, eps=1e-3, seed=3)
        chosen = []
        for _ in range(4):
            opt.step(lambda: nn.functional.mse_loss(model(x), y))
            chosen.append(opt.last_step_info["chosen"])
        runs.append(([p.detach().clone() for p in model.parameters()], chosen, opt.last_step_info["forwards"]))
    (exact, exact_chosen, exact_forwards), (inplace, inplace_chosen, inplace_forwards) = runs
    assert inplace_chosen == exact_chosen and inplace_forwards == exact_forwards
    for a, b in zip(exact, inplace):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-9)


def test_inplace_groups_take_no_copy(monkeypatch):
    from hybridzo.restore import ExactRestore

    copied = []
    real_begin = ExactRestore.begin
    monkeypatch.setattr(ExactRestore, "begin", lambda self, step, n, chunk: copied.extend(
        piece.param for piece in chunk.pieces) or real_begin(self, step, n, chunk))
    model = small_model(torch.float32)
    opt = HybridZOOptimizer(
        [{"params": model[0].parameters(), "restore": "inplace"}, {"params": model[2].parameters()}],
        lr=1e-3, conservative=True, seed=0,
    )
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert len(copied) == 2
    assert all(any(p is q for q in model[2].parameters()) for p in copied)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_inplace_with_lr_zero_drifts_only_by_rounding(dtype, tolerance):
    model = small_model(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(8, 16).to(dtype), torch.randn(8, 1)
    opt = HybridZOOptimizer(model.parameters(), lr=0.0, eps=1e-3, conservative=True, restore="inplace", seed=0)
    for _ in range(200):
        opt.step(lambda: nn.functional.mse_loss(model(x).float(), y))
    drift = max((p.float() - b.float()).abs().max().item() for p, b in zip(model.parameters(), before))
    assert drift < tolerance
    if dtype == torch.bfloat16:
        assert drift > 0  # which is what restore="exact" exists for (see the 1000-step test above)


def test_inplace_exception_in_closure_returns_to_theta():
    model = small_model(torch.float64)
    opt = HybridZOOptimizer(
        [{"params": model[0].parameters(), "rule": "adamw", "restore": "inplace", "weight_decay": 0.1},
         {"params": model[2].parameters(), "mode": "fo"}],
        lr=0.1, conservative=True, candidates=2, seed=0,
    )
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    before = [p.detach().clone() for p in model.parameters()]
    for fail_at in range(1, 8):  # probes, then each candidate's trial move
        calls = []

        def closure():
            calls.append(1)
            if len(calls) == fail_at + 1:
                raise Boom("closure failed")
            return nn.functional.mse_loss(model(x), y)

        with pytest.raises(Boom):
            opt.step(closure)
        for p, b in zip(model.parameters(), before):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-12)


def test_inplace_refuses_a_move_it_could_not_undo():
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"Invalid weight_decay in param group 0: 2.0"):
        HybridZOOptimizer([p], lr=0.5, weight_decay=2.0, conservative=True, restore="inplace", seed=0)
    opt = HybridZOOptimizer([p], lr=0.5, weight_decay=2.0, conservative=True, seed=0)
    opt.param_groups[0]["restore"] = "inplace"  # as a scheduler or a user might, between steps
    with pytest.raises(ValueError, match=r"Invalid weight_decay in param group 0: 2.0"):
        opt.step(lambda: (p**2).sum())
    assert torch.equal(p.detach(), torch.ones(3))
    opt.param_groups[0]["restore"] = "exact"  # the copy makes the same step possible
    opt.step(lambda: (p**2).sum())


def test_state_dict_saved_before_restore_existed_loads_with_exact_restore():
    model = small_model(torch.float32)
    opt = HybridZOOptimizer(model.parameters(), lr=1e-3, seed=0)
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["restore"]
    resumed = HybridZOOptimizer(model.parameters(), lr=1e-3, seed=0)
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["restore"] == "exact"
    resumed.step(lambda: nn.functional.mse_loss(model(x), y))
