"""FO groups against torch.optim.SGD / AdamW (each implementation) and the reference kernels, and the FO pass's autograd footprint."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hybridzo import HybridZOOptimizer
from hybridzo.rules import begin_update, finish
from hybridzo.sharding import flat_view


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


# ------------------------------------------- the fast path: torch.optim's own implementations

IMPLEMENTATIONS = {"default": {}, "for-loop": dict(foreach=False), "foreach": dict(foreach=True),
                   "fused": dict(fused=True)}


def torch_optimizer(rule, params, lr, weight_decay, momentum, betas, adam_eps, implementation):
    options = IMPLEMENTATIONS[implementation]
    if rule == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **options)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=adam_eps, weight_decay=weight_decay, **options)


def assert_same_state(ours, theirs, params_ours, params_theirs):
    for p, q in zip(params_ours, params_theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
        mine, reference = ours.state.get(p, {}), theirs.state.get(q, {})
        for key, value in mine.items():
            assert torch.equal(value, reference[key]), key
            if key == "step":  # stored as torch stores it
                assert (value.dtype, value.device, value.dim()) == (reference[key].dtype, reference[key].device, 0)
        assert {k for k, v in reference.items() if v is not None} == set(mine)


def run_both(rule, implementation, shapes, dtype, hyper, steps, seed, drop=()):
    """The same tensors, gradients (None where ``(step, index)`` is in ``drop``) and hyperparameters,
    stepped from ``.grad`` by an FO group and by torch.optim with the same implementation."""
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(shape, generator=g).to(dtype) for shape in shapes]
    ours = [v.clone().requires_grad_() for v in values]
    theirs = [v.clone().requires_grad_() for v in values]
    opt = HybridZOOptimizer(ours, mode="fo", rule=rule, lr=hyper["lr"], weight_decay=hyper["weight_decay"],
                            momentum=hyper["momentum"], betas=hyper["betas"], adam_eps=hyper["adam_eps"],
                            **IMPLEMENTATIONS[implementation])
    if rule == "sgd" and implementation == "fused" and drop:
        # torch's fused SGD fails when some of its tensors have a momentum buffer and others not yet;
        # an optimizer per tensor is the same elementwise arithmetic.
        refs = [torch_optimizer(rule, [q], implementation=implementation, **hyper) for q in theirs]
    else:
        refs = [torch_optimizer(rule, theirs, implementation=implementation, **hyper)]
    for step in range(steps):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            grad = torch.randn(p.shape, generator=g).to(dtype)
            p.grad, q.grad = (None, None) if (step, i) in drop else (grad.clone(), grad.clone())
        assert opt.step() is None
        for ref in refs:
            ref.step()
    ref = refs[0]
    for other in refs[1:]:
        ref.state.update(other.state)
    assert_same_state(opt, ref, ours, theirs)
    return opt, ref, ours, theirs


HYPER = st.fixed_dictionaries({
    "lr": st.sampled_from([0.0, 1e-3, 0.1]),
    "weight_decay": st.sampled_from([0.0, 0.01, 0.3]),
    "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "betas": st.sampled_from([(0.9, 0.999), (0.8, 0.9), (0.0, 0.5)]),
    "adam_eps": st.sampled_from([1e-8, 1e-3]),
})


@settings(max_examples=60, deadline=None)
@given(
    rule=st.sampled_from(["sgd", "adamw"]),
    implementation=st.sampled_from(list(IMPLEMENTATIONS)),
    shapes=st.lists(st.lists(st.integers(1, 5), max_size=3).map(tuple), min_size=1, max_size=6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    hyper=HYPER,
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    drop=st.sets(st.tuples(st.integers(0, 3), st.integers(0, 5)), max_size=4),
)
def test_property_fo_groups_match_torch_optim_with_the_same_implementation_bit_for_bit(
        rule, implementation, shapes, dtype, hyper, steps, seed, drop):
    run_both(rule, implementation, shapes, dtype, hyper, steps, seed, drop)


@pytest.mark.parametrize("implementation", ["for-loop", "foreach", "default"])
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_complex_fo_parameters_match_torch_with_the_same_implementation(rule, implementation):
    hyper = dict(lr=0.05, weight_decay=0.01, momentum=0.9, betas=(0.9, 0.99), adam_eps=1e-8)
    run_both(rule, implementation, [(3, 4), (5,)], torch.complex64, hyper, steps=3, seed=0)


def reference_step(rule, params, grads, states, group):
    """hybridzo.rules' per-tensor kernels, the readable reference, on copies."""
    for p, grad, state in zip(params, grads, states):
        if grad is None:
            continue
        update = begin_update(state, p, group, commit=True)
        update.apply_(flat_view(p), flat_view(p), flat_view(grad))
        finish(state, update)


@settings(max_examples=30, deadline=None)
@given(
    rule=st.sampled_from(["sgd", "adamw"]),
    implementation=st.sampled_from(list(IMPLEMENTATIONS)),
    shapes=st.lists(st.lists(st.integers(1, 5), max_size=3).map(tuple), min_size=1, max_size=5),
    hyper=HYPER,
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_property_fast_path_follows_the_reference_kernels(rule, implementation, shapes, hyper, steps, seed):
    """The per-tensor loop is the reference bit for bit; foreach and fused round differently, within ulps."""
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in shapes]
    ours = [v.clone().requires_grad_() for v in values]
    reference = [v.clone() for v in values]
    states = [{} for _ in values]
    opt = HybridZOOptimizer(ours, mode="fo", rule=rule, **hyper, **IMPLEMENTATIONS[implementation])
    group = opt.param_groups[0]
    for _ in range(steps):
        grads = [torch.randn(v.shape, generator=g, dtype=torch.float64) for v in values]
        for p, grad in zip(ours, grads):
            p.grad = grad.clone()
        opt.step()
        reference_step(rule, reference, grads, states, group)
    exact = implementation in ("default", "for-loop")
    for p, q, state in zip(ours, reference, states):
        torch.testing.assert_close(p.detach(), q, **({"rtol": 0, "atol": 0} if exact else {}))
        for key, value in state.items():
            mine = opt.state[p][key]
            if key == "step":
                assert int(mine) == value
            else:
                torch.testing.assert_close(mine, value, **({"rtol": 0, "atol": 0} if exact else {}))


@pytest.mark.parametrize("implementation", ["for-loop", "foreach", "fused"])
def test_state_moves_between_torch_optim_and_fo_groups_in_both_directions(implementation):
    """torch.optim.AdamW's state continues in an FO group, and the FO group's in torch.optim.AdamW."""
    hyper = dict(lr=0.05, weight_decay=0.01, momentum=0.0, betas=(0.9, 0.99), adam_eps=1e-8)
    opt, ref, ours, theirs = run_both("adamw", implementation, [(4, 3), (3,)], torch.float32, hyper, 2, seed=1)
    ours_state, theirs_state = opt.state_dict(), ref.state_dict()
    opt.load_state_dict({**ours_state, "state": copy.deepcopy(theirs_state["state"])})
    ref.load_state_dict({**theirs_state, "state": copy.deepcopy(ours_state["state"])})
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert_same_state(opt, ref, ours, theirs)


def test_old_state_dict_with_an_integer_step_and_no_implementation_keys_continues_as_torch():
    hyper = dict(lr=0.05, weight_decay=0.01, momentum=0.0, betas=(0.9, 0.99), adam_eps=1e-8)
    opt, ref, ours, theirs = run_both("adamw", "for-loop", [(4, 3), (3,)], torch.float32, hyper, 2, seed=2)
    old = copy.deepcopy(opt.state_dict())
    for entry in old["state"].values():
        entry["step"] = int(entry["step"])  # as hybridzo 0.1 saved it
    for group in old["param_groups"]:
        del group["foreach"], group["fused"]
    fresh = HybridZOOptimizer(ours, mode="fo", rule="adamw", lr=0.5)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["foreach"] is None and fresh.param_groups[0]["fused"] is None
    for p, q in zip(ours, theirs):
        p.grad = torch.ones(p.shape)
        q.grad = torch.ones(q.shape)
    fresh.step()
    ref.step()
    assert_same_state(fresh, ref, ours, theirs)


BAD_IMPLEMENTATION_CHOICES = [("foreach", "yes"), ("fused", 1), ("fused", "true")]


@pytest.mark.parametrize("key, value", BAD_IMPLEMENTATION_CHOICES)
def test_implementation_keys_are_validated_wherever_they_enter(key, value):
    model = make_model()
    with pytest.raises(ValueError, match=rf"Invalid {key} in defaults"):
        HybridZOOptimizer(model.parameters(), mode="fo", **{key: value})
    opt = HybridZOOptimizer([{"params": model[0].parameters(), "mode": "fo"}])
    with pytest.raises(ValueError, match=rf"Invalid {key} in param group 1"):
        opt.add_param_group({"params": model[2].parameters(), "mode": "fo", key: value})
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=rf"Invalid {key} in param group 0"):
        opt.load_state_dict(saved)
    opt.param_groups[0][key] = value  # as a scheduler or a user would write it
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"Invalid {key} in param group 0"):
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_fused_and_foreach_together_and_fused_complex_parameters_are_refused():
    model = make_model()
    with pytest.raises(ValueError, match=r"Invalid fused in param group 0.*both"):
        HybridZOOptimizer(model.parameters(), mode="fo", foreach=True, fused=True)
    with pytest.raises(ValueError, match=r"Invalid fused in param group 1.*parameter 0 is torch.complex64"):
        HybridZOOptimizer([{"params": model.parameters(), "mode": "fo"},
                           {"params": [torch.zeros(3, dtype=torch.complex64)], "mode": "fo", "fused": True}])
    opt = HybridZOOptimizer(model.parameters(), mode="fo")
    saved = opt.state_dict()
    saved["param_groups"][0].update(foreach=True, fused=True)
    with pytest.raises(ValueError, match=r"Invalid fused in param group 0"):
        opt.load_state_dict(saved)


def test_a_gradient_or_state_unlike_its_parameter_is_refused_before_anything_is_written():
    model = make_model()
    opt = HybridZOOptimizer([{"params": model[0].parameters(), "mode": "fo", "rule": "adamw"},
                             {"params": model[2].parameters(), "mode": "fo", "momentum": 0.9}], lr=0.1)
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    nn.functional.mse_loss(model(x), y).backward()
    before = ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()))
    model[2].bias.grad_dtype = None  # torch refuses such gradients unless told to accept them
    model[2].bias.grad = model[2].bias.grad.double()
    with pytest.raises(ValueError, match=r"Invalid gradient in param group 1, parameter 1"):
        opt.step()
    model[2].bias.grad = model[2].bias.grad.float()
    opt.state[model[2].weight]["momentum_buffer"] = opt.state[model[2].weight]["momentum_buffer"].double()
    with pytest.raises(ValueError, match=r"Invalid state in param group 1, parameter 0: state 'momentum_buffer'"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before[0]))
    after = opt.state_dict()
    assert after["param_groups"] == before[1]["param_groups"]
    assert torch.equal(after["state"][0]["step"], before[1]["state"][0]["step"])


def test_parameters_without_a_gradient_are_skipped_and_get_no_state():
    model = make_model()
    opt = HybridZOOptimizer(model.parameters(), mode="fo", rule="adamw", lr=0.1)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = model[2].weight.detach().clone()
    opt.step()
    assert set(opt.state) == {model[0].weight}
    assert torch.equal(model[2].weight, before)
