"""Failures leave the optimizer exactly as it was; every value that reaches a group is validated (issue 11)."""

import copy
import io
import math
import re
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hybridzo import HybridZOOptimizer

NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------ helpers


def clone_tree(value):
    """A deep copy of a state_dict-like tree whose tensors are cloned (state_dict() shares them)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_tree(v) for v in value)
    return copy.deepcopy(value)


def assert_same_tree(actual, expected, path="state_dict"):
    """Equal bit for bit: tensors (dtype, shape, values, NaN where NaN), same types, same keys."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual).__name__} instead of a tensor"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, path
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{path}: keys {actual.keys()} != {expected.keys()}"
        for key in expected:
            assert_same_tree(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{path}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tree(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), f"{path}: {actual!r} != nan"
    else:
        assert type(actual) is type(expected) and actual == expected, f"{path}: {actual!r} != {expected!r}"


def capture(opt, params):
    """Everything a failed step must leave as it was: parameters, grads (objects and values), state, counters."""
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [(p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params],
        "state": clone_tree(opt.state_dict()),
    }


def assert_unchanged(before, opt, params, param_rtol=0.0):
    for i, (p, b) in enumerate(zip(params, before["params"])):
        if param_rtol == 0:
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=0, msg=f"parameter {i} changed")
        else:
            assert (p.detach() - b).norm() <= param_rtol * b.norm(), f"parameter {i} moved"
    for i, (p, (grad, values)) in enumerate(zip(params, before["grads"])):
        assert p.grad is grad, f"parameter {i}: .grad is not the tensor (or None) it was before the step"
        if values is not None:
            torch.testing.assert_close(p.grad, values, rtol=0, atol=0, msg=f"parameter {i}: .grad values changed")
    assert_same_tree(opt.state_dict(), before["state"])


def assert_names(message, group, key):
    assert f"param group {group}" in message, message
    assert re.search(rf"\b{key}\b", message), message


def mlp(seed=0, sizes=(6, 8, 8, 1), dtype=torch.float32):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).to(dtype)


def batch(dtype=torch.float32, n=8, inputs=6, outputs=1):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, inputs, generator=g).to(dtype), torch.randn(n, outputs, generator=g).to(dtype)


def loss_fn(model, dtype=torch.float32):
    x, y = batch(dtype, inputs=model[0].in_features, outputs=model[-1].out_features)
    return lambda: nn.functional.mse_loss(model(x), y)


def three_groups(model, **overrides):
    """ZO SGD with momentum, ZO AdamW (coordinate sign), FO AdamW with decay: every kind of state."""
    return HybridZOOptimizer(
        [
            {"params": model[0].parameters(), "mode": "zo", "momentum": 0.9},
            {"params": model[2].parameters(), "mode": "zo", "rule": "adamw", "sign": "coordinate"},
            {"params": model[4].parameters(), "mode": "fo", "rule": "adamw", "weight_decay": 0.01},
        ],
        **{"lr": 0.05, "conservative": True, "seed": 0, **overrides},
    )


def distinct_grads(params, seed=5):
    """Give every parameter but the first a gradient the step cannot reproduce, so restoring it is visible."""
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = None if i == 0 else torch.randn(p.shape, generator=g).to(p.dtype)


# ------------------------------------------------ item 1: atomic failures


@pytest.mark.parametrize("same_group", [False, True], ids=["dense-group-first", "dense-and-sparse-in-one-group"])
def test_sparse_fo_gradient_is_refused_before_anything_is_written(same_group):
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4, sparse=True)
    body, head = nn.Linear(4, 4), nn.Linear(4, 1)
    index, y = torch.tensor([1, 3, 5, 3]), torch.randn(4, 1)
    fo_groups = (
        [{"params": [*head.parameters(), embedding.weight], "mode": "fo", "momentum": 0.9}]
        if same_group
        else [{"params": head.parameters(), "mode": "fo", "momentum": 0.9}, {"params": embedding.parameters(), "mode": "fo"}]
    )
    opt = HybridZOOptimizer([{"params": body.parameters(), "mode": "zo", "momentum": 0.9}, *fo_groups], lr=0.1, seed=0)
    closure = lambda: nn.functional.mse_loss(head(torch.tanh(body(embedding(index)))), y)  # noqa: E731
    embedding.weight.requires_grad_(False)
    opt.step(closure)  # momentum buffers and dense FO grads exist before the failing step
    embedding.weight.requires_grad_(True)
    params = [*body.parameters(), *head.parameters(), embedding.weight]
    before = capture(opt, params)
    with pytest.raises((RuntimeError, ValueError), match="(?i)sparse"):
        opt.step(closure)
    assert_unchanged(before, opt, params)


def test_sparse_gradient_already_in_grad_is_refused_by_a_closure_free_step_before_anything_is_written():
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4, sparse=True)
    head = nn.Linear(4, 1)
    opt = HybridZOOptimizer([{"params": head.parameters(), "momentum": 0.9}, {"params": embedding.parameters()}],
                            mode="fo", lr=0.1)
    index = torch.tensor([1, 3, 5])
    head(embedding(index)).sum().backward()
    params = [*head.parameters(), embedding.weight]
    before = capture(opt, params)
    with pytest.raises((RuntimeError, ValueError), match="(?i)sparse"):
        opt.step()
    assert_unchanged(before, opt, params)


def mixed_pair_optimizer(model, lr):
    return HybridZOOptimizer(
        [
            {"params": model[0].parameters(), "mode": "zo", "momentum": 0.9},
            {"params": model[2].parameters(), "mode": "fo", "momentum": 0.9, "weight_decay": 0.01},
        ],
        lr=lr, seed=0,
    )


def test_fraction_lr_is_normalised_to_the_float_it_equals():
    models = [mlp(sizes=(6, 8, 1)), mlp(sizes=(6, 8, 1))]
    opts = [mixed_pair_optimizer(models[0], Fraction(1, 10)), mixed_pair_optimizer(models[1], 0.1)]
    assert all(type(g["lr"]) is float and g["lr"] == 0.1 for g in opts[0].param_groups)
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.step(loss_fn(model))
    for g in opts[0].param_groups:  # a scheduler-like write between steps
        g["lr"] = Fraction(1, 20)
    for g in opts[1].param_groups:
        g["lr"] = 0.05
    for _ in range(2):
        for model, opt in zip(models, opts):
            opt.step(loss_fn(model))
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
    assert_same_tree(opts[0].state_dict()["state"], opts[1].state_dict()["state"])


@pytest.mark.parametrize("bad_lr", ["0.1", None, NAN, INF])
def test_bad_lr_written_between_steps_fails_the_step_and_changes_nothing(bad_lr):
    model = mlp(sizes=(6, 8, 1))
    opt = mixed_pair_optimizer(model, 0.1)
    opt.step(loss_fn(model))
    opt.param_groups[1]["lr"] = bad_lr
    params = list(model.parameters())
    before = capture(opt, params)
    with pytest.raises(ValueError) as error:
        opt.step(loss_fn(model))
    assert_names(str(error.value), 1, "lr")
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("mode", ["zo", "fo"])
def test_load_state_dict_refuses_a_moment_of_the_wrong_shape(mode):
    model = mlp(sizes=(3, 4))  # one Linear: weight (4, 3), then bias (4,)
    opt = HybridZOOptimizer(model.parameters(), mode=mode, rule="adamw", lr=0.1, seed=0)
    closure = lambda: model(torch.ones(2, 3)).pow(2).sum()  # noqa: E731
    opt.step(closure)
    corrupt = clone_tree(opt.state_dict())
    corrupt["state"][1]["exp_avg"] = torch.zeros(5)
    params = list(model.parameters())
    before = capture(opt, params)
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(corrupt)
    assert_names(str(error.value), 0, "exp_avg")
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("mode", ["zo", "fo"])
def test_step_with_a_moment_of_the_wrong_shape_fails_before_writing(mode):
    model = mlp(sizes=(3, 4))
    opt = HybridZOOptimizer(model.parameters(), mode=mode, rule="adamw", lr=0.1, seed=0)
    closure = lambda: model(torch.ones(2, 3)).pow(2).sum()  # noqa: E731
    opt.step(closure)
    weight, bias = model[0].weight, model[0].bias
    opt.state[bias]["exp_avg"] = torch.zeros(5)
    step_of_first = opt.state_dict()["state"][0]["step"]
    params = [weight, bias]
    before = capture(opt, params)
    with pytest.raises(ValueError):
        opt.step(closure)
    assert opt.state_dict()["state"][0]["step"] == step_of_first
    assert_unchanged(before, opt, params)


ZO_ONLY_FAILING_CLOSURE_CONFIGS = [
    dict(zo=dict(momentum=0.9)),
    dict(zo=dict(estimator="forward", rule="adamw")),
    dict(zo=dict(candidates=2, momentum=0.9)),
    dict(zo=dict(conservative=True, rule="adamw", weight_decay=0.1)),
    dict(zo=dict(conservative=True, candidates=2, queries=2, momentum=0.9)),
]
FO_FAILING_CLOSURE_CONFIGS = [
    dict(zo=dict(momentum=0.9), fo=dict(momentum=0.9)),
    dict(zo=dict(conservative=True, rule="adamw"), fo=dict(rule="adamw")),
    dict(zo=dict(estimator="forward", candidates=2, momentum=0.9, sign="coordinate"), fo=dict(rule="adamw", weight_decay=0.1)),
    dict(fo=dict(rule="adamw")),
    dict(fo=dict(momentum=0.9, weight_decay=0.1)),
]


def config_id(config):
    return "-".join(f"{k}:" + ",".join(f"{o}={v}" for o, v in options.items()) for k, options in config.items())


class Boom(RuntimeError):
    pass


def failing_closure_case(config, restore, fail_at):
    """Run one good step, then a step whose closure raises on call ``fail_at``; check nothing changed."""
    model = mlp(sizes=(6, 8, 8, 1))
    hidden, head = [*model[0].parameters(), *model[2].parameters()], list(model[4].parameters())
    if "zo" not in config:
        groups = [{"params": hidden + head, "mode": "fo", **config["fo"]}]
    elif "fo" not in config:
        groups = [{"params": hidden + head, "mode": "zo", "restore": restore, **config["zo"]}]
    else:
        groups = [{"params": hidden, "mode": "zo", "restore": restore, **config["zo"]},
                  {"params": head, "mode": "fo", **config["fo"]}]
    opt = HybridZOOptimizer(groups, lr=0.05, seed=0)
    good = loss_fn(model)
    opt.step(good)
    forwards = opt.last_step_info["forwards"]
    fail_at = (fail_at - 1) % forwards + 1
    params = list(model.parameters())
    distinct_grads(params)
    before = capture(opt, params)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == fail_at:
            raise Boom(f"call {fail_at}")
        return good()

    with pytest.raises(Boom):
        opt.step(closure)
    assert_unchanged(before, opt, params, param_rtol=0.0 if restore == "exact" else 1e-6)
    return forwards


def fail_on_every_call(config, restore):
    fail_at, forwards = 1, 1
    while fail_at <= forwards:
        forwards = failing_closure_case(config, restore, fail_at)
        fail_at += 1


@pytest.mark.parametrize("restore", ["exact", "inplace"])
@pytest.mark.parametrize("config", FO_FAILING_CLOSURE_CONFIGS, ids=config_id)
def test_exception_on_any_closure_call_of_a_step_with_fo_groups_leaves_everything_as_it_was(config, restore):
    fail_on_every_call(config, restore)


@pytest.mark.parametrize("restore", ["exact", "inplace"])
@pytest.mark.parametrize("config", ZO_ONLY_FAILING_CLOSURE_CONFIGS, ids=config_id)
def test_exception_on_any_closure_call_of_a_zo_only_step_still_leaves_everything_as_it_was(config, restore):
    fail_on_every_call(config, restore)


@settings(max_examples=25, deadline=None)
@given(
    zo=st.fixed_dictionaries({
        "estimator": st.sampled_from(["central", "forward"]),
        "queries": st.integers(1, 2),
        "candidates": st.integers(1, 3),
        "conservative": st.booleans(),
        "rule": st.sampled_from(["sgd", "adamw"]),
        "momentum": st.sampled_from([0.0, 0.9]),
        "sign": st.sampled_from([None, "coordinate", "scalar"]),
    }),
    fo=st.one_of(st.none(), st.fixed_dictionaries({"rule": st.sampled_from(["sgd", "adamw"]), "momentum": st.sampled_from([0.0, 0.9])})),
    restore=st.sampled_from(["exact", "inplace"]),
    fail_at=st.integers(1, 40),
)
def test_property_exception_at_a_random_closure_call_changes_nothing(zo, fo, restore, fail_at):
    failing_closure_case({"zo": zo, **({"fo": fo} if fo else {})}, restore, fail_at)


# ----------------------------------------------- item 2: load_state_dict validates

BAD_LOADED_VALUES = [
    ("lr", NAN), ("lr", INF), ("lr", -1.0),
    ("weight_decay", NAN),
    ("momentum", 1.5),
    ("mode", "xo"),
    ("rule", "adam"),
    ("restore", "copy"),
    ("sign", "bogus"),
    ("conservative", "yes"),
    ("adam_eps", -1.0),
    ("eps", "1e-3"), ("eps", 0.0), ("eps", NAN),
    ("betas", (0.9,)), ("betas", (0.9, 1.5)),
    ("queries", 0),
    ("seed", "abc"),
    *[(counter, value) for counter in ("steps", "nonfinite_steps") for value in (-1, 1.5, "3", None)],
]


def bad_load_case(key, value, group_index):
    models = [mlp(), mlp()]
    opts = [three_groups(m) for m in models]
    for model, opt in zip(models, opts):
        opt.step(loss_fn(model))
    corrupt = clone_tree(opts[0].state_dict())
    corrupt["param_groups"][group_index][key] = value
    params = list(models[0].parameters())
    before = capture(opts[0], params)
    with pytest.raises((ValueError, TypeError)) as error:
        opts[0].load_state_dict(corrupt)
    assert_names(str(error.value), group_index, key)
    assert_unchanged(before, opts[0], params)
    for model, opt in zip(models, opts):  # the next step is the one an optimizer that never saw the load takes
        opt.step(loss_fn(model))
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
    assert_same_tree(opts[0].state_dict(), opts[1].state_dict())


@pytest.mark.parametrize("key, value", BAD_LOADED_VALUES, ids=lambda v: repr(v))
def test_load_state_dict_refuses_each_bad_group_value(key, value):
    bad_load_case(key, value, 1)


@settings(max_examples=30, deadline=None)
@given(bad=st.sampled_from(BAD_LOADED_VALUES), group_index=st.integers(0, 2))
def test_property_load_state_dict_refuses_a_bad_value_in_any_group(bad, group_index):
    bad_load_case(*bad, group_index)


@pytest.mark.parametrize("key, value", [("estimator", "forward"), ("queries", 2), ("candidates", 2), ("conservative", False)])
def test_load_state_dict_refuses_zo_groups_that_disagree_on_step_wide_keys(key, value):
    bad_load_case(key, value, 1)


def test_load_state_dict_still_accepts_a_fo_group_that_differs_on_step_wide_keys():
    model = mlp()
    opt = three_groups(model)
    opt.step(loss_fn(model))
    state = clone_tree(opt.state_dict())
    state["param_groups"][2].update(queries=2, candidates=3, estimator="forward", conservative=False)
    opt.load_state_dict(state)
    opt.step(loss_fn(model))


def test_old_state_dict_without_restore_still_loads_and_restores_exactly():
    models = [mlp(), mlp()]
    opts = [three_groups(m) for m in models]
    for model, opt in zip(models, opts):
        opt.step(loss_fn(model))
    old = clone_tree(opts[0].state_dict())
    for group in old["param_groups"]:
        del group["restore"]
    resumed = three_groups(models[0], restore="inplace")
    resumed.load_state_dict(old)
    assert [g["restore"] for g in resumed.param_groups] == ["exact"] * 3
    for opt, model in ((resumed, models[0]), (opts[1], models[1])):
        for _ in range(3):
            opt.step(loss_fn(model))
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


# --------------------------------------------- item 4: non-finite and numpy numbers

NON_FINITE = [
    *[(key, value) for key in ("lr", "eps", "momentum", "adam_eps", "weight_decay") for value in (INF, -INF, NAN)],
    ("betas", (INF, 0.999)), ("betas", (0.9, NAN)), ("betas", (-INF, 0.999)),
]
NON_FINITE_ACCEPTED_TODAY = [("adam_eps", INF), ("weight_decay", INF)]


def refuse_when_made(key, value, entry):
    first, second = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    if entry == "constructor":
        with pytest.raises(ValueError, match=rf"\b{key}\b"):
            HybridZOOptimizer([first], **{key: value})
    elif entry == "group":
        with pytest.raises(ValueError) as error:
            HybridZOOptimizer([{"params": [first]}, {"params": [second], key: value}])
        assert_names(str(error.value), 1, key)
    else:
        opt = HybridZOOptimizer([first], lr=0.1, seed=0)
        with pytest.raises(ValueError) as error:
            opt.add_param_group({"params": [second], key: value})
        assert_names(str(error.value), 1, key)
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("entry", ["constructor", "group", "add_param_group"])
@pytest.mark.parametrize("key, value", NON_FINITE_ACCEPTED_TODAY, ids=repr)
def test_infinite_weight_decay_and_adam_eps_are_refused_when_groups_are_made(key, value, entry):
    refuse_when_made(key, value, entry)


@pytest.mark.parametrize("entry", ["constructor", "group", "add_param_group"])
@pytest.mark.parametrize("key, value", [kv for kv in NON_FINITE if kv not in NON_FINITE_ACCEPTED_TODAY], ids=repr)
def test_other_non_finite_hyperparameters_are_still_refused_when_groups_are_made(key, value, entry):
    refuse_when_made(key, value, entry)


@pytest.mark.parametrize("key, value", NON_FINITE, ids=repr)
def test_non_finite_hyperparameters_are_refused_by_load_state_dict(key, value):
    first, second = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([first], lr=0.1, seed=0)
    opt.add_param_group({"params": [second]})
    opt.step(lambda: (first**2).sum() + (second**2).sum())
    corrupt = clone_tree(opt.state_dict())
    corrupt["param_groups"][1][key] = value
    before = capture(opt, [first, second])
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(corrupt)
    assert_names(str(error.value), 1, key)
    assert_unchanged(before, opt, [first, second])


NUMPY_OPTIONS = {
    "seed": np.int64(7),
    "lr": np.float32(0.01),
    "queries": np.int64(2),
    "betas": (np.float32(0.8), np.float64(0.99)),
    "momentum": np.float32(0.5),
    "weight_decay": np.float64(0.01),
    "candidates": np.int32(1),
}
PYTHON_TYPES = {"seed": int, "queries": int, "candidates": int}


def assert_plain_python_numbers(group):
    for key, value in NUMPY_OPTIONS.items():
        if key == "betas":
            assert type(group["betas"]) is tuple and len(group["betas"]) == 2, group["betas"]
            for stored, given_value in zip(group["betas"], value):
                assert type(stored) is float and stored == float(given_value)
        else:
            expected_type = PYTHON_TYPES.get(key, float)
            assert type(group[key]) is expected_type, f"{key}: {type(group[key]).__name__}"
            assert group[key] == expected_type(value)


def assert_loads_with_weights_only(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert len(loaded["param_groups"]) == len(opt.param_groups)


@pytest.mark.parametrize("entry", ["constructor", "group", "add_param_group", "load_state_dict"])
def test_numpy_numbers_are_stored_as_python_numbers(entry):
    first, second = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    if entry == "constructor":
        opt = HybridZOOptimizer([first], **NUMPY_OPTIONS)
        opt.add_param_group({"params": [second]})  # inherits the defaults
    elif entry == "group":
        opt = HybridZOOptimizer([{"params": [first], **NUMPY_OPTIONS}, {"params": [second], "queries": 2}])
    elif entry == "add_param_group":
        opt = HybridZOOptimizer([first], queries=2, seed=0)
        opt.add_param_group({"params": [second], **NUMPY_OPTIONS})
    else:
        opt = HybridZOOptimizer([first, second], queries=2, seed=0)
        state = clone_tree(opt.state_dict())
        state["param_groups"][0].update(NUMPY_OPTIONS)
        opt.load_state_dict(state)
    numpy_groups = {"constructor": [0, 1], "group": [0], "add_param_group": [1], "load_state_dict": [0]}[entry]
    for index in numpy_groups:
        assert_plain_python_numbers(opt.param_groups[index])
    for group in opt.param_groups:
        assert type(group["steps"]) is int and type(group["nonfinite_steps"]) is int
    assert_loads_with_weights_only(opt)
    opt.step(lambda: (first**2).sum() + (second**2).sum())
    assert_loads_with_weights_only(opt)


# --------------------------------------------------- item 5: complex FO parameters


def complex_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 4, dtype=torch.complex64, generator=g)
    bias = torch.randn(3, dtype=torch.complex64, generator=g)
    data = [(torch.randn(8, 4, dtype=torch.complex64, generator=g), torch.randn(8, 3, dtype=torch.complex64, generator=g)) for _ in range(10)]
    return weight, bias, data


def complex_run(options, reference):
    weight, bias, data = complex_problem()
    ours = [nn.Parameter(weight.clone()), nn.Parameter(bias.clone())]
    theirs = [nn.Parameter(weight.clone()), nn.Parameter(bias.clone())]
    opt = HybridZOOptimizer(ours, mode="fo", lr=0.05, **options)
    ref = reference(theirs)

    def loss(params, x, y):
        return ((x @ params[0].T + params[1] - y).abs() ** 2).mean()

    for x, y in data:
        opt.step(lambda: loss(ours, x, y))
        ref.zero_grad()
        loss(theirs, x, y).backward()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "options, reference",
    [
        (dict(rule="adamw", weight_decay=0.01), lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.01)),
        (dict(rule="adamw", betas=(0.8, 0.9), adam_eps=1e-6), lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0)),
    ],
    ids=["adamw", "adamw-betas"],
)
def test_complex_fo_parameters_in_adamw_groups_match_torch_over_10_steps(options, reference):
    complex_run(options, reference)


def test_complex_fo_parameters_in_sgd_groups_still_match_torch_over_10_steps():
    complex_run(dict(rule="sgd", momentum=0.9, weight_decay=0.01),
                lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01))


# --------------------------------- item 6: in-place undo near lr * weight_decay = 1

REFUSED_WEIGHT_DECAY = [0.9000001, 0.95, 0.9999999, 1.0, 1.0000001, 1.0999]
ALLOWED_WEIGHT_DECAY = [0.0, 0.5, 0.9, 1.1, 2.0]
TRIAL_MOVES = [dict(conservative=True), dict(candidates=2)]


def inplace_group(param, weight_decay, restore="inplace"):
    return {"params": [param], "lr": 1.0, "weight_decay": weight_decay, "restore": restore}


@pytest.mark.parametrize("trial", TRIAL_MOVES, ids=["conservative", "candidates"])
@pytest.mark.parametrize("weight_decay", REFUSED_WEIGHT_DECAY)
def test_inplace_trial_moves_near_lr_times_weight_decay_one_are_refused_when_groups_are_made(weight_decay, trial):
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError) as error:
        HybridZOOptimizer([inplace_group(p, weight_decay)], seed=0, **trial)
    assert_names(str(error.value), 0, "weight_decay")
    opt = HybridZOOptimizer([{"params": [q]}], seed=0, **trial)
    with pytest.raises(ValueError) as error:
        opt.add_param_group(inplace_group(p, weight_decay))
    assert_names(str(error.value), 1, "weight_decay")
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("trial", TRIAL_MOVES, ids=["conservative", "candidates"])
@pytest.mark.parametrize("weight_decay", ALLOWED_WEIGHT_DECAY)
def test_inplace_trial_moves_at_and_outside_the_threshold_are_still_allowed(weight_decay, trial):
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([inplace_group(p, weight_decay)], seed=0, **trial)
    opt.add_param_group(inplace_group(q, weight_decay))
    opt.step(lambda: ((p - 2) ** 2).sum() + ((q - 2) ** 2).sum())


@pytest.mark.parametrize("trial", [dict(conservative=True), dict(candidates=2), dict()], ids=["conservative", "candidates", "none"])
@pytest.mark.parametrize("weight_decay", REFUSED_WEIGHT_DECAY)
def test_exact_restore_and_inplace_without_trial_moves_are_still_never_refused(weight_decay, trial):
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    restore = "inplace" if not trial else "exact"
    opt = HybridZOOptimizer([inplace_group(p, weight_decay, restore)], seed=0, **trial)
    opt.add_param_group(inplace_group(q, weight_decay, restore))
    opt.step(lambda: ((p - 2) ** 2).sum() + ((q - 2) ** 2).sum())


@pytest.mark.parametrize("factor", [1.8000002, 1.9, 2.1998])
def test_inplace_refused_at_step_when_a_scheduler_moves_lr_into_the_range(factor):
    model = mlp(sizes=(6, 8, 1))
    opt = HybridZOOptimizer(
        [{"params": model[2].parameters(), "mode": "fo"},
         {"params": model[0].parameters(), "restore": "inplace", "weight_decay": 0.5, "momentum": 0.9}],
        lr=1.0, conservative=True, seed=0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else factor)
    closure = loss_fn(model)
    opt.step(closure)
    scheduler.step()
    assert opt.param_groups[1]["lr"] == factor
    params = list(model.parameters())
    before = capture(opt, params)
    with pytest.raises(ValueError) as error:
        opt.step(closure)
    assert_names(str(error.value), 1, "weight_decay")
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("bad_call", [1, 2, 3, 4, 5])
def test_inplace_skipped_step_at_lr_times_weight_decay_one_half_still_returns_to_theta(bad_call):
    model = mlp(sizes=(6, 8, 1))
    opt = HybridZOOptimizer(model.parameters(), lr=1.0, weight_decay=0.5, eps=1e-3, conservative=True, restore="inplace", seed=0)
    good = loss_fn(model)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        return good() * NAN if len(calls) == bad_call else good()

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    assert opt.last_step_info["skipped"]
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-5)


# ------------------------------------ item 8: backward in other threads during probes


@pytest.mark.parametrize("mixed", [False, True], ids=["zo-only", "mixed"])
def test_backward_in_another_thread_during_probes_computes_gradients(mixed):
    models = [mlp(sizes=(6, 8, 1)), mlp(sizes=(6, 8, 1))]
    opts = []
    for model in models:
        groups = [{"params": model[0].parameters(), "mode": "zo"}]
        groups.append({"params": model[2].parameters(), "mode": "fo" if mixed else "zo"})
        opts.append(HybridZOOptimizer(groups, lr=0.05, conservative=True, seed=0))
    torch.manual_seed(3)
    other = nn.Linear(5, 1)
    other_x = torch.randn(4, 5)
    probing, finished = threading.Event(), threading.Event()
    seen = {}

    def other_training_thread():
        try:
            if not probing.wait(30):
                seen["error"] = "step() never probed"
                return
            other.zero_grad()
            other(other_x).pow(2).sum().backward()
            seen["grad"] = other.weight.grad
        except BaseException as error:  # reported below
            seen["error"] = error
        finally:
            finished.set()

    good = loss_fn(models[0])
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:  # a forward-only probe
            probing.set()
            assert finished.wait(30)
        return good()

    thread = threading.Thread(target=other_training_thread)
    thread.start()
    try:
        opts[0].step(closure)
    finally:
        probing.set()
        thread.join(30)
    assert "error" not in seen, seen.get("error")
    assert seen["grad"] is not None and seen["grad"].abs().sum() > 0
    opts[1].step(loss_fn(models[1]))  # and the step itself is the one without the thread
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------- item 9: what step() returns

RETURN_CONFIGS = {
    "fo-only": dict(layers=("fo", "fo"), options=dict()),
    "zo-central": dict(layers=("zo", "zo"), options=dict(queries=2)),
    "zo-forward": dict(layers=("zo", "zo"), options=dict(estimator="forward")),
    "zo-conservative": dict(layers=("zo", "zo"), options=dict(conservative=True)),
    "zo-candidates": dict(layers=("zo", "zo"), options=dict(candidates=3, queries=2)),
    "mixed": dict(layers=("zo", "fo"), options=dict(conservative=True)),
    "mixed-central": dict(layers=("zo", "fo"), options=dict()),
}


def check_returned_loss(name, loss_dtype, device):
    config = RETURN_CONFIGS[name]
    model = mlp(sizes=(6, 8, 1)).to(device)
    groups = [{"params": model[0].parameters(), "mode": config["layers"][0]},
              {"params": model[2].parameters(), "mode": config["layers"][1]}]
    opt = HybridZOOptimizer(groups, lr=0.05, seed=0, **config["options"])
    x, y = (t.to(device) for t in batch())

    def loss():
        return nn.functional.mse_loss(model(x), y).to(loss_dtype)

    for _ in range(2):
        with torch.no_grad():
            at_theta = loss()
        returned_by_closure = []

        def closure():
            value = loss()
            returned_by_closure.append(value.detach().double().item())
            return value

        result = opt.step(closure)
        assert isinstance(result, torch.Tensor)
        assert result.dim() == 0 and not result.requires_grad
        assert result.device == at_theta.device and result.dtype == loss_dtype
        options = config["options"]
        if "fo" not in config["layers"] and options.get("estimator", "central") == "central" and not options.get("conservative"):
            probes = 2 * options.get("queries", 1) * options.get("candidates", 1)
            probe_mean = sum(returned_by_closure[:probes]) / probes
            torch.testing.assert_close(result.cpu(), torch.tensor(probe_mean, dtype=torch.float64).to(loss_dtype))
        else:
            assert torch.equal(result, at_theta)


ZO_ONLY = [name for name, config in RETURN_CONFIGS.items() if "fo" not in config["layers"]]
WITH_FO = [name for name in RETURN_CONFIGS if name not in ZO_ONLY]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.mark.parametrize(
    "loss_dtype, device",
    [(torch.float64, "cpu"), (torch.bfloat16, "cpu"),
     *[pytest.param(dtype, "cuda", marks=CUDA) for dtype in (torch.float32, torch.float64, torch.bfloat16)]],
    ids=str,
)
@pytest.mark.parametrize("name", ZO_ONLY)
def test_zo_only_step_returns_a_detached_scalar_with_the_loss_dtype_and_device(name, loss_dtype, device):
    check_returned_loss(name, loss_dtype, device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", WITH_FO)
def test_step_with_fo_groups_still_returns_the_detached_loss_at_theta(name, loss_dtype, device):
    check_returned_loss(name, loss_dtype, device)


@pytest.mark.parametrize("name", ZO_ONLY)
def test_zo_only_step_with_a_float32_cpu_loss_still_returns_a_detached_scalar(name):
    check_returned_loss(name, torch.float32, "cpu")


# ------------------------------------------------------------ item 11: GradScaler


def scaler_setup(kind):
    model = mlp(sizes=(6, 8, 1))
    modes = {"zo-only": ("zo", "zo"), "mixed": ("zo", "fo"), "fo-only": ("fo", "fo")}[kind]
    groups = [{"params": model[0].parameters(), "mode": modes[0], "momentum": 0.9},
              {"params": model[2].parameters(), "mode": modes[1], "rule": "adamw"}]
    return model, HybridZOOptimizer(groups, lr=0.05, seed=0)


def refused_scaler_step(kind, with_closure):
    model, opt = scaler_setup(kind)
    twin_model, twin = scaler_setup(kind)
    plain = loss_fn(model)
    opt.step(plain)
    twin.step(loss_fn(twin_model))
    scaler = torch.amp.GradScaler("cpu")

    def scaled_closure():
        opt.zero_grad()
        loss = plain()
        scaler.scale(loss).backward()
        return loss

    scaled_closure()  # gradients are there, as after the previous iteration's backward
    params = list(model.parameters())
    before = capture(opt, params)
    at_entry = []

    def on_entry(optimizer, args, kwargs):
        at_entry.append(capture(optimizer, params))

    handle = opt.register_step_pre_hook(on_entry)
    try:
        with pytest.raises((RuntimeError, ValueError)) as error:
            if with_closure:
                scaler.step(opt, scaled_closure)
            else:
                scaler.step(opt)
    finally:
        handle.remove()
    message = str(error.value)
    assert "GradScaler" in message and "bf16" in message, message
    assert_unchanged(at_entry[-1] if at_entry else before, opt, params)
    assert_same_tree(opt.state_dict(), before["state"])
    # a plain step afterwards is the step an optimizer that never met the scaler takes
    opt.step(plain)
    twin.step(loss_fn(twin_model))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["zo-only", "mixed", "fo-only"])
def test_grad_scaler_with_a_closure_is_refused_and_changes_nothing(kind):
    refused_scaler_step(kind, with_closure=True)


@pytest.mark.parametrize("kind", ["zo-only", "mixed"])
def test_grad_scaler_without_a_closure_is_still_refused_with_zo_groups(kind):
    refused_scaler_step(kind, with_closure=False)


@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler-unscales", "unscale_-before-step"])
@pytest.mark.parametrize("implementation", [{}, dict(foreach=True), dict(fused=True)], ids=["default", "foreach", "fused"])
@pytest.mark.parametrize(
    "options, reference",
    [
        (dict(rule="sgd", momentum=0.9, weight_decay=0.01), lambda p, **k: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, **k)),
        (dict(rule="adamw", weight_decay=0.01), lambda p, **k: torch.optim.AdamW(p, lr=0.05, weight_decay=0.01, **k)),
    ],
    ids=["sgd", "adamw"],
)
def test_grad_scaler_without_a_closure_still_matches_torch_on_fo_only_optimizers(options, reference, implementation,
                                                                                  unscale_first):
    """The scaler unscales and checks the gradients, then steps: the result is torch.optim's with the same
    implementation (fused torch.optim unscales inside its kernel, exactly so for the scaler's powers of 2),
    skipped steps included."""
    models = [mlp(sizes=(6, 8, 1)), mlp(sizes=(6, 8, 1))]
    opts = [HybridZOOptimizer(models[0].parameters(), mode="fo", lr=0.05, **options, **implementation),
            reference(models[1].parameters(), **implementation)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in opts]
    scales = [[], []]
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)
        for i, (model, opt, scaler) in enumerate(zip(models, opts, scalers)):
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
            if step == 2:
                model[0].weight.grad[0, 0] = INF  # this step is skipped
            if unscale_first:
                scaler.unscale_(opt)  # as before clipping gradients
            scaler.step(opt)
            scaler.update()
            scales[i].append(scaler.get_scale())
    assert scales[0] == scales[1] and len(set(scales[0])) > 1
    assert opts[0].param_groups[0]["steps"] == 5  # the skipped step is not counted
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
    for p, q in zip(*(m.parameters() for m in models)):
        for key, value in opts[0].state.get(p, {}).items():
            assert torch.equal(value, opts[1].state[q][key]), key
