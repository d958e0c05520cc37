"""torch.distributed.checkpoint (DCP) and FSDP2 (``fully_shard``) with the small language model of ``tiny_lm.py``."""

import pytest
import torch

from tiny_lm import DATA, SEED, counters, fsdp2_available, full_model_optimizer, load_checkpoint, make_model, \
    save_checkpoint, train

pytestmark = [
    pytest.mark.skipif(not fsdp2_available(), reason="torch.distributed with FSDP2 not available"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),  # DCP in one process
]
BEFORE, AFTER = 3, 3


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
