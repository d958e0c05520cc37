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


# ------------------------------------------------- a reused check against a full check, after any edit

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hybridzo.first_order import FirstOrderChecks  # noqa: E402

EDITS = ["new grads", "same grads", "drop a grad", "replace an entry", "replace a buffer", "pop an entry",
         "buffer to float64", "grad to float64", "sparse grad", "resize through data", "cast through data",
         "momentum", "momentum 0", "lr", "implementation", "leave the group", "rejoin the group"]


class Run:
    """One optimizer over its own copy of the tensors; ``warm`` keeps its checks between steps, a cold one
    forgets them before every step, so that each of its steps runs the full check."""

    def __init__(self, rule, implementation, values, warm):
        self.params = [torch.nn.Parameter(v.clone()) for v in values]
        self.warm = warm
        self.opt = HybridZOOptimizer([{"params": list(self.params), "mode": "fo", "rule": rule, "momentum": 0.9,
                                       **implementation}], lr=0.1)

    def step(self):
        if not self.warm:
            self.opt._fo_checked = FirstOrderChecks()
        try:
            self.opt.step()
        except (ValueError, RuntimeError) as error:
            return f"{type(error).__name__}: {error}"
        return None

    def edit(self, edit, i, g_values):
        p, group, state = self.params[i], self.opt.param_groups[0], self.opt.state
        entry = state.get(p)
        if edit == "new grads":
            for q, v in zip(self.params, g_values):
                q.grad = v.to(q.dtype).reshape(q.shape) if v.numel() == q.numel() else torch.ones_like(q)
        elif edit == "drop a grad":
            p.grad = None
        elif edit == "replace an entry" and entry:
            state[p] = {k: v.clone() for k, v in entry.items()}
        elif edit == "replace a buffer" and entry:
            name = sorted(k for k in entry if k != "step")[0]
            entry[name] = entry[name].clone()
        elif edit == "pop an entry":
            state.pop(p, None)
        elif edit == "buffer to float64" and entry:
            name = sorted(k for k in entry if k != "step")[0]
            entry[name] = entry[name].double()
        elif edit == "grad to float64" and p.grad is not None:
            p.grad_dtype = None  # torch refuses such gradients unless told to accept them
            p.grad = p.grad.double()
        elif edit == "sparse grad" and p.grad is not None and p.dim() == 1:
            p.grad = p.grad.to_sparse()
        elif edit == "resize through data":
            p.data = torch.ones(p.numel() + 1)
            p.grad = torch.ones(p.numel())
        elif edit == "cast through data":
            p.data = p.data.double()
            p.grad = torch.ones_like(p)
        elif edit == "momentum":
            group["momentum"] = 0.5
        elif edit == "momentum 0":
            group["momentum"] = 0.0
        elif edit == "lr":
            group["lr"] = 0.05
        elif edit == "implementation":
            group["foreach"], group["fused"] = (None, True) if not group["fused"] else (True, None)
        elif edit == "leave the group" and any(q is p for q in group["params"]):
            group["params"] = [q for q in group["params"] if q is not p]
        elif edit == "rejoin the group" and all(q is not p for q in group["params"]):
            group["params"] = group["params"] + [p]

    def snapshot(self):
        state = {i: {k: v.clone() for k, v in self.opt.state[p].items()} for i, p in enumerate(self.params)
                 if p in self.opt.state}
        return [p.detach().clone() for p in self.params], state


@settings(max_examples=60, deadline=None)
@given(
    rule=st.sampled_from(["sgd", "adamw"]),
    implementation=st.sampled_from([{"foreach": False}, {"foreach": True}, {"fused": True}]),
    shapes=st.lists(st.sampled_from([(3,), (2, 3), (4,)]), min_size=1, max_size=4),
    edits=st.lists(st.tuples(st.sampled_from(EDITS), st.integers(0, 3)), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_a_reused_check_steps_and_refuses_exactly_as_a_full_check(rule, implementation, shapes, edits, seed):
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(shape, generator=g) for shape in shapes]
    warm, cold = Run(rule, implementation, values, True), Run(rule, implementation, values, False)
    for run in (warm, cold):
        run.edit("new grads", 0, values)
    for _ in range(2):  # the warm optimizer's check is cached from here on
        assert warm.step() is cold.step() is None
    for edit, i in edits:
        grads = [torch.randn(shape, generator=g) for shape in shapes]
        for run in (warm, cold):
            run.edit(edit, i % len(shapes), grads)
        outcome = warm.step()
        assert outcome == cold.step()
        (warm_params, warm_state), (cold_params, cold_state) = warm.snapshot(), cold.snapshot()
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(warm_params, cold_params))
        assert warm_state.keys() == cold_state.keys()
        for i in warm_state:
            assert warm_state[i].keys() == cold_state[i].keys()
            assert all(torch.equal(warm_state[i][k], cold_state[i][k]) for k in warm_state[i])
