"""Schedulers that cycle momentum (OneCycleLR, CyclicLR): SGD-rule groups as torch.optim.SGD, AdamW-rule as AdamW."""

import copy

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from hybridzo import HybridZOOptimizer

STEPS = 12
SCHEDULERS = {
    # total_steps = STEPS: one whole cycle, warm-up then annealing
    "onecycle": lambda opt: OneCycleLR(opt, max_lr=0.1, total_steps=STEPS, pct_start=0.4, base_momentum=0.8,
                                       max_momentum=0.95, cycle_momentum=True),
    # up for 4 steps, down for 6: one whole cycle and the start of the next
    "cyclic": lambda opt: CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=4, step_size_down=6,
                                   base_momentum=0.8, max_momentum=0.95, cycle_momentum=True),
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)) for _ in range(STEPS)]


def momentum_of(group, rule):
    return group["momentum"] if rule == "sgd" else group["betas"][0]


def assert_params_close(ours, theirs):
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)


RULES = {
    "sgd": (dict(rule="sgd", momentum=0.9, weight_decay=1e-2),
            lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2)),
    "adamw": (dict(rule="adamw", weight_decay=1e-2),
              lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=1e-2)),
}


def follow_torch_over_a_cycle(rule, schedule):
    options, reference = RULES[rule]
    ours, theirs = make_model(), make_model()
    opt = HybridZOOptimizer(ours.parameters(), mode="fo", lr=0.05, **options)
    ref = reference(theirs.parameters())
    schedulers = [SCHEDULERS[schedule](o) for o in (opt, ref)]
    seen = []
    for x, y in batches():
        assert momentum_of(opt.param_groups[0], rule) == momentum_of(ref.param_groups[0], rule)
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        seen.append(momentum_of(ref.param_groups[0], rule))
        opt.step(lambda: nn.functional.mse_loss(ours(x), y))
        ref.zero_grad()
        nn.functional.mse_loss(theirs(x), y).backward()
        ref.step()
        for scheduler in schedulers:
            scheduler.step()
        assert_params_close(ours.parameters(), theirs.parameters())
    assert len(set(seen)) > 3  # the momentum did cycle


@pytest.mark.parametrize("schedule", list(SCHEDULERS))
def test_sgd_rule_groups_follow_torch_sgd_under_momentum_cycling_schedulers(schedule):
    follow_torch_over_a_cycle("sgd", schedule)


@pytest.mark.parametrize("schedule", list(SCHEDULERS))
def test_adamw_rule_groups_still_follow_torch_adamw_under_momentum_cycling_schedulers(schedule):
    follow_torch_over_a_cycle("adamw", schedule)


@pytest.mark.parametrize("schedule", list(SCHEDULERS))
def test_mixed_rules_under_one_scheduler_follow_sgd_and_adamw_group_by_group(schedule):
    """FO SGD-rule and AdamW-rule groups, and a ZO SGD-rule group, under one momentum-cycling scheduler."""
    ours, theirs = make_model(), make_model()
    zo_param = nn.Parameter(torch.ones(3))  # its own term of the loss: FO gradients do not depend on it
    sgd_options, sgd_reference = RULES["sgd"]
    adamw_options, adamw_reference = RULES["adamw"]
    opt = HybridZOOptimizer(
        [
            {"params": ours[0].parameters(), "mode": "fo", **sgd_options},
            {"params": ours[2].parameters(), "mode": "fo", **adamw_options},
            {"params": [zo_param], "mode": "zo", "rule": "sgd", "momentum": 0.9},
        ],
        lr=0.05, seed=0,
    )
    refs = [sgd_reference(theirs[0].parameters()), adamw_reference(theirs[2].parameters())]
    scheduler = SCHEDULERS[schedule](opt)
    ref_schedulers = [SCHEDULERS[schedule](ref) for ref in refs]
    for x, y in batches():
        sgd_group, adamw_group, zo_group = opt.param_groups
        assert sgd_group["momentum"] == refs[0].param_groups[0]["momentum"]
        assert zo_group["momentum"] == refs[0].param_groups[0]["momentum"]
        assert adamw_group["betas"] == refs[1].param_groups[0]["betas"]
        opt.step(lambda: nn.functional.mse_loss(ours(x), y) + ((zo_param - 0.5) ** 2).sum())
        for ref in refs:
            ref.zero_grad()
        nn.functional.mse_loss(theirs(x), y).backward()
        for ref in refs:
            ref.step()
        scheduler.step()
        for ref_scheduler in ref_schedulers:
            ref_scheduler.step()
        assert_params_close(ours[0].parameters(), theirs[0].parameters())
        assert_params_close(ours[2].parameters(), theirs[2].parameters())


def test_state_dict_saved_under_a_momentum_cycling_scheduler_still_resumes_exactly():
    def build(model, zo_param):
        opt = HybridZOOptimizer(
            [
                {"params": model[0].parameters(), "mode": "zo", "momentum": 0.9},
                {"params": model[2].parameters(), "mode": "fo", "rule": "adamw"},
                {"params": [zo_param], "mode": "zo", "rule": "adamw"},
            ],
            lr=0.05, seed=0,
        )
        return opt, SCHEDULERS["onecycle"](opt)

    def closure(model, zo_param, x, y):
        return lambda: nn.functional.mse_loss(model(x), y) + ((zo_param - 0.5) ** 2).sum()

    data = batches()
    model, zo_param = make_model(), nn.Parameter(torch.ones(3))
    opt, scheduler = build(model, zo_param)
    for x, y in data[:4]:
        opt.step(closure(model, zo_param, x, y))
        scheduler.step()
    saved = copy.deepcopy({"model": model.state_dict(), "zo": zo_param.detach().clone(),
                           "opt": opt.state_dict(), "scheduler": scheduler.state_dict()})
    for x, y in data[4:8]:
        opt.step(closure(model, zo_param, x, y))
        scheduler.step()

    resumed_model, resumed_zo = make_model(), nn.Parameter(torch.zeros(3))
    resumed_model.load_state_dict(saved["model"])
    with torch.no_grad():
        resumed_zo.copy_(saved["zo"])
    resumed, resumed_scheduler = build(resumed_model, resumed_zo)
    resumed.load_state_dict(saved["opt"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    for x, y in data[4:8]:
        resumed.step(closure(resumed_model, resumed_zo, x, y))
        resumed_scheduler.step()
    for p, q in zip([*model.parameters(), zo_param], [*resumed_model.parameters(), resumed_zo]):
        assert torch.equal(p, q)
