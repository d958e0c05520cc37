"""A failure at any write of a ZO step (probe, trial move, its undo, the commit) leaves the parameters at theta.

Exact restore returns bit for bit; in-place groups return up to the documented rounding (a few ulps per undo),
never by a step. The failure is injected by a dispatch mode at the n-th operation that writes a tensor (outside
the closure), for every n the step has, as a RuntimeError or a KeyboardInterrupt raised there.
"""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hybridzo import HybridZOOptimizer


class Injected(RuntimeError):
    pass


class FailAtWrite(TorchDispatchMode):
    """Raise ``error`` at the ``at``-th tensor write (an in-place or ``out=`` operation) while not paused,
    or at the ``at``-th operation named in ``names`` if given."""

    def __init__(self, at, error, names=None):
        super().__init__()
        self.at, self.error, self.names = at, error, names
        self.writes, self.paused, self.raised = 0, False, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.names is not None:
            counted = func.overloadpacket.__name__ in self.names
        else:
            counted = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if counted and not self.paused and not self.raised:
            self.writes += 1
            if self.writes == self.at:
                self.raised = True
                raise self.error(f"write {self.at}: {func}")
        return func(*args, **(kwargs or {}))


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    return model, x, y


def snapshot(opt, params):
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
             for p in params if p in opt.state}
    return [p.detach().clone() for p in params], state, [dict(g) for g in opt.param_groups]


CONFIGS = {
    "adamw-inplace-conservative": {"rule": "adamw", "restore": "inplace", "conservative": True, "weight_decay": 0.1},
    "sgd-momentum-inplace-candidates": {"momentum": 0.9, "weight_decay": 0.1, "restore": "inplace", "candidates": 2},
    "adamw-inplace-forward-queries": {"rule": "adamw", "restore": "inplace", "estimator": "forward", "queries": 2},
    "sgd-inplace-plain": {"restore": "inplace"},
    "adamw-exact-conservative": {"rule": "adamw", "conservative": True, "weight_decay": 0.1},
    "sgd-momentum-exact-candidates": {"momentum": 0.9, "candidates": 2, "sign": "coordinate"},
}


@pytest.mark.parametrize("chunk", [16, 1 << 20])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_failure_at_every_write_of_a_zo_step_leaves_the_parameters_at_theta(monkeypatch, name, chunk):
    monkeypatch.setattr("hybridzo.directions._CHUNK_ELEMENTS", {"cpu": chunk})
    config = CONFIGS[name]
    model, x, y = model_and_data()
    params = list(model.parameters())
    opt = HybridZOOptimizer(params, lr=0.05, seed=0, **config)
    mode = None

    def closure():
        if mode is not None:
            mode.paused = True
        try:
            return nn.functional.mse_loss(model(x), y)
        finally:
            if mode is not None:
                mode.paused = False

    opt.step(closure)
    opt.step(closure)  # state exists: moves read it and the commit overwrites it
    tolerance = 0.0 if config.get("restore", "exact") == "exact" else 1e-12
    at, failures = 1, 0
    while True:
        before, state_before, groups_before = snapshot(opt, params)
        mode = FailAtWrite(at, (Injected, KeyboardInterrupt)[at % 2])
        try:
            with mode:
                opt.step(closure)
        except (Injected, KeyboardInterrupt):
            failures += 1
        else:
            break
        finally:
            mode = None
        for p, b in zip(params, before):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=tolerance, msg=lambda m: f"write {at}: {m}")
        after_state = snapshot(opt, params)[1]
        assert after_state.keys() == state_before.keys()
        for key, entry in state_before.items():
            for k, v in entry.items():
                assert torch.equal(after_state[key][k], v) if torch.is_tensor(v) else after_state[key][k] == v
        assert [g["steps"] for g in opt.param_groups] == [g["steps"] for g in groups_before]
        at += 1
    assert failures > 5  # the step had many writes, and each was a failure point


def test_keyboard_interrupt_at_the_first_division_of_an_inplace_adamw_trial_move():
    """The case the reliability attack found: AdamW, restore='inplace', conservative, Ctrl-C in a trial move."""
    model, x, y = model_and_data()
    params = list(model.parameters())
    opt = HybridZOOptimizer(params, lr=0.05, rule="adamw", restore="inplace", conservative=True, weight_decay=0.1,
                            seed=0)
    closure = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    opt.step(closure)
    before = [p.detach().clone() for p in params]
    for at in (1, 2):  # the in-place divisions: the undo of the first trial move, then the commit's
        with pytest.raises(KeyboardInterrupt):
            with FailAtWrite(at, KeyboardInterrupt, names={"div_"}):
                opt.step(closure)
        for p, b in zip(params, before):
            torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-12)
