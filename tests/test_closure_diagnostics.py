"""What a closure that cannot train gets told (issue 20, item 5): a float loss for FO groups, a loss the ZO
parameters never reach."""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from hybridzo import HybridZOOptimizer


def test_fo_closure_returning_a_python_float_is_told_to_return_the_loss_tensor():
    theta = nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([theta], mode="fo", lr=0.1, seed=0)
    with pytest.raises(TypeError, match=r"returned a float \(3\.0\).*return the loss tensor.*loss\.item\(\)") as error:
        opt.step(lambda: (theta**2).sum().item())
    assert "no_grad" not in str(error.value)
    assert torch.equal(theta.detach(), torch.ones(3)) and opt.param_groups[0]["steps"] == 0


def linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    return model, x, y


@pytest.mark.parametrize("options", [{}, {"estimator": "forward"}, {"conservative": True, "candidates": 2}],
                         ids=["central", "forward", "conservative-candidates"])
def test_a_loss_computed_outside_the_closure_warns_once_after_three_steps(options):
    model, x, y = linear_problem()
    opt = HybridZOOptimizer(model.parameters(), lr=0.01, seed=0, **options)
    loss = nn.functional.mse_loss(model(x), y)  # the mistake: the forward is not inside the closure
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing during the first two steps
        for _ in range(2):
            opt.step(lambda: loss)
    with pytest.warns(UserWarning, match="does not depend on the ZO parameters: compute the forward inside") as caught:
        for _ in range(5):
            opt.step(lambda: loss)
    assert len([w for w in caught if "does not depend" in str(w.message)]) == 1  # once
    assert caught[0].filename == __file__  # points at the caller's step()


def test_a_mixed_optimizer_whose_zo_parameters_do_not_reach_the_loss_warns():
    model, x, y = linear_problem()
    head = nn.Linear(4, 1)
    opt = HybridZOOptimizer([{"params": model.parameters()}, {"params": head.parameters(), "mode": "fo"}],
                            lr=0.01, seed=0)
    with pytest.warns(UserWarning, match="does not depend on the ZO parameters"):
        for _ in range(3):
            opt.step(lambda: nn.functional.mse_loss(head(x), y))  # the ZO model is never called


def test_a_loss_flat_for_fewer_than_three_consecutive_steps_does_not_warn():
    model, x, y = linear_problem()
    opt = HybridZOOptimizer(model.parameters(), lr=0.01, seed=0)
    flat = torch.tensor(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(12):  # flat at two steps of every three: never three in a row
            opt.step(lambda: flat if step % 3 else nn.functional.mse_loss(model(x), y))


def test_the_detector_is_not_optimizer_state():
    model, x, y = linear_problem()
    opt = HybridZOOptimizer(model.parameters(), lr=0.01, seed=0)
    loss = nn.functional.mse_loss(model(x), y)
    for _ in range(2):
        opt.step(lambda: loss)
    fresh = HybridZOOptimizer(model.parameters(), lr=0.01, seed=0)
    saved = opt.state_dict()
    assert saved["state"] == fresh.state_dict()["state"] == {}
    assert set(saved["param_groups"][0]) == set(fresh.state_dict()["param_groups"][0])
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a copy starts counting afresh
            copied.step(lambda: loss)
