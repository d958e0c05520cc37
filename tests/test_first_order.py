"""FO groups against torch.optim.SGD / AdamW, and the FO pass's autograd footprint."""

import copy

import pytest
import torch
from torch import nn

from hybridzo import HybridZOOptimizer


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


@pytest.mark.parametrize(
    "options, reference",
    [
        (dict(rule="sgd"), lambda p: torch.optim.SGD(p, lr=0.05)),
        (dict(rule="sgd", momentum=0.9, weight_decay=1e-2), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2)),
        (dict(rule="adamw"), lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.0)),
        (dict(rule="adamw", betas=(0.8, 0.9), adam_eps=1e-6, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)),
    ],
)
def test_fo_groups_match_torch_optimizers_over_20_steps(options, reference):
    ours, theirs = make_model(), make_model()
    opt = HybridZOOptimizer(ours.parameters(), mode="fo", lr=0.05, **options)
    ref = reference(theirs.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)
        opt.step(lambda: nn.functional.mse_loss(ours(x), y))
        ref.zero_grad()
        nn.functional.mse_loss(theirs(x), y).backward()
        ref.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_fo_only_step_without_closure_uses_existing_grads():
    ours, theirs = make_model(), make_model()
    opt = HybridZOOptimizer(ours.parameters(), mode="fo", rule="sgd", momentum=0.5, lr=0.1)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.5)
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    for model, o in ((ours, opt), (theirs, ref)):
        for _ in range(3):
            o.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            assert o.step() is None
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


def test_mixed_step_fo_gradient_is_taken_at_unperturbed_theta():
    model = make_model()
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    expected_model = copy.deepcopy(model)
    nn.functional.mse_loss(expected_model(x), y).backward()
    opt = HybridZOOptimizer(
        [{"params": model[0].parameters(), "mode": "zo"}, {"params": model[2].parameters(), "mode": "fo"}],
        lr=0.0, seed=0,
    )
    opt.step(lambda: nn.functional.mse_loss(model(x), y))
    for p, q in zip(model[2].parameters(), expected_model[2].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    for p in model[0].parameters():
        assert p.grad is None  # ZO parameters never get a gradient
        assert p.requires_grad  # and their flag is restored after the FO pass


def count_saved_tensors(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return len(saved)


def test_fo_backward_reaches_only_fo_parameters():
    """With ZO on the upstream block, the FO pass saves what a frozen upstream block would."""
    model = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 1))
    x, y = torch.randn(10, 6), torch.randn(10, 1)
    zo_part = list(model[0].parameters()) + list(model[2].parameters())
    saved_in_calls = []

    def closure():
        loss = []
        saved_in_calls.append(count_saved_tensors(lambda: loss.append(nn.functional.mse_loss(model(x), y))))
        return loss[0]

    opt = HybridZOOptimizer(
        [{"params": zo_part, "mode": "zo"}, {"params": model[4].parameters(), "mode": "fo"}], lr=0.0, seed=0
    )
    opt.step(closure)
    # reference: the same forward with the ZO part frozen
    for p in zo_part:
        p.requires_grad_(False)
    frozen_count = count_saved_tensors(lambda: nn.functional.mse_loss(model(x), y))
    for p in zo_part:
        p.requires_grad_(True)
    full_count = count_saved_tensors(lambda: nn.functional.mse_loss(model(x), y))
    assert saved_in_calls[0] == frozen_count < full_count
    assert saved_in_calls[1:] == [0, 0]  # the probes keep no graph at all
