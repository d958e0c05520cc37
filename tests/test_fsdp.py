"""FSDP2 (``fully_shard``) with 2 gloo processes on CPU, against one process on the unsharded model.

One ``mp.spawn`` runs every multi-process check (the start-up of two interpreters costs more than all the
steps); the ranks save what they saw, and the tests compare it with single-process runs. The model is a
small transformer language model in float64 (``tiny_lm.py``): every block is sharded on its own, the head
too, and the root. In float64 the sharded run and one process agree to ~1e-12; in float32 the loss's
rounding (the mean of two half-batch losses is not bit for bit the full-batch loss) is amplified by 1/eps in
the projected differences, and 10 steps differ by ~3e-4 relative, which tests nothing about sharding.
"""

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hybridzo import HybridZOOptimizer, prepare_fsdp
from tiny_lm import (DATA, SEED, assert_params_close, batch_of, closure_for, counters, fsdp2_available, full_params,
                     full_model_optimizer, load_checkpoint, make_model, mixed_optimizer, save_checkpoint, shard, train)

pytestmark = [
    pytest.mark.skipif(not fsdp2_available(), reason="torch.distributed with FSDP2 not available"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),  # DCP in one process
]

WORLD, STEPS = 2, 10
BEFORE, AFTER, NAN_STEP = 3, 3, 1  # checkpoint after BEFORE steps; step NAN_STEP's loss is NaN (skipped)


# ------------------------------------------------------------------------------------- optimizers

FULL_MODEL = {  # name: (group options, sharding layout)
    "exact": ({}, "all"),
    "inplace-momentum": ({"restore": "inplace", "momentum": 0.9}, "all"),
    "forward-candidates-coordinate-rademacher-queries": (
        {"estimator": "forward", "candidates": 2, "sign": "coordinate", "distribution": "rademacher",
         "queries": 2}, "all"),
    "inplace-conservative-candidates-scalar": (
        {"restore": "inplace", "conservative": True, "candidates": 2, "sign": "scalar"}, "all"),
    "plain-root-parameters-zo": ({}, "blocks"),  # the root not sharded: plain tensors in a ZO group work
}

CHECKPOINTED = {  # name: optimizer builder; "stateless" keeps no per-parameter state at all
    "stateless": lambda model, seed=SEED: full_model_optimizer(model, {}, seed),
    "stateful": mixed_optimizer,
}


# -------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def counting_reduce_scatters():
    """The input sizes of FSDP2's gradient reduce-scatters (it calls ``dist.reduce_scatter_single``)."""
    calls = []
    original = dist.reduce_scatter_single

    def counting(*args, **kwargs):
        calls.append(int((kwargs["input"] if "input" in kwargs else args[1]).numel()))
        return original(*args, **kwargs)

    dist.reduce_scatter_single = counting
    try:
        yield calls
    finally:
        dist.reduce_scatter_single = original


def error_of(action) -> str:
    try:
        action()
    except ValueError as error:
        return str(error)
    return ""


# --------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("options", [{"rule": "adamw"}, {"momentum": 0.9}], ids=["adamw", "sgd-momentum"])
def test_dcp_round_trip_in_one_process_continues_bit_for_bit(tmp_path, options):
    """DCP loads only the state entries a fresh optimizer has; it creates them with a closure-less step at lr 0."""
    model = make_model()
    opt = full_model_optimizer(model, options)
    train(model, opt, DATA, BEFORE)
    save_checkpoint(model, opt, tmp_path / "checkpoint")
    resumed_model = make_model()
    resumed = full_model_optimizer(resumed_model, options, seed=SEED + 1)
    load_checkpoint(resumed_model, resumed, tmp_path / "checkpoint")
    assert counters(resumed) == counters(opt)
    for p, q in zip(opt.param_groups[0]["params"], resumed.param_groups[0]["params"]):
        assert opt.state[p].keys() == resumed.state[q].keys()
        for key, value in opt.state[p].items():
            loaded = resumed.state[q][key]
            assert torch.equal(value, loaded) if torch.is_tensor(value) else value == loaded
    assert train(model, opt, DATA, AFTER) == train(resumed_model, resumed, DATA, AFTER)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------- the 2-process run


def rank_main(rank: int, tmp: str) -> None:
    tmp = Path(tmp)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'init'}", rank=rank, world_size=WORLD)
    try:
        tokens = batch_of(rank, WORLD)
        results = {"full": {}, "checkpoint": {}}
        for name, (options, layout) in FULL_MODEL.items():
            model = shard(make_model(), layout)
            opt = full_model_optimizer(model, options)
            with counting_reduce_scatters() as reduce_scatters:
                losses = train(model, opt, tokens, STEPS)
            results["full"][name] = {"losses": losses, "params": full_params(model),
                                     "reduce_scatters": list(reduce_scatters)}

        model = shard(make_model())
        opt = mixed_optimizer(model)
        zo_params = list(opt.param_groups[0]["params"])
        head = list(model.head.parameters())
        grads = []  # after every step: (ZO parameters with a gradient, FO parameters without one)

        def record():
            grads.append([sum(p.grad is not None for p in zo_params), sum(p.grad is None for p in head)])

        with counting_reduce_scatters() as reduce_scatters:
            losses = train(model, opt, tokens, STEPS, after_step=record)
        padded_head = sum(WORLD * math.ceil(p.shape[0] / WORLD) * p[0].numel() for p in head)
        results["mixed"] = {"losses": losses, "params": full_params(model), "grads": grads,
                            "reduce_scatters": list(reduce_scatters), "padded_head_numel": padded_head}

        for name, build in CHECKPOINTED.items():
            model = shard(make_model())  # run BEFORE steps, save for one process to resume
            opt = build(model)
            train(model, opt, tokens, BEFORE, nan_step=NAN_STEP)
            save_checkpoint(model, opt, tmp / f"{name}-from-2")
            model = shard(make_model())  # resume what one process saved
            opt = build(model, seed=SEED + 1)  # the checkpoint's seed must win
            load_checkpoint(model, opt, tmp / f"{name}-from-1")
            losses = train(model, opt, tokens, AFTER, first_step=BEFORE)
            results["checkpoint"][name] = {"losses": losses, "params": full_params(model), "counters": counters(opt)}

        results["errors"] = bad_use(tokens)
        torch.save(results, tmp / f"rank{rank}.pt")
    finally:
        # Tear down in order: no rank leaves while the other still talks to it (see test_distributed.py).
        dist.barrier()
        dist.destroy_process_group()


def bad_use(tokens) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    errors = {}
    model = make_model()  # weights sharded on dim 1
    for block in model.blocks:
        fully_shard(block, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
    fully_shard(model)
    prepare_fsdp(model)
    errors["shard-dim-1"] = error_of(lambda: HybridZOOptimizer(
        [{"params": model.head.parameters()}, {"params": model.blocks.parameters()}]))

    model = make_model()  # not passed to prepare_fsdp
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = HybridZOOptimizer(model.parameters(), seed=SEED)
    errors["unprepared"] = error_of(lambda: opt.step(closure_for(model, tokens)))

    model = shard(make_model(), "blocks")  # the root's parameters stay plain tensors; an FO head among them
    opt = HybridZOOptimizer([{"params": model.blocks.parameters()},
                             {"params": model.head.parameters(), "mode": "fo"}], seed=SEED)
    errors["plain-fo"] = error_of(lambda: opt.step(closure_for(model, tokens)))

    model = shard(make_model())  # the usual GradScaler loop: scaled backward (sharded gradients), then step
    opt = mixed_optimizer(model)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(closure_for(model, tokens)()).backward()
    errors["grad-scaler"] = error_of(lambda: scaler.step(opt))
    return errors


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references run beside two ranks on a few cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Save one-process checkpoints, run the 2 ranks, then resume theirs in one process."""
    tmp = tmp_path_factory.mktemp("fsdp")
    for name, build in CHECKPOINTED.items():
        model = make_model()
        opt = build(model)
        train(model, opt, DATA, BEFORE, nan_step=NAN_STEP)
        save_checkpoint(model, opt, tmp / f"{name}-from-1")
    mp.spawn(rank_main, args=(str(tmp),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    resumed = {}
    for name, build in CHECKPOINTED.items():
        # One process on the plain model: what a user does to continue on one device (no process group,
        # no fully_shard); DCP turns the saved shards into whole tensors.
        model = make_model()
        opt = build(model, seed=SEED + 1)
        load_checkpoint(model, opt, tmp / f"{name}-from-2")
        losses = train(model, opt, DATA, AFTER, first_step=BEFORE)
        resumed[name] = {"losses": losses, "params": full_params(model), "counters": counters(opt)}
    return ranks, resumed


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(FULL_MODEL))
def test_full_model_zo_on_shards_matches_one_process(runs, name):
    ranks, _ = runs
    options, _ = FULL_MODEL[name]
    reference = make_model()
    losses = train(reference, full_model_optimizer(reference, options), DATA, STEPS)
    assert ranks[0]["full"][name]["losses"] == ranks[1]["full"][name]["losses"]  # exactly
    assert ranks[0]["full"][name]["losses"] == pytest.approx(losses, rel=1e-9)
    for rank in ranks:
        assert_params_close(rank["full"][name]["params"], reference, rtol=1e-6)
        assert rank["full"][name]["reduce_scatters"] == []  # no backward at all


def test_mixed_zo_fo_on_shards_matches_one_process_and_backward_reaches_fo_only(runs):
    ranks, _ = runs
    reference = make_model()
    losses = train(reference, mixed_optimizer(reference), DATA, STEPS)
    for rank in ranks:
        mixed = rank["mixed"]
        assert mixed["losses"] == ranks[0]["mixed"]["losses"]
        assert mixed["losses"] == pytest.approx(losses, rel=1e-9)
        assert_params_close(mixed["params"], reference, rtol=1e-5)
        assert mixed["grads"] == [[0, 0]] * STEPS  # ZO parameters never get a gradient, FO ones always
        # One reduce-scatter per backward, of the (padded) head only.
        assert mixed["reduce_scatters"] == [mixed["padded_head_numel"]] * STEPS


def uninterrupted(build):
    model = make_model()
    opt = build(model)
    losses = train(model, opt, DATA, BEFORE + AFTER, nan_step=NAN_STEP)
    return model, opt, losses


@pytest.mark.parametrize("name", list(CHECKPOINTED))
@pytest.mark.parametrize("direction", ["saved by 2 processes, resumed by 1", "saved by 1 process, resumed by 2"])
def test_dcp_checkpoint_resumes_the_trajectory_on_another_world_size(runs, name, direction):
    ranks, resumed = runs
    model, opt, losses = uninterrupted(CHECKPOINTED[name])
    results = [resumed[name]] if direction.startswith("saved by 2") else [r["checkpoint"][name] for r in ranks]
    for result in results:
        assert result["counters"] == counters(opt)  # seeds (not the fresh optimizer's), steps, nonfinite_steps
        assert result["losses"] == pytest.approx(losses[BEFORE:], rel=1e-9)
        assert_params_close(result["params"], model, rtol=1e-6)
    assert counters(opt)[0][1:] == [BEFORE + AFTER, 1]


def test_bad_use_under_fsdp_gets_a_clear_error(runs):
    ranks, _ = runs
    for rank in ranks:
        errors = rank["errors"]
        assert "param group 1, parameter 4" in errors["shard-dim-1"], errors["shard-dim-1"]
        assert "sharded on dim 0 only" in errors["shard-dim-1"] and "Shard(dim=1)" in errors["shard-dim-1"]
        assert "param group 0, parameter 0" in errors["unprepared"] and "prepare_fsdp" in errors["unprepared"]
        assert "param group 1, parameter 0" in errors["plain-fo"], errors["plain-fo"]
        assert "plain tensor in an FO group" in errors["plain-fo"] and "fully_shard" in errors["plain-fo"]
        assert "GradScaler" in errors["grad-scaler"] and "bf16" in errors["grad-scaler"]
