"""An exception anywhere inside the commit leaves parameters, grads, state and counters as they were.

The commit writes ZO and FO tensors one at a time (ZO tensors one direction chunk at a time); the
failure is injected into the rule kernel of the j-th committed write, the one place every write
goes through, so it lands after some tensors (and some chunks) were already written.
"""

import pytest
from _pytest.monkeypatch import MonkeyPatch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridzo import HybridZOOptimizer
from hybridzo.rules import AdamW, SGD
from test_reliability import assert_unchanged, capture, distinct_grads, loss_fn, mlp


class Injected(RuntimeError):
    pass


def fail_at_committed_write(monkeypatch, fail_at):
    """Make the ``fail_at``-th committed rule kernel call raise (after the earlier ones wrote)."""
    calls = []
    for rule in (SGD, AdamW):
        original = rule.kernel

        def failing(self, update, out, theta, grad, buffers, _original=original):
            if update.commit:
                calls.append(1)
                if len(calls) == fail_at:
                    raise Injected(f"committed write {fail_at}")
            return _original(self, update, out, theta, grad, buffers)

        monkeypatch.setattr(rule, "kernel", failing)
    return calls


def run_case(monkeypatch, zo, fo, restore, fail_at, chunk):
    monkeypatch.setattr("hybridzo.directions._CHUNK_ELEMENTS", {"cpu": chunk})  # several chunks per tensor
    model = mlp(sizes=(6, 8, 8, 1))
    hidden, head = [*model[0].parameters(), *model[2].parameters()], list(model[4].parameters())
    groups = [{"params": hidden + (head if fo is None else []), "mode": "zo", "restore": restore, **zo}]
    if fo is not None:
        groups.append({"params": head, "mode": "fo", **fo})
    opt = HybridZOOptimizer(groups, lr=0.05, seed=0)
    closure = loss_fn(model)
    opt.step(closure)
    opt.step(closure)  # state exists, so the commit overwrites buffers rather than creating them
    params = list(model.parameters())
    distinct_grads(params)
    before = capture(opt, params)
    calls = fail_at_committed_write(monkeypatch, fail_at)
    try:
        opt.step(closure)
    except Injected:
        assert_unchanged(before, opt, params, param_rtol=0.0 if restore == "exact" else 1e-6)
        return True
    assert len(calls) < fail_at  # the step committed fewer writes than the injection point
    return False


@settings(max_examples=40, deadline=None)
@given(
    zo=st.fixed_dictionaries({
        "estimator": st.sampled_from(["central", "forward"]),
        "queries": st.integers(1, 2),
        "candidates": st.integers(1, 2),
        "conservative": st.booleans(),
        "rule": st.sampled_from(["sgd", "adamw"]),
        "momentum": st.sampled_from([0.0, 0.9]),
        "sign": st.sampled_from([None, "coordinate"]),
        "distribution": st.sampled_from(["gaussian", "rademacher"]),
    }),
    fo=st.one_of(st.none(), st.fixed_dictionaries({"rule": st.sampled_from(["sgd", "adamw"]),
                                                    "momentum": st.sampled_from([0.0, 0.9])})),
    restore=st.sampled_from(["exact", "inplace"]),
    fail_at=st.integers(1, 12),
    chunk=st.sampled_from([5, 16, 1 << 20]),
)
def test_property_exception_inside_the_commit_changes_nothing(zo, fo, restore, fail_at, chunk):
    with MonkeyPatch.context() as patch:
        run_case(patch, zo, fo, restore, fail_at, chunk)


@pytest.mark.parametrize("restore", ["exact", "inplace"])
def test_every_committed_write_of_a_mixed_step_can_fail_cleanly(monkeypatch, restore):
    zo = {"rule": "adamw", "momentum": 0.0, "conservative": False}
    fo = {"rule": "sgd", "momentum": 0.9}
    fail_at, failed = 1, True
    while failed:
        with monkeypatch.context() as patch:
            failed = run_case(patch, zo, fo, restore, fail_at, chunk=7)
        fail_at += 1
    assert fail_at > 10  # many writes (chunks of ZO tensors, FO tensors) were each a failure point
