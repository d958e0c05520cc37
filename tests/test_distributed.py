"""Data-parallel training with torch.distributed (gloo, 2 CPU processes)."""

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from hybridzo import HybridZOOptimizer

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
STEPS, WORLD, BATCH = 20, 2, 16


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def make_optimizer(model, seed):
    return HybridZOOptimizer(
        [
            {"params": model[0].parameters(), "mode": "zo", "sign": "coordinate", "eps": 5e-4},
            {"params": model[2].parameters(), "mode": "zo", "momentum": 0.9},
            {"params": model[4].parameters(), "mode": "fo", "rule": "adamw"},
        ],
        lr=1e-2, conservative=True, seed=seed,
    )


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 1, generator=g)) for _ in range(STEPS)]


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_rank(rank, init_file, result_dir, freeze_zo):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = make_model()
    # seed=None on purpose: each rank draws its own, and the optimizer must agree on rank 0's.
    opt = make_optimizer(model, seed=None)
    if freeze_zo:  # ZO parameters need no autograd; frozen, DDP does not wait for their gradients
        for group in opt.param_groups:
            if group["mode"] == "zo":
                for p in group["params"]:
                    p.requires_grad_(False)
        ddp = DDP(model)
    else:
        ddp = DDP(model, find_unused_parameters=True)
    scalars = []
    for x, y in batches():
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.step(lambda: nn.functional.mse_loss(ddp(xs), ys))
        scalars.append(opt.last_step_info["scalars_reduced"])
    torch.save({"params": flat(model), "scalars": scalars, "seed": opt.param_groups[0]["seed"]},
               os.path.join(result_dir, f"rank{rank}.pt"))
    # Tear down in order: no rank leaves while the other still talks to it, and DDP's reducer (which holds
    # the process group) goes before the group. Otherwise gloo's threads can outlive it and abort the
    # process at exit on a loaded machine (seen once in CI as SIGABRT after all steps had finished).
    dist.barrier()
    del ddp, opt
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.parametrize("freeze_zo", [True, False])
def test_two_ranks_stay_identical_and_match_one_process(tmp_path, freeze_zo):
    mp.spawn(train_rank, args=(str(tmp_path / "init"), str(tmp_path), freeze_zo), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])  # bit-identical replicas
    assert ranks[0]["seed"] == ranks[1]["seed"]
    # one all-reduced float per forward: theta, +-eps, theta-Delta, theta+Delta
    assert ranks[0]["scalars"] == [5] * STEPS

    # A single process on the concatenated batch takes the same steps up to float rounding:
    # the mean of the two half-batch losses is the full-batch loss. Summation order differs, and
    # AdamW's normalisation amplifies that rounding on near-zero gradient coordinates, hence 1e-4.
    model = make_model()
    opt = make_optimizer(model, seed=ranks[0]["seed"])
    for x, y in batches():
        opt.step(lambda: nn.functional.mse_loss(model(x), y))
    torch.testing.assert_close(ranks[0]["params"], flat(model), rtol=1e-3, atol=1e-4)
    assert not torch.equal(flat(make_model()), flat(model))  # and it did train


# A ZO group added after the first step: its seed and counters must agree across ranks too.
LATE_SEEDS = {"seed given": 1234, "seed None": None, "seed inherited": "omitted"}
LATE_STEPS = 4


def late_group_rank(rank, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for name, seed in LATE_SEEDS.items():
        model = make_model()
        for p in [*model[0].parameters(), *model[2].parameters()]:
            p.requires_grad_(False)  # ZO now or later; frozen, DDP does not wait for their gradients
        ddp = DDP(model)
        # seed=None: each rank draws its own default seed, which a group added later inherits when it names none
        opt = HybridZOOptimizer(
            [{"params": model[0].parameters(), "mode": "zo"}, {"params": model[4].parameters(), "mode": "fo", "rule": "adamw"}],
            lr=1e-2, conservative=True, seed=None,
        )
        data = batches()
        x, y = data[0]
        opt.step(lambda: nn.functional.mse_loss(ddp(x.chunk(WORLD)[rank]), y.chunk(WORLD)[rank]))
        late = {"params": model[2].parameters(), "mode": "zo", "momentum": 0.9}
        if seed != "omitted":
            late["seed"] = seed
        opt.add_param_group(late)
        for x, y in data[1:1 + LATE_STEPS]:
            xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
            opt.step(lambda: nn.functional.mse_loss(ddp(xs), ys))
        results[name] = {
            "params": flat(model),
            "late_params": torch.cat([p.detach().flatten() for p in model[2].parameters()]),
            "seeds": [g["seed"] for g in opt.param_groups],
            "counters": [(g["steps"], g["nonfinite_steps"]) for g in opt.param_groups],
        }
        dist.barrier()
        del ddp, opt
        gc.collect()
    torch.save(results, os.path.join(result_dir, f"late{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def late_group_runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("late_group")
    mp.spawn(late_group_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"late{r}.pt", weights_only=True) for r in range(WORLD)]


def check_late_group(runs, name):
    first, second = runs[0][name], runs[1][name]
    assert torch.equal(first["params"], second["params"])  # bit-identical replicas
    assert first["seeds"] == second["seeds"]
    assert first["counters"] == second["counters"] == [(1 + LATE_STEPS, 0)] * 2 + [(LATE_STEPS, 0)]
    initial = torch.cat([p.detach().flatten() for p in make_model()[2].parameters()])
    assert not torch.equal(first["late_params"], initial)  # the added group did train


@pytest.mark.parametrize("name", ["seed None", "seed inherited"])
def test_zo_group_added_after_the_first_step_agrees_across_ranks(late_group_runs, name):
    check_late_group(late_group_runs, name)


def test_zo_group_added_after_the_first_step_with_a_given_seed_still_agrees_across_ranks(late_group_runs):
    check_late_group(late_group_runs, "seed given")
