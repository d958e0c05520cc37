"""A step's commit cannot fail midway: what can fail fails before the first write, interrupts wait for its end.

* A failure before the commit (a closure call, a check of gradients or state) leaves parameters,
  gradients, state and counters as they were; a NaN loss leaves parameters and state, counts the
  skipped step, and leaves the FO gradients of that loss in ``.grad``.
* A Ctrl-C (SIGINT) at any point of the commit is raised when the commit is over: the parameters and
  state then equal an uninterrupted step's bit for bit. The interrupt is raised at every aten operation
  the commit dispatches, in turn.
* A Ctrl-C while the FO pass takes ZO parameters out of autograd, or puts them back, leaves every one
  with ``requires_grad=True``.
"""

import copy
import signal
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from hybridzo import HybridZOOptimizer
from hybridzo.first_order import FirstOrderStep
from hybridzo.zo_step import ZOStep
from test_reliability import assert_same_tree, assert_unchanged, capture, clone_tree, distinct_grads, loss_fn, mlp


class InterruptAtOperation(TorchDispatchMode):
    """Raise SIGINT at the ``at``-th aten operation dispatched while active (counted in ``seen``)."""

    def __init__(self, seen, at):
        super().__init__()
        self.seen, self.at = seen, at

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        if len(self.seen) == self.at:
            signal.raise_signal(signal.SIGINT)
        return func(*args, **(kwargs or {}))


def interrupt_commit_at(monkeypatch, at):
    """Make the ``at``-th operation of the step's commit (ZO and FO parts) raise SIGINT."""
    seen = []
    for owner in (ZOStep, FirstOrderStep):
        original = owner.commit

        def commit(self, *args, _original=original, **kwargs):
            with InterruptAtOperation(seen, at):
                return _original(self, *args, **kwargs)

        monkeypatch.setattr(owner, "commit", commit)
    return seen


def mixed_optimizer(model, zo, fo, restore):
    hidden, head = [*model[0].parameters(), *model[2].parameters()], list(model[4].parameters())
    groups = [{"params": hidden + (head if fo is None else []), "mode": "zo", "restore": restore, **zo}]
    if fo is not None:
        groups.append({"params": head, "mode": "fo", **fo})
    return HybridZOOptimizer(groups, lr=0.05, seed=0)


def twins(zo, fo, restore, steps_before):
    """Two identical models and optimizers that took ``steps_before`` steps (1: state exists)."""
    model = mlp(sizes=(6, 8, 8, 1))
    opt = mixed_optimizer(model, zo, fo, restore)
    for _ in range(steps_before):
        opt.step(loss_fn(model))
    twin_model = copy.deepcopy(model)
    twin = mixed_optimizer(twin_model, zo, fo, restore)
    twin.load_state_dict(clone_tree(opt.state_dict()))
    return (model, opt), (twin_model, twin)


def interrupted_step_equals_an_uninterrupted_one(monkeypatch, zo, fo, restore, at, steps_before=1):
    """Interrupt the commit at operation ``at``; False when the commit has fewer operations."""
    (model, opt), (twin_model, twin) = twins(zo, fo, restore, steps_before)
    twin.step(loss_fn(twin_model))
    with monkeypatch.context() as patch:
        seen = interrupt_commit_at(patch, at)
        try:
            opt.step(loss_fn(model))
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
    assert interrupted == (len(seen) >= at), (len(seen), at)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    assert_same_tree(opt.state_dict(), twin.state_dict())
    return interrupted


ZO_OPTIONS = st.fixed_dictionaries({
    "estimator": st.sampled_from(["central", "forward"]),
    "candidates": st.integers(1, 2),
    "conservative": st.booleans(),
    "rule": st.sampled_from(["sgd", "adamw"]),
    "momentum": st.sampled_from([0.0, 0.9]),
    "sign": st.sampled_from([None, "coordinate"]),
})
FO_OPTIONS = st.one_of(st.none(), st.fixed_dictionaries({
    "rule": st.sampled_from(["sgd", "adamw"]),
    "momentum": st.sampled_from([0.0, 0.9]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "foreach": st.sampled_from([None, True, False]),
}))


@settings(max_examples=30, deadline=None)
@given(zo=ZO_OPTIONS, fo=FO_OPTIONS, restore=st.sampled_from(["exact", "inplace"]), at=st.integers(1, 80),
       steps_before=st.integers(0, 1))
def test_property_interrupt_during_the_commit_takes_effect_after_a_complete_step(zo, fo, restore, at,
                                                                                 steps_before):
    with pytest.MonkeyPatch.context() as patch:
        interrupted_step_equals_an_uninterrupted_one(patch, zo, fo, restore, at, steps_before)


@pytest.mark.parametrize("fo", [dict(rule="adamw", weight_decay=0.1), dict(rule="sgd", momentum=0.9, fused=True)],
                         ids=["adamw", "sgd-fused"])
@pytest.mark.parametrize("steps_before", [0, 1], ids=["first-step", "with-state"])
def test_interrupt_at_every_operation_of_a_mixed_commit(monkeypatch, fo, steps_before):
    zo = {"rule": "adamw", "momentum": 0.0, "conservative": True}
    at = 1
    while interrupted_step_equals_an_uninterrupted_one(monkeypatch, zo, fo, "exact", at, steps_before):
        at += 1
    assert at > 10  # the commit's operations were each an interruption point


@pytest.mark.parametrize("implementation", [dict(foreach=False), dict(foreach=True), dict(fused=True)])
def test_interrupt_at_every_operation_of_a_closure_free_fo_step(monkeypatch, implementation):
    def setup():
        model = mlp(sizes=(6, 8, 8, 1))
        opt = HybridZOOptimizer(model.parameters(), mode="fo", rule="adamw", lr=0.05, seed=0, **implementation)
        loss_fn(model)().backward()
        return model, opt

    at, interrupted = 1, True
    while interrupted:
        (model, opt), (twin_model, twin) = setup(), setup()
        twin.step()
        with monkeypatch.context() as patch:
            seen = interrupt_commit_at(patch, at)
            try:
                opt.step()
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
        assert interrupted == (len(seen) >= at)
        for p, q in zip(model.parameters(), twin_model.parameters()):
            assert torch.equal(p, q)
        assert_same_tree(opt.state_dict(), twin.state_dict())
        at += 1
    assert at > 2  # the fused step is two operations (steps, then one kernel), the others many


# ------------------------------------------------------- failures before the first write


@pytest.mark.parametrize("restore", ["exact", "inplace"])
def test_fo_state_unlike_its_parameter_fails_after_the_search_and_changes_nothing(restore):
    """The FO commit's checks run after the ZO probes: the step still leaves everything as it was."""
    model = mlp(sizes=(6, 8, 8, 1))
    opt = mixed_optimizer(model, {"rule": "adamw", "conservative": True}, {"rule": "adamw"}, restore)
    closure = loss_fn(model)
    opt.step(closure)
    opt.state[model[4].bias]["exp_avg"] = opt.state[model[4].bias]["exp_avg"].double()
    params = list(model.parameters())
    distinct_grads(params)
    before = capture(opt, params)
    with pytest.raises(ValueError, match=r"Invalid state in param group 1, parameter 1: state 'exp_avg'"):
        opt.step(closure)
    assert_unchanged(before, opt, params, param_rtol=0.0 if restore == "exact" else 1e-6)


@pytest.mark.parametrize("fo", [None, {"rule": "adamw", "momentum": 0.0}])
def test_nan_loss_leaves_parameters_and_state_and_counts_the_skipped_step(fo):
    model = mlp(sizes=(6, 8, 8, 1))
    opt = mixed_optimizer(model, {"rule": "sgd", "momentum": 0.9}, fo, "exact")
    good = loss_fn(model)
    opt.step(good)
    calls = []

    def nan_on_the_last_call():
        calls.append(1)
        loss = good()
        return loss * float("nan") if len(calls) == opt.last_step_info["forwards"] else loss

    params = list(model.parameters())
    distinct_grads(params)
    before = capture(opt, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(nan_on_the_last_call)
    assert opt.last_step_info["skipped"]
    for group, saved in zip(opt.param_groups, before["state"]["param_groups"]):
        assert (group["steps"], group["nonfinite_steps"]) == (saved["steps"] + 1, saved["nonfinite_steps"] + 1)
        group["steps"], group["nonfinite_steps"] = saved["steps"], saved["nonfinite_steps"]
    for p, saved in zip(params, before["params"]):
        torch.testing.assert_close(p.detach(), saved, rtol=0, atol=0)
    assert_same_tree(opt.state_dict(), before["state"])  # FO gradients are the NaN loss's, to inspect


# ------------------------------------------------- requires_grad switches of the FO pass


def test_interrupt_at_each_requires_grad_switch_leaves_zo_parameters_in_autograd(monkeypatch):
    model = mlp(sizes=(6, 8, 8, 1))
    opt = mixed_optimizer(model, {"momentum": 0.9}, {"rule": "adamw"}, "exact")
    closure = loss_fn(model)
    opt.step(closure)
    params = list(model.parameters())
    zo_params = [p for p in opt.param_groups[0]["params"]]
    original = torch.Tensor.requires_grad_
    at, switches = 1, 2 * len(zo_params)
    while at <= switches:
        calls = []

        def switch(self, requires_grad=True):
            calls.append(requires_grad)
            if len(calls) == at:
                signal.raise_signal(signal.SIGINT)
            return original(self, requires_grad)

        distinct_grads(params)
        before = capture(opt, params)
        monkeypatch.setattr(torch.Tensor, "requires_grad_", switch)
        try:
            with pytest.raises(KeyboardInterrupt):
                opt.step(closure)
        finally:
            monkeypatch.setattr(torch.Tensor, "requires_grad_", original)
        assert all(p.requires_grad for p in zo_params), f"interrupt at switch {at}"
        assert_unchanged(before, opt, params)
        at += 1
    assert switches == 8
