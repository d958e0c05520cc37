"""What the FO step remembers between steps never outlives or misdescribes the parameters it checked.

The FO commit checks gradients and state once per parameter and skips the checks while the same
objects come back. A parameter changed in place through ``.data`` (or ``module.to``) is a new
tensor behind the same Parameter, and a parameter that leaves the groups must not be kept alive.
"""

import gc
import signal
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hybridzo import HybridZOOptimizer

IMPLEMENTATIONS = [{"foreach": False}, {"foreach": True}, {"fused": True}]


@pytest.mark.parametrize("rule", ["adamw", "sgd"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS, ids=["for-loop", "foreach", "fused"])
def test_a_parameter_resized_through_data_is_checked_again(rule, implementation):
    b = torch.nn.Parameter(torch.ones(2))
    opt = HybridZOOptimizer([{"params": [b], "mode": "fo", "rule": rule, "momentum": 0.9, **implementation}], lr=0.1)
    for _ in range(2):
        b.grad = torch.ones(2)
        opt.step()
    state_before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[b].items()}
    b.data = torch.ones(6)
    b.grad = torch.ones(6)
    with pytest.raises(ValueError, match="param group 0, parameter 0: state"):
        opt.step()
    # Refused before anything was written: the parameter, its state and the counter are as they were.
    assert torch.equal(b.detach(), torch.ones(6))
    for key, value in state_before.items():
        assert torch.equal(torch.as_tensor(opt.state[b][key]), torch.as_tensor(value))
    assert opt.param_groups[0]["steps"] == 2


def test_a_parameter_cast_by_module_to_gets_the_message_an_uncached_step_gives():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = HybridZOOptimizer([{"params": model.parameters(), "mode": "fo", "rule": "adamw"}], lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    model.to(torch.float64)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError, match=r"state 'exp_avg' is .*float32.*the parameter .*float64"):
        opt.step()


def test_parameters_that_leave_the_groups_are_not_kept_alive():
    keep = torch.nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([{"params": [keep], "mode": "fo", "rule": "adamw"}], lr=0.1)
    gone = []
    for _ in range(3):  # a new head per task, the old one dropped with its state
        head = torch.nn.Parameter(torch.ones(1024))
        gone.append(weakref.ref(head))
        opt.param_groups[0]["params"] = [keep, head]
        for _ in range(2):
            keep.grad, head.grad = torch.ones(3), torch.ones(1024)
            opt.step()
        opt.state.pop(head)
        opt.param_groups[0]["params"] = [keep]
        del head
    keep.grad = torch.ones(3)
    opt.step()
    gc.collect()
    assert [ref() is None for ref in gone] == [True, True, True]


def test_both_implementations_written_into_a_zo_group_between_steps_are_refused():
    p = torch.nn.Parameter(torch.ones(4))
    opt = HybridZOOptimizer([{"params": [p], "mode": "zo"}], lr=0.1, seed=0)
    opt.param_groups[0]["foreach"] = True
    opt.param_groups[0]["fused"] = True
    with pytest.raises(ValueError, match=r"Invalid fused in param group 0: True \(fused and foreach"):
        opt.step(lambda: p.sum())


class _CtrlCAtRestore(TorchDispatchMode):
    """A second Ctrl-C at the first copy of the restore that follows a failed probe."""

    armed = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.armed and func is torch.ops.aten._foreach_copy_.default:
            self.armed = False
            signal.raise_signal(signal.SIGINT)
        return func(*args, **(kwargs or {}))


def test_a_second_interrupt_during_the_restore_still_gives_the_gradients_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    x = torch.randn(8, 4)
    opt = HybridZOOptimizer([{"params": model[0].parameters(), "mode": "zo"},
                             {"params": model[1].parameters(), "mode": "fo"}], seed=0)
    params_before = [p.detach().clone() for p in model.parameters()]
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == 2:  # the first Ctrl-C, in a ZO probe
            mode.armed = True
            signal.raise_signal(signal.SIGINT)
        return model(x).pow(2).mean()

    model[1].weight.grad = torch.full_like(model[1].weight, 7.0)
    with _CtrlCAtRestore() as mode:
        with pytest.raises(KeyboardInterrupt):
            opt.step(closure)
    assert torch.equal(model[1].weight.grad, torch.full_like(model[1].weight, 7.0))
    assert model[1].bias.grad is None
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), params_before))


@pytest.mark.parametrize("fo_params", ["empty", "frozen"])
def test_an_fo_group_with_nothing_to_train_is_skipped_as_torch_optim_skips_it(fo_params):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    x = torch.randn(8, 4)
    reference = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    reference.load_state_dict(model.state_dict())
    head = [] if fo_params == "empty" else list(model[1].parameters())
    for p in head:
        p.requires_grad_(False)
    opt = HybridZOOptimizer([{"params": model[0].parameters(), "mode": "zo"},
                             {"params": head, "mode": "fo", "rule": "adamw"}], lr=0.1, seed=0)
    alone = HybridZOOptimizer([{"params": reference[0].parameters(), "mode": "zo"}], lr=0.1, seed=0)
    for _ in range(3):
        loss = opt.step(lambda: model(x).pow(2).mean())
        expected = alone.step(lambda: reference(x).pow(2).mean())
        assert torch.equal(loss, expected)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))
    assert opt.last_step_info["backwards"] == 0
    # An optimizer whose only group has nothing to train still returns the closure's loss, as torch.optim does.
    frozen_only = HybridZOOptimizer([{"params": [torch.nn.Parameter(torch.ones(2), requires_grad=False)],
                                      "mode": "fo"}], lr=0.1)
    assert frozen_only.step(lambda: torch.tensor(2.5)).item() == 2.5
