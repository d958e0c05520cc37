"""torch.optim conformance: schedulers, state_dict resume, weights_only, pickle, hooks."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from hybridzo import HybridZOOptimizer


def model_and_groups(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    groups = [
        {"params": model[0].parameters(), "mode": "zo", "rule": "adamw", "sign": "coordinate", "eps": 5e-4},
        {"params": model[3].parameters(), "mode": "zo", "momentum": 0.9, "eps": 1e-3},
        {"params": model[5].parameters(), "mode": "fo", "rule": "adamw", "weight_decay": 0.01},
    ]
    return model, groups


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.step(lambda: nn.functional.mse_loss(model(x), y))


def test_is_a_torch_optimizer_and_lr_is_what_schedulers_change():
    model, groups = model_and_groups()
    opt = HybridZOOptimizer(groups, lr=0.1, seed=0, conservative=True)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in batches(2):
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.025] * 3
    # a ZO group with lr 0 (set through the scheduler's key) does not move
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, batches(2, seed=5))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_state_dict_resume_repeats_the_trajectory_bit_for_bit():
    data = batches(20)
    model_a, groups_a = model_and_groups()
    opt_a = HybridZOOptimizer(groups_a, lr=0.01, seed=42, candidates=2)
    torch.manual_seed(100)
    train(model_a, opt_a, data[:10])
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "rng": torch.get_rng_state()}, buffer)
    train(model_a, opt_a, data[10:])

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    model_b, groups_b = model_and_groups(seed=99)  # different init, overwritten by the checkpoint
    opt_b = HybridZOOptimizer(groups_b, lr=0.5, seed=7, candidates=2)
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    torch.set_rng_state(checkpoint["rng"])
    train(model_b, opt_b, data[10:])
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    assert [g["seed"] for g in opt_b.param_groups] == [42] * 3
    assert [g["steps"] for g in opt_b.param_groups] == [20] * 3


def test_same_seed_same_trajectory_and_different_seed_differs():
    data = batches(5)
    results = []
    for seed in (1, 1, 2):
        model, groups = model_and_groups()
        model.eval()  # no dropout: only the perturbation seed differs
        train(model, HybridZOOptimizer(groups, lr=0.05, seed=seed), data)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_deepcopy_and_pickle_keep_state():
    model, groups = model_and_groups()
    opt = HybridZOOptimizer(groups, lr=0.01, seed=3)
    train(model, opt, batches(2))
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    restored = pickle.loads(pickle.dumps(opt))
    assert len(restored.state) == len(opt.state)
    for a, b in zip(restored.state.values(), opt.state.values()):
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
    # a copy taken together with its model keeps training that model, with a closure passed to step
    model_copy, opt_copy = copy.deepcopy((model, opt))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    opt_copy.step(lambda: nn.functional.mse_loss(model_copy(x), y))
    assert any(not torch.equal(p, b) for p, b in zip(model_copy.parameters(), before))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_step_and_state_dict_hooks_fire():
    model, groups = model_and_groups()
    opt = HybridZOOptimizer(groups, lr=0.01, seed=0)
    events = []
    opt.register_step_pre_hook(lambda o, args, kwargs: events.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: events.append("post"))
    opt.register_state_dict_pre_hook(lambda o: events.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: events.append("sd-post") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: events.append("load-pre") or sd)
    opt.register_load_state_dict_post_hook(lambda o: events.append("load-post"))
    train(model, opt, batches(1))
    opt.load_state_dict(opt.state_dict())
    assert events == ["pre", "post", "sd-pre", "sd-post", "load-pre", "load-post"]


@pytest.mark.parametrize("config", [dict(conservative=True), dict(estimator="forward"), dict(mode="fo")])
def test_step_returns_the_loss_at_unperturbed_parameters(config):
    model, _ = model_and_groups()
    model.eval()
    x, y = batches(1)[0]
    expected = nn.functional.mse_loss(model(x), y).item()
    opt = HybridZOOptimizer(model.parameters(), lr=0.01, seed=0, **config)
    assert opt.step(lambda: nn.functional.mse_loss(model(x), y)).item() == expected


def test_central_pure_zo_returns_probe_mean_close_to_the_loss():
    model, _ = model_and_groups()
    model.eval()
    x, y = batches(1)[0]
    expected = nn.functional.mse_loss(model(x), y).item()
    opt = HybridZOOptimizer(model.parameters(), lr=0.0, eps=1e-3, seed=0)
    assert opt.step(lambda: nn.functional.mse_loss(model(x), y)).item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("implementation", [dict(foreach=False), dict(foreach=True), dict(fused=True)],
                         ids=["for-loop", "foreach", "fused"])
def test_fo_state_resumes_through_weights_only_checkpoints_and_copies(implementation):
    """FO state (AdamW's step a tensor, as torch keeps it) survives torch.save/load(weights_only=True),
    deepcopy and pickle; every copy continues the trajectory bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = HybridZOOptimizer([{"params": model[0].parameters(), "mode": "fo", "momentum": 0.9},
                             {"params": model[2].parameters(), "mode": "fo", "rule": "adamw", "weight_decay": 0.01}],
                            lr=0.01, seed=0, **implementation)
    data = batches(6)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    loaded_model = copy.deepcopy(model)
    loaded_model.load_state_dict(checkpoint["model"])
    loaded = HybridZOOptimizer([{"params": loaded_model[0].parameters(), "mode": "fo"},
                                {"params": loaded_model[2].parameters(), "mode": "fo"}], lr=1.0)
    loaded.load_state_dict(checkpoint["opt"])
    train(model, opt, data[3:])
    for other_model, other in [*copies, (loaded_model, loaded)]:
        train(other_model, other, data[3:])
        for p, q in zip(model.parameters(), other_model.parameters()):
            assert torch.equal(p, q)
    step = opt.state[model[2].weight]["step"]
    assert torch.is_tensor(step) and step.dim() == 0 and step.item() == 6
