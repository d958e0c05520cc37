"""Hypothesis properties over shapes, dtypes and group mixes."""

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridzo import HybridZOOptimizer
from hybridzo.directions import DISTRIBUTIONS, DirectionGenerator

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)

group_configs = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(["zo", "fo"]),
        "sign": st.sampled_from([None, "coordinate", "scalar"]),
        "rule": st.sampled_from(["sgd", "adamw"]),
        "momentum": st.sampled_from([0.0, 0.9]),
        "eps": st.sampled_from([1e-4, 1e-3, 1e-2]),
        "distribution": st.sampled_from(["gaussian", "rademacher"]),
    }
)
step_configs = st.fixed_dictionaries(
    {
        "estimator": st.sampled_from(["central", "forward"]),
        "queries": st.integers(1, 3),
        "candidates": st.integers(1, 3),
        "conservative": st.booleans(),
    }
)


def build(tensors_spec, configs, lr, step_config, seed=0):
    params, groups = [], []
    for (shape, dtype), config in zip(tensors_spec, configs):
        g = torch.Generator().manual_seed(len(params))
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
        params.append(p)
        group = {"params": [p], "lr": lr, **config, **(step_config if config["mode"] == "zo" else {})}
        if dtype == torch.float16:
            group["adam_eps"] = 1e-6  # the default 1e-8 underflows in fp16 and is refused
        groups.append(group)
    return params, groups


def loss_of(params):
    return sum(((p.float() - 0.3) ** 2).sum() for p in params) + sum(p.float().sum() ** 2 for p in params)


spec = st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), tensors_spec=spec, step_config=step_configs)
def test_lr_zero_never_changes_any_parameter(data, tensors_spec, step_config):
    configs = [data.draw(group_configs) for _ in tensors_spec]
    params, groups = build(tensors_spec, configs, 0.0, step_config)
    before = [p.detach().clone() for p in params]
    opt = HybridZOOptimizer(groups, seed=data.draw(st.integers(0, 2**63 - 1)))
    for _ in range(3):
        opt.step(lambda: loss_of(params))
    for p, b in zip(params, before):
        assert torch.equal(p, b)
        assert p.dtype == b.dtype and p.shape == b.shape
    for p, c in zip(params, configs):
        if c["mode"] == "zo":
            assert p.grad is None


@settings(max_examples=30, deadline=None)
@given(data=st.data(), tensors_spec=spec, step_config=step_configs)
def test_same_seed_is_reproducible_and_state_dict_round_trips(data, tensors_spec, step_config):
    configs = [data.draw(group_configs) for _ in tensors_spec]
    runs = []
    for _ in range(2):
        params, groups = build(tensors_spec, configs, 1e-2, step_config)
        opt = HybridZOOptimizer(groups, seed=5)
        for _ in range(2):
            opt.step(lambda: loss_of(params))
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    # a fresh optimizer loaded from the state continues identically
    oc = HybridZOOptimizer(build(tensors_spec, configs, 1e-2, step_config)[1], seed=9)
    pc = [g["params"][0] for g in oc.param_groups]
    with torch.no_grad():
        for c, a in zip(pc, pa):
            c.copy_(a)
    oc.load_state_dict(copy.deepcopy(oa.state_dict()))  # torch shares same-dtype tensors on load
    oa.step(lambda: loss_of(pa))
    oc.step(lambda: loss_of(pc))
    for a, c in zip(pa, pc):
        assert torch.equal(a, c)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 300), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**63 - 1),
       distribution=st.sampled_from(sorted(DISTRIBUTIONS)))
def test_directions_regenerate_identically_and_leave_the_global_rng_alone(length, dtype, seed, distribution):
    kind = DISTRIBUTIONS[distribution]

    def draw(seed_):
        out = torch.empty(kind.padded_length(length), dtype=dtype)
        return DirectionGenerator().fill_(out, seed_, length, kind).clone()

    state = torch.get_rng_state()
    first, second = draw(seed), draw(seed)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.dtype == dtype and first.shape == (length,)
    assert torch.equal(first, second)
    if length > 8:
        assert not torch.equal(first, draw(seed ^ 1))


@settings(max_examples=30, deadline=None)
@given(data=st.data(), tensors_spec=spec)
def test_only_zo_parameters_change_without_fo_gradients(data, tensors_spec):
    """With FO lr = 0 and ZO lr > 0 only ZO tensors move, and every ZO tensor stays finite."""
    configs = [data.draw(group_configs) for _ in tensors_spec]
    params, groups = build(tensors_spec, configs, 1e-2, {})
    for g in groups:
        if g["mode"] == "fo":
            g["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    HybridZOOptimizer(groups, seed=1).step(lambda: loss_of(params))
    for p, b, c in zip(params, before, configs):
        if c["mode"] == "fo":
            assert torch.equal(p, b)
        assert torch.isfinite(p).all()


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    rule=st.sampled_from(["sgd", "adamw"]),
    momentum=st.sampled_from([0.0, 0.9]),
    weight_decay=st.sampled_from([0.0, 0.01, 3.0]),
    with_state=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_undo_rule_inverts_a_trial_move(shape, rule, momentum, weight_decay, with_state, seed):
    from hybridzo.rules import begin_update, finish

    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(shape, generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    group = {"rule": rule, "lr": 0.1, "momentum": momentum, "betas": (0.9, 0.999), "adam_eps": 1e-8,
             "weight_decay": weight_decay}
    state = {}
    if with_state:  # one committed step first, so the trial reads existing buffers
        first = begin_update(state, theta, group, commit=True)
        first.apply_(theta.clone().view(-1), theta.view(-1).clone(),
                     torch.randn(shape, generator=g, dtype=torch.float64).view(-1))
        finish(state, first)
    saved = copy.deepcopy(state)
    param = theta.clone().view(-1)
    trial = begin_update(state, theta, group, commit=False)
    trial.apply_(param, param, grad.view(-1))
    trial.undo_(param, grad.view(-1))
    torch.testing.assert_close(param.view(shape), theta, rtol=1e-12, atol=1e-12)
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value
