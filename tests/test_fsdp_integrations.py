"""Frameworks over FSDP2: Lightning's ModelParallelStrategy drives it (2 gloo processes); accelerate's FSDP
plugin, which applies FSDP on GPUs only and so cannot be tested here, is refused by ``accelerated_step``."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tiny_lm import (DATA, assert_params_close, closure_for, fsdp2_available, full_model_optimizer, full_params,
                     make_model, mixed_optimizer, train)

pytestmark = [
    pytest.mark.skipif(not fsdp2_available(), reason="torch.distributed with FSDP2 not available"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),  # DCP in one process
]

WORLD, STEPS = 2, 3
OPTIMIZERS = {  # name: optimizer builder
    "mixed": mixed_optimizer,  # the step's first forward is Lightning's closure with backward
    "full-model-zo": lambda model: full_model_optimizer(model, {"conservative": True}),  # ... without
}


def lightning_rank(rank: int, tmp: str) -> None:
    # Processes started outside Lightning: it reads its rank from these and joins the existing group.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), NODE_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(tmp) / 'init'}", rank=rank, world_size=WORLD)
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.strategies import ModelParallelStrategy
        from torch.distributed.fsdp import fully_shard

        from hybridzo import prepare_fsdp
        from hybridzo.integrations.lightning import HybridZOMixin

        class ShardedLM(HybridZOMixin, pl.LightningModule):
            def __init__(self, build) -> None:
                super().__init__()
                self.lm, self.build = make_model(), build

            def configure_model(self) -> None:
                mesh = self.device_mesh["data_parallel"]
                for block in self.lm.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(self.lm.head, mesh=mesh)
                fully_shard(self.lm, mesh=mesh)
                prepare_fsdp(self.lm)  # Lightning then calls .to(device): the parameters stay prepared

            def training_step(self, batch, batch_idx):
                return closure_for(self.lm, batch)()

            def configure_optimizers(self):
                return self.build(self.lm)

            def train_dataloader(self):
                # Lightning's DistributedSampler gives each rank half of DATA; every step sees all of it.
                return torch.utils.data.DataLoader(DATA, batch_size=len(DATA) // WORLD)

        results = {}
        for name, build in OPTIMIZERS.items():
            trainer = pl.Trainer(
                accelerator="cpu", devices=WORLD, max_steps=STEPS, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False,
                strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
            )
            module = ShardedLM(build)
            trainer.fit(module)
            results[name] = full_params(module.lm)
        torch.save(results, Path(tmp) / f"lightning{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_lightning_model_parallel_strategy_with_the_mixin_matches_one_process(tmp_path):
    pytest.importorskip("lightning")
    mp.spawn(lightning_rank, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"lightning{r}.pt", weights_only=True) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, build in OPTIMIZERS.items():
            reference = make_model()
            train(reference, build(reference), DATA, STEPS)
            for rank in ranks:
                assert_params_close(rank[name], reference, rtol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_accelerated_step_refuses_the_fsdp_plugin_and_says_what_to_use(monkeypatch):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import DistributedType

    from hybridzo.integrations.accelerate import accelerated_step

    model = make_model()
    accelerator = accelerate.Accelerator(cpu=True)
    optimizer = accelerator.prepare(full_model_optimizer(model, {}))
    # What Accelerator(fsdp_plugin=...) sets on a GPU machine; on CPU accelerate ignores the plugin.
    monkeypatch.setattr(optimizer.accelerator_state, "distributed_type", DistributedType.FSDP)
    with pytest.raises(NotImplementedError, match="prepare_fsdp") as error:
        accelerated_step(optimizer, closure_for(model, DATA))
    assert "fully_shard" in str(error.value) and "ModelParallelStrategy" in str(error.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), make_model().parameters()))
