"""The optimizer's chunked ZO step against the per-tensor reference (hybridzo.reference), and layout independence."""

import copy
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridzo import HybridZOOptimizer
from hybridzo.plan import StepPlan, plan_key
from hybridzo.reference import reference_step
from hybridzo.rules import begin_update, finish
from hybridzo.zo_step import ChunkUpdate
from test_restore import ZO_SETTINGS

configs = st.fixed_dictionaries({**ZO_SETTINGS, "restore": st.sampled_from(["exact", "inplace"])})
SHAPES = [(3, 4), (5,), (2, 3, 2), (1,), (7, 2)]


def make_params(dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
            for shape, dtype in zip(SHAPES, dtypes)]


def loss_of(params):
    """Deterministic, not separable (candidates differ), computed in float64."""
    flat = torch.cat([p.double().reshape(-1) for p in params])
    weights = torch.linspace(0.5, 1.5, flat.numel(), dtype=torch.float64)
    return ((flat - 0.2) ** 2 * weights).sum() + 0.1 * (flat.sum() ** 4) / flat.numel()


def groups_of(params, config, split):
    return [{"params": params[:split], **config}, {"params": params[split:], **config, "eps": 2e-3}]


@settings(max_examples=40, deadline=None)
@given(config=configs, chunk=st.sampled_from([3, 8, 1 << 20]), split=st.integers(1, 4), with_fp32=st.booleans())
def test_optimizer_follows_the_reference(config, chunk, split, with_fp32):
    dtypes = [torch.float64] * 5
    if with_fp32:
        dtypes[1] = dtypes[3] = torch.float32  # a second class in a group
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("hybridzo.directions._CHUNK_ELEMENTS", {"cpu": chunk})  # tensors split across chunks
        fast_params, ref_params = make_params(dtypes), make_params(dtypes)
        fast = HybridZOOptimizer(groups_of(fast_params, config, split), lr=0.05, eps=1e-3, seed=3)
        ref = HybridZOOptimizer(groups_of(ref_params, config, split), lr=0.05, eps=1e-3, seed=3)
        for _ in range(3):
            fast_loss = fast.step(lambda: loss_of(fast_params))
            ref_loss, ref_chosen = reference_step(list(enumerate(ref.param_groups)), lambda: loss_of(ref_params),
                                                  ref.state)
            assert fast.last_step_info["chosen"] == ref_chosen
            loss_tolerance = 1e-2 if with_fp32 else 1e-9  # fp32 probes round differently (lerp, read-back)
            torch.testing.assert_close(fast_loss.item(), ref_loss, rtol=loss_tolerance, atol=loss_tolerance)
        for a, b in zip(fast_params, ref_params):
            # fp32 probes round differently (lerp, read-back), and d carries it to every tensor
            tolerance = 1e-2 if with_fp32 else 1e-9
            torch.testing.assert_close(a.detach(), b.detach(), rtol=tolerance, atol=tolerance)
        for a, b in zip(fast_params, ref_params):
            assert fast.state[a].keys() == ref.state[b].keys()
            for key, value in ref.state[b].items():
                if torch.is_tensor(value):
                    tolerance = 1e-2 if with_fp32 else 1e-9
                    torch.testing.assert_close(fast.state[a][key], value, rtol=tolerance, atol=tolerance)
                else:
                    assert fast.state[a][key] == value


@pytest.mark.parametrize("rule, momentum, weight_decay", [("sgd", 0.0, 0.0), ("sgd", 0.9, 0.1), ("adamw", 0.0, 0.1)])
@pytest.mark.parametrize("commit", [False, True])
@pytest.mark.parametrize("steps", [(0, 0, 0), (1, 3, 1)])
def test_chunk_update_is_the_single_tensor_kernel_bit_for_bit(rule, momentum, weight_decay, commit, steps):
    """One chunk over three float32 tensors against rules.py's single-tensor kernel on each."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(3, 4), (5,), (2, 3)]]
    group = {"params": params, "rule": rule, "lr": 0.1, "momentum": momentum, "betas": (0.9, 0.99),
             "adam_eps": 1e-8, "weight_decay": weight_decay}
    state = {}
    for p, step in zip(params, steps):
        if step:
            state[p] = {"exp_avg": torch.randn(p.shape, generator=g), "exp_avg_sq": torch.rand(p.shape, generator=g),
                        "momentum_buffer": torch.randn(p.shape, generator=g), "step": step}
    expected_state = {p: copy.deepcopy(entry) for p, entry in state.items()}
    (chunk,) = StepPlan([(0, group)], plan_key([(0, group)])).chunks
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    grad = torch.randn(theta.numel(), generator=g)
    fresh = set()
    if commit:
        for p in params:
            if begin_update(state.setdefault(p, {}), p, group, commit=True).fresh:
                fresh.add(id(p))
    update = ChunkUpdate(SimpleNamespace(state=state, fresh=fresh, backups=[],
                                             scratch=lambda name, chunk, n: torch.empty(n)), chunk, commit)
    moved = torch.empty_like(theta)
    update.apply_(moved, theta, grad.clone())
    update.write_state()
    expected, offset = [], 0
    for p in params:
        entry = expected_state.setdefault(p, {}) if commit else expected_state.get(p, {})
        single = begin_update(entry, p, group, commit)
        out = torch.empty(p.numel())
        single.apply_(out, p.detach().reshape(-1), grad[offset:offset + p.numel()])
        finish(entry, single)
        expected.append(out)
        offset += p.numel()
    assert torch.equal(moved, torch.cat(expected))
    if commit:
        for p in params:
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                if key in expected_state[p]:
                    assert torch.equal(state[p][key], expected_state[p][key]), key


def in_layout(layout, contiguous):
    """A parameter stored in ``layout`` (or contiguously), always with the same values."""
    g = torch.Generator().manual_seed(1)
    if layout == "transposed":
        tensor = torch.randn(6, 5, generator=g).t()
    else:
        tensor = torch.randn(2, 3, 2, 2, generator=g).contiguous(memory_format=torch.channels_last)
    assert not tensor.is_contiguous()
    return torch.nn.Parameter(tensor.contiguous() if contiguous else tensor)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
@pytest.mark.parametrize("config", [{}, {"restore": "inplace", "momentum": 0.9},
                                    {"rule": "adamw", "conservative": True, "weight_decay": 0.1},
                                    {"distribution": "rademacher", "candidates": 2, "queries": 2}])
@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_a_strided_parameter_takes_the_trajectory_of_its_contiguous_copy(monkeypatch, layout, config, chunk):
    monkeypatch.setattr("hybridzo.directions._CHUNK_ELEMENTS", {"cpu": chunk})
    runs = []
    for contiguous in (False, True):
        params = [in_layout(layout, contiguous), torch.nn.Parameter(torch.linspace(-1, 1, 3))]
        opt = HybridZOOptimizer(params, lr=0.05, seed=4, **config)
        for _ in range(4):
            opt.step(lambda: loss_of([p.contiguous() for p in params]))
        runs.append(([p.detach().contiguous() for p in params],
                     {k: v.contiguous() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)}))
    (strided, strided_state), (contiguous, contiguous_state) = runs
    for a, b in zip(strided, contiguous):
        assert torch.equal(a, b)
    assert strided_state.keys() == contiguous_state.keys()
    for key in strided_state:
        assert torch.equal(strided_state[key], contiguous_state[key])


def test_the_plan_is_reused_while_nothing_changes_and_rebuilt_when_something_does():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, generator=g)) for _ in range(3)]
    # A small lr: the loss is quartic, and at lr 0.1 some draws diverge until moves round to nothing.
    opt = HybridZOOptimizer(params, lr=1e-3, seed=0)
    step = lambda: opt.step(lambda: loss_of(opt.param_groups[0]["params"]))  # noqa: E731
    step()
    plan = opt._zo_plan
    step()
    assert opt._zo_plan is plan

    def moves_only(current, stale):
        before = [p.detach().clone() for p in current + stale]
        step()
        assert all(not torch.equal(p, b) for p, b in zip(current, before))
        assert all(torch.equal(p, b) for p, b in zip(stale, before[len(current):]))

    replaced = opt.param_groups[0]["params"][1]
    opt.param_groups[0]["params"][1] = new = torch.nn.Parameter(torch.randn(4, generator=g))  # a user edits it
    moves_only(opt.param_groups[0]["params"], [replaced])
    extra = torch.nn.Parameter(torch.randn(2, generator=g))
    opt.add_param_group({"params": [extra]})
    moves_only([*opt.param_groups[0]["params"], extra], [])
    new.data = torch.randn(4, generator=g)  # new storage
    moves_only([new], [])
    opt.load_state_dict(opt.state_dict())  # new group dicts
    plan = opt._zo_plan
    step()
    assert opt._zo_plan is not plan
    assert copy.deepcopy(opt)._zo_plan is None  # the plan is a cache, not state


def test_a_state_buffer_replaced_between_steps_is_the_one_the_step_uses():
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    opt = HybridZOOptimizer([p], lr=0.1, momentum=0.9, seed=0)
    for _ in range(2):
        opt.step(lambda: loss_of([p]))
    opt.state[p]["momentum_buffer"] = torch.full((6,), 5.0, dtype=torch.float64)  # as a user or a loader might
    twin = torch.nn.Parameter(p.detach().clone())
    fresh = HybridZOOptimizer([twin], lr=0.1, momentum=0.9, seed=0)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.step(lambda: loss_of([p]))
    fresh.step(lambda: loss_of([twin]))
    assert torch.equal(p.detach(), twin.detach())
    assert torch.equal(opt.state[p]["momentum_buffer"], fresh.state[twin]["momentum_buffer"])
