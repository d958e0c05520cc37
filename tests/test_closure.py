"""Closure handling: common random numbers, torch-style closures, the constructor closure."""

import copy

import pytest
import torch
from torch import nn

from hybridzo import HybridZOOptimizer


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 1)
        self.masks = []

    def forward(self, x):
        h = torch.relu(self.body(x)) + 1.0  # strictly positive, so the dropout mask is visible
        dropped = self.drop(h)
        self.masks.append(dropped == 0)
        return self.head(dropped)


def groups_of(net, **zo):
    return [{"params": net.body.parameters(), "mode": "zo", **zo}, {"params": net.head.parameters(), "mode": "fo"}]


@pytest.mark.parametrize("config", [dict(), dict(conservative=True), dict(candidates=2, queries=2)])
def test_all_calls_in_a_step_see_the_same_dropout_mask(config):
    net = DropoutNet()
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = HybridZOOptimizer(groups_of(net, **config), lr=1e-2, seed=0)
    first_masks = []
    for _ in range(3):
        net.masks.clear()
        opt.step(lambda: nn.functional.mse_loss(net(x), y))
        assert len(net.masks) == opt.last_step_info["forwards"] > 1
        assert all(torch.equal(m, net.masks[0]) for m in net.masks)
        first_masks.append(net.masks[0])
    assert not torch.equal(first_masks[0], first_masks[1])  # a new mask every step
    assert net.training


def test_rng_is_left_as_after_one_closure_call():
    net = DropoutNet()
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = HybridZOOptimizer(groups_of(net, conservative=True), lr=1e-2, seed=0)
    start = torch.get_rng_state()
    opt.step(lambda: nn.functional.mse_loss(net(x), y))
    after_step = torch.rand(4)
    torch.set_rng_state(start)
    net(x)  # one closure's worth of random draws
    assert torch.equal(after_step, torch.rand(4))


def test_perturbations_do_not_touch_the_global_rng():
    theta = nn.Parameter(torch.randn(100))
    opt = HybridZOOptimizer([theta], lr=1e-3, seed=0, queries=3)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    opt.step(lambda: (theta**2).sum())  # a closure with no random draws
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("training", [True, False])
def test_model_training_flag_is_unchanged(training):
    net = DropoutNet().train(training)
    x, y = torch.randn(8, 6), torch.randn(8, 1)
    seen = []

    def closure():
        seen.append(net.training)
        return nn.functional.mse_loss(net(x), y)

    HybridZOOptimizer(groups_of(net, conservative=True), lr=1e-2, seed=0).step(closure)
    assert net.training is training and set(seen) == {training}


@pytest.mark.parametrize("config", [dict(), dict(conservative=True), dict(estimator="forward", rule="adamw")])
def test_torch_style_closure_matches_documented_closure(config):
    """A closure that calls zero_grad() and backward() itself gives the same trajectory."""
    nets = [DropoutNet(), DropoutNet()]
    opts = [HybridZOOptimizer(groups_of(net, **config), lr=1e-2, seed=3) for net in nets]
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    backward_calls = []

    def documented():
        return nn.functional.mse_loss(nets[0](x), y)

    def torch_style():
        opts[1].zero_grad()
        loss = nn.functional.mse_loss(nets[1](x), y)
        loss.backward()
        backward_calls.append(torch.is_grad_enabled())
        return loss

    for _ in range(5):
        torch.manual_seed(7)
        a = opts[0].step(documented)
        torch.manual_seed(7)
        b = opts[1].step(torch_style)
        assert a.item() == b.item()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)
    for p in nets[1].body.parameters():
        assert p.grad is None
    assert backward_calls.count(True) == 5  # only the FO passes ran with autograd


def test_closure_given_to_the_constructor():
    theta = nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([theta], closure=lambda: (theta**2).sum(), lr=0.1, seed=0, conservative=True)
    loss = opt.step()
    assert loss.item() == 3.0  # the loss at the unperturbed parameters
    assert (theta**2).sum().item() < 3.0
    # a closure passed to step() takes precedence
    loss = opt.step(lambda: (theta**2).sum() * 0 + 42.0)
    assert loss.item() == 42.0


def test_deepcopy_drops_the_constructor_closure():
    theta = nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([theta], closure=lambda: (theta**2).sum(), lr=0.1, seed=0)
    clone = copy.deepcopy(opt)
    with pytest.raises(ValueError, match="closure"):
        clone.step()


def test_autocast_around_step_sees_fresh_weights():
    """autocast caches low-precision weight copies until its region exits; probes must not see stale ones."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = HybridZOOptimizer(
        [{"params": net[0].parameters(), "mode": "zo"}, {"params": net[2].parameters(), "mode": "fo"}], lr=1e-2, seed=0
    )
    x = torch.randn(64, 8)
    y = x.sum(1, keepdim=True)
    seen = []

    def closure():
        loss = nn.functional.mse_loss(net(x).float(), y)
        seen.append(float(loss.detach()))
        return loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [float(opt.step(closure)) for _ in range(10)]
    assert seen[1] != seen[2]  # the +eps and -eps probes saw different weights
    assert losses[-1] < losses[0]


def test_grad_scaler_gets_a_clear_error():
    theta = nn.Parameter(torch.ones(3))
    opt = HybridZOOptimizer([theta], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((theta**2).sum()).backward()
    with pytest.raises(ValueError, match="GradScaler"):
        scaler.step(opt)
