"""Bad input: clear errors naming the group and the key, nothing changed on failure."""

import pytest
import torch
from torch import nn

from hybridzo import HybridZOOptimizer

BAD_VALUES = [
    ("mode", "bo"),
    ("sign", "elementwise"),
    ("eps", 0.0),
    ("eps", -1e-3),
    ("lr", -0.1),
    ("lr", float("nan")),
    ("queries", 0),
    ("queries", 1.5),
    ("candidates", 0),
    ("estimator", "backward"),
    ("conservative", "yes"),
    ("rule", "adam"),
    ("momentum", -0.5),
    ("betas", (0.9, 1.0)),
    ("adam_eps", -1.0),
    ("weight_decay", -1.0),
    ("restore", "copy"),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.5),
]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_constructor_rejects_bad_defaults(key, value):
    with pytest.raises(ValueError, match=rf"Invalid {key} in defaults"):
        HybridZOOptimizer([nn.Parameter(torch.zeros(2))], **{key: value})


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_groups_are_validated_in_the_constructor_and_add_param_group(key, value):
    good, bad = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=rf"Invalid {key} in param group 1"):
        HybridZOOptimizer([{"params": [good]}, {"params": [bad], key: value}])
    opt = HybridZOOptimizer([good])
    with pytest.raises(ValueError, match=rf"Invalid {key} in param group 1"):
        opt.add_param_group({"params": [bad], key: value})
    assert len(opt.param_groups) == 1  # nothing half-added


@pytest.mark.parametrize("key, value", BAD_VALUES)
@pytest.mark.parametrize("mode", ["zo", "fo"])
def test_every_key_written_between_steps_is_validated_again(mode, key, value):
    """A step skips the checks of hyperparameters it validated before only while they are the same objects."""
    w = nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([{"params": [w], "mode": mode}], lr=0.1, seed=0)
    for _ in range(2):  # the second step reuses the first one's validation
        opt.step(lambda: w.pow(2).sum())
    before, steps = w.detach().clone(), opt.param_groups[0]["steps"]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"Invalid {key} in param group 0"):
        opt.step(lambda: w.pow(2).sum())
    assert torch.equal(w.detach(), before) and opt.param_groups[0]["steps"] == steps


def test_a_list_written_as_betas_is_validated_as_a_tuple_and_later_edits_to_it_do_not_reach_the_group():
    w = nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([{"params": [w], "mode": "fo", "rule": "adamw"}], lr=0.1)
    betas = [0.8, 0.9]
    opt.param_groups[0]["betas"] = betas
    opt.step(lambda: w.pow(2).sum())
    betas[0] = 5.0  # the group holds the validated tuple, not this list
    opt.step(lambda: w.pow(2).sum())
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_unknown_group_key_is_named():
    with pytest.raises(ValueError, match=r"Invalid key\(s\) in param group 0: \['epsilon'\]"):
        HybridZOOptimizer([{"params": [nn.Parameter(torch.zeros(2))], "epsilon": 1e-3}])


def test_zo_groups_must_share_step_wide_settings():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"Invalid queries in param group 1: 2 .*param group 0 uses 1"):
        HybridZOOptimizer([{"params": [a]}, {"params": [b], "queries": 2}])
    # an FO group may differ: the setting does not apply to it
    HybridZOOptimizer([{"params": [a]}, {"params": [b], "queries": 2, "mode": "fo"}])
    # changing a group after construction is caught at step time
    opt = HybridZOOptimizer([{"params": [a]}, {"params": [b]}])
    opt.param_groups[1]["candidates"] = 3
    with pytest.raises(ValueError, match="Invalid candidates in param group"):
        opt.step(lambda: (a**2).sum() + (b**2).sum())


def test_zo_group_needs_floating_point_tensors():
    with pytest.raises(TypeError, match=r"Invalid params in param group 0.*int64"):
        HybridZOOptimizer([torch.zeros(2, dtype=torch.int64)])


def test_adamw_eps_that_underflows_in_the_parameter_dtype():
    half = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"Invalid adam_eps in param group 0: 1e-08 .*float16"):
        HybridZOOptimizer([half], rule="adamw")
    HybridZOOptimizer([half], rule="adamw", adam_eps=1e-6)
    HybridZOOptimizer([half], rule="sgd")  # SGD has no denominator
    HybridZOOptimizer([nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], rule="adamw")


def test_zo_group_without_closure():
    opt = HybridZOOptimizer([{"params": [nn.Parameter(torch.zeros(2))]}, {"params": [nn.Parameter(torch.zeros(2))], "mode": "fo"}])
    with pytest.raises(ValueError, match=r"Invalid closure: None \(param groups \[0\] are ZO groups"):
        opt.step()


def test_closure_must_be_callable():
    with pytest.raises(TypeError, match="Invalid closure"):
        HybridZOOptimizer([nn.Parameter(torch.zeros(2))], closure=3)


@pytest.mark.parametrize("mode", ["zo", "fo"])
@pytest.mark.parametrize(
    "returned, error, message",
    [(None, TypeError, "returned None"), (torch.ones(3), ValueError, r"shape \(3,\)"), ("1.0", TypeError, "str")],
)
def test_bad_closure_return_values_leave_parameters_unchanged(mode, returned, error, message):
    theta = nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([theta], mode=mode, lr=0.1, seed=0)
    with pytest.raises(error, match=message):
        opt.step(lambda: returned)
    assert torch.equal(theta.detach(), torch.ones(3))
    assert opt.param_groups[0]["steps"] == 0


def test_fo_group_whose_loss_has_no_graph():
    theta = nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([theta], mode="fo", lr=0.1)
    with pytest.raises(ValueError, match="does not require grad"):
        opt.step(lambda: (theta.detach() ** 2).sum())


def test_scalar_loss_as_python_float_is_accepted_for_zo():
    theta = nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([theta], lr=0.1, seed=0, conservative=True)
    loss = opt.step(lambda: float((theta**2).sum()))
    assert loss.item() == 3.0 and (theta**2).sum().item() < 3.0
