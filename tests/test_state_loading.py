"""What ``load_state_dict`` lets through (issue 22, items 2, 4, 6, 7).

* State layout: a loaded buffer with other strides than its parameter (built with ``.t()``, or saved by another
  framework) acts by logical index, as in ``torch.optim``: it is copied into the parameter's layout at load.
* Incomplete rule state is refused (naming group, parameter and key) unless the entry is absent as a whole.
* String options are stored as plain ``str`` (numpy strings would make the state dict fail
  ``torch.load(weights_only=True)``).
* A state tensor that cannot be placed with its parameter (``meta``) gets a ``ValueError``; nothing is loaded.
"""

import copy
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hybridzo import HybridZOOptimizer

STEPS = 4


def cloned(tree):
    """A copy of a state_dict-like tree whose tensors are cloned with their strides (state_dict() shares them)."""
    if isinstance(tree, torch.Tensor):
        return torch.empty_strided(tree.shape, tree.stride(), dtype=tree.dtype).copy_(tree)
    if isinstance(tree, dict):
        return {k: cloned(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(cloned(v) for v in tree)
    return copy.deepcopy(tree)


def column_major(shape, generator, positive=False):
    """A tensor of ``shape`` stored column-major (as ``.t()`` leaves a matrix): its dimensions reversed in memory."""
    values = torch.randn(tuple(reversed(shape)), generator=generator)
    values = values.abs() if positive else values
    return values.permute(*reversed(range(len(shape))))


def problem(weight_layout="row-major"):
    """A (4, 3) weight and a bias, their data and a loss; the weight column-major if asked."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=g)
    if weight_layout == "column-major":
        weight = weight.t().contiguous().t()
    bias = torch.randn(4, generator=g)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 4, generator=g)
    return weight, bias, (x, y)


def loss_of(params, data):
    weight, bias = params
    x, y = data
    return ((x @ weight.t() + bias).tanh() - y).pow(2).mean()


RULES = {  # name: (our group options, the torch.optim reference, the state a step leaves)
    "sgd-momentum": (dict(momentum=0.9, weight_decay=0.01),
                     lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01),
                     lambda shape, g: {"momentum_buffer": column_major(shape, g)}),
    "adamw": (dict(rule="adamw", weight_decay=0.01),
              lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.01),
              lambda shape, g: {"exp_avg": column_major(shape, g), "exp_avg_sq": column_major(shape, g, True),
                                "step": torch.tensor(3.0)}),
}


def loaded_state(rule, shapes, layout):
    """A saved state for every parameter of ``shapes``, its buffers stored ``layout``."""
    g = torch.Generator().manual_seed(1)
    state = {i: RULES[rule][2](shape, g) for i, shape in enumerate(shapes)}
    if layout == "contiguous":
        state = {i: {k: v.contiguous() for k, v in entry.items()} for i, entry in state.items()}
    return state


def ours(params, mode, rule, state):
    opt = HybridZOOptimizer([{"params": params, "mode": mode, **RULES[rule][0]}], lr=0.1, seed=3)
    saved = opt.state_dict()
    saved["state"] = cloned(state)
    opt.load_state_dict(saved)
    return opt


# --------------------------------------------------------------------------- item 2: state layout


@pytest.mark.parametrize("weight_layout, state_layout", [("row-major", "column-major"), ("column-major", "contiguous")])
@pytest.mark.parametrize("rule", list(RULES))
def test_fo_state_in_another_layout_than_its_parameter_matches_torch_bit_for_bit(rule, weight_layout, state_layout):
    weight, bias, data = problem(weight_layout)
    state = loaded_state(rule, [weight.shape, bias.shape], state_layout)
    params = [nn.Parameter(weight.clone(memory_format=torch.preserve_format)), nn.Parameter(bias.clone())]
    reference_params = [nn.Parameter(weight.clone(memory_format=torch.preserve_format)), nn.Parameter(bias.clone())]
    assert params[0].stride() == weight.stride()
    opt = ours(params, "fo", rule, state)
    reference = RULES[rule][1](reference_params)
    saved = reference.state_dict()
    saved["state"] = cloned(state)
    reference.load_state_dict(saved)
    for p in params:
        for value in opt.state[p].values():
            if value.dim():
                assert value.stride() == p.stride()  # in the parameter's layout, values by index
    for _ in range(STEPS):
        opt.step(lambda: loss_of(params, data))
        reference.zero_grad()
        loss_of(reference_params, data).backward()
        reference.step()
        for p, q in zip(params, reference_params):
            assert torch.equal(p, q)


@pytest.mark.parametrize("rule", list(RULES))
def test_zo_state_loaded_column_major_takes_the_steps_of_the_same_state_loaded_contiguous(rule):
    weight, bias, data = problem()
    runs = {}
    for layout in ("column-major", "contiguous"):
        params = [nn.Parameter(weight.clone()), nn.Parameter(bias.clone())]
        opt = ours(params, "zo", rule, loaded_state(rule, [weight.shape, bias.shape], layout))
        for _ in range(STEPS):
            opt.step(lambda: loss_of(params, data))
        runs[layout] = [p.detach().clone() for p in params]
    for p, q in zip(runs["column-major"], runs["contiguous"]):
        assert torch.equal(p, q)
    assert not torch.equal(runs["contiguous"][0], weight)


@settings(max_examples=15, deadline=None)
@given(order=st.permutations([0, 1, 2]), rule=st.sampled_from(list(RULES)))
def test_property_fo_state_in_any_dense_layout_matches_torch(order, rule):
    shape = (2, 3, 4)
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(shape, generator=g)
    target = torch.randn(shape, generator=g)

    def permuted(values):  # the same values stored with the dimensions in memory in ``order``
        return values.permute(order).contiguous().permute(np.argsort(order).tolist())

    state = {0: {k: permuted(v.contiguous()) if v.dim() else v for k, v in RULES[rule][2](shape, g).items()}}
    p, q = nn.Parameter(theta.clone()), nn.Parameter(theta.clone())
    opt = ours([p], "fo", rule, state)
    reference = RULES[rule][1]([q])
    saved = reference.state_dict()
    saved["state"] = cloned(state)
    reference.load_state_dict(saved)
    for _ in range(3):
        opt.step(lambda: (p.sin() - target).pow(2).sum())
        reference.zero_grad()
        (q.sin() - target).pow(2).sum().backward()
        reference.step()
    assert torch.equal(p, q)


# ------------------------------------------------------------------- item 4: incomplete state


def stepped(mode, rule):
    weight, bias, data = problem()
    params = [nn.Parameter(weight.clone()), nn.Parameter(bias.clone())]
    opt = HybridZOOptimizer([{"params": params, "mode": mode, **RULES[rule][0]}], lr=0.1, seed=3)
    opt.step(lambda: loss_of(params, data))
    return opt, params, data


def snapshot(opt, params):
    return [p.detach().clone() for p in params], cloned(opt.state_dict())


def assert_same_snapshot(before, opt, params):
    values, state = before
    for p, value in zip(params, values):
        assert torch.equal(p, value)
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    assert after["state"].keys() == state["state"].keys()
    for i, entry in state["state"].items():
        assert after["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            loaded = after["state"][i][key]
            assert torch.equal(loaded, value) if torch.is_tensor(value) else loaded == value


INCOMPLETE = [("adamw", "exp_avg"), ("adamw", "exp_avg_sq"), ("adamw", "step"), ("sgd-momentum", "momentum_buffer")]


@pytest.mark.parametrize("mode", ["zo", "fo"])
@pytest.mark.parametrize("rule, missing", INCOMPLETE)
def test_incomplete_rule_state_is_refused_naming_group_parameter_and_key(mode, rule, missing):
    opt, params, _ = stepped(mode, rule)
    incomplete = cloned(opt.state_dict())
    entry = incomplete["state"][1]
    if rule == "sgd-momentum":
        entry["step"] = 5  # the entry exists, with another key (e.g. written by another optimizer)
    del entry[missing]
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(incomplete)
    message = str(error.value)
    assert "param group 0, parameter 1" in message and repr(missing) in message, message
    assert_same_snapshot(before, opt, params)


@pytest.mark.parametrize("missing", ["exp_avg", "exp_avg_sq", "step"])
def test_torch_adamw_refuses_the_same_incomplete_state(missing):
    """The independent reference: torch.optim.AdamW cannot step from the entry refused above."""
    weight, bias, data = problem()
    params = [nn.Parameter(weight.clone()), nn.Parameter(bias.clone())]
    reference = RULES["adamw"][1](params)
    loss_of(params, data).backward()
    reference.step()
    incomplete = cloned(reference.state_dict())
    del incomplete["state"][1][missing]
    with pytest.raises(KeyError, match=missing):  # when loading (no step) or at the next step
        reference.load_state_dict(incomplete)
        reference.step()


@pytest.mark.parametrize("mode", ["zo", "fo"])
@pytest.mark.parametrize("rule", list(RULES))
def test_an_entry_absent_as_a_whole_is_a_fresh_start(mode, rule):
    opt, params, data = stepped(mode, rule)
    saved = cloned(opt.state_dict())
    del saved["state"][1]  # the bias starts afresh, as torch.optim does with a missing entry
    fresh_bias = [nn.Parameter(params[0].detach().clone()), nn.Parameter(params[1].detach().clone())]
    resumed = HybridZOOptimizer([{"params": fresh_bias, "mode": mode, **RULES[rule][0]}], lr=0.1, seed=3)
    resumed.load_state_dict(cloned(saved))  # loading shares the tensors, which the step then updates
    assert set(resumed.state) == {fresh_bias[0]}
    resumed.step(lambda: loss_of(fresh_bias, data))
    assert set(resumed.state[fresh_bias[1]]) == set(opt.state[params[1]])
    if mode == "fo":  # against torch.optim loaded with the same state
        reference_params = [nn.Parameter(p.detach().clone()) for p in params]
        reference = RULES[rule][1](reference_params)
        reference_saved = reference.state_dict()
        reference_saved["state"] = {0: cloned(saved["state"][0])}
        reference.load_state_dict(reference_saved)
        loss_of(reference_params, data).backward()
        reference.step()
        for p, q in zip(fresh_bias, reference_params):
            assert torch.equal(p, q)


# ------------------------------------------------------------------------ item 6: numpy strings

STRING_OPTIONS = {"mode": "zo", "sign": "coordinate", "estimator": "forward", "rule": "adamw", "restore": "inplace",
                  "distribution": "rademacher"}
NUMPY_STRINGS = {key: np.str_(value) for key, value in STRING_OPTIONS.items()}


def assert_plain_strings(group):
    for key, value in STRING_OPTIONS.items():
        assert type(group[key]) is str and group[key] == value, f"{key}: {type(group[key]).__name__}"


def survives_weights_only_load(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["param_groups"] == opt.state_dict()["param_groups"]


@pytest.mark.parametrize("entry", ["constructor", "group", "add_param_group", "load_state_dict", "step"])
def test_numpy_strings_are_stored_as_str_and_the_state_dict_loads_with_weights_only(entry):
    first, second = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    plain = {**STRING_OPTIONS, "seed": 0}
    if entry == "constructor":
        opt = HybridZOOptimizer([first], **NUMPY_STRINGS, seed=0)
        opt.add_param_group({"params": [second]})  # inherits the defaults
    elif entry == "group":
        opt = HybridZOOptimizer([{"params": [first], **NUMPY_STRINGS}, {"params": [second]}], **plain)
    elif entry == "add_param_group":
        opt = HybridZOOptimizer([first], **plain)
        opt.add_param_group({"params": [second], **NUMPY_STRINGS})
    elif entry == "load_state_dict":
        opt = HybridZOOptimizer([first, second], **plain)
        saved = cloned(opt.state_dict())
        saved["param_groups"][0].update(NUMPY_STRINGS)
        opt.load_state_dict(saved)
    else:  # written between steps, as a sweep or scheduler might
        opt = HybridZOOptimizer([first, second], **plain)
        opt.param_groups[0].update(NUMPY_STRINGS)
    opt.step(lambda: (first**2).sum() + (second**2).sum())
    for group in opt.param_groups:
        assert_plain_strings(group)
    assert_plain_strings(opt.defaults)
    survives_weights_only_load(opt)


# ------------------------------------------------------------- item 7: a state tensor on the wrong device


@pytest.mark.parametrize("mode", ["zo", "fo"])
@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_a_meta_state_tensor_is_refused_naming_group_parameter_and_key(mode, key):
    opt, params, _ = stepped(mode, "adamw")
    saved = cloned(opt.state_dict())
    saved["state"][1][key] = torch.empty(saved["state"][1][key].shape, device="meta")
    before = snapshot(opt, params)
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(saved)
    message = str(error.value)
    assert "param group 0, parameter 1" in message and repr(key) in message and "meta" in message, message
    assert_same_snapshot(before, opt, params)
