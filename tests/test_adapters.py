"""Tests for examples/adapters.py on a tiny random open_clip CLIP."""

import copy
import re

import open_clip
import pytest
import torch

from examples.adapters import (
    AdaptedResidualAttentionBlock,
    LinearHead,
    MoEAdapter,
    add_lora,
    add_moe_adapters,
    add_parallel_adapter,
    freeze_backbone,
    trainable_parameter_names,
)

LAYERS = 3


def tiny_clip() -> open_clip.CLIP:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(image_size=32, patch_size=8, width=64, layers=LAYERS, head_width=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=16, vocab_size=1000, width=64, heads=2, layers=LAYERS),
    )


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.randint(1, 1000, (4, 16), generator=generator)


def encode(model, inputs):
    images, texts = inputs
    return model.encode_image(images), model.encode_text(texts)


ADD_ALL_KINDS = {
    "moe": lambda m: add_moe_adapters(m),
    "moe_top1_of_3": lambda m: add_moe_adapters(m, num_experts=3, top_k=1, bottleneck=16),
    "lora": lambda m: add_lora(m, rank=4, targets=("qkv", "out", "fc", "proj")),
    "parallel": lambda m: add_parallel_adapter(m, rank=5, blocks=2),
}


@pytest.mark.parametrize("kind", ADD_ALL_KINDS)
@pytest.mark.parametrize("train_mode", [False, True])
def test_fresh_adapters_leave_outputs_unchanged(kind, train_mode, inputs):
    reference = tiny_clip().train(train_mode)
    model = copy.deepcopy(reference)
    ADD_ALL_KINDS[kind](model)
    model.train(train_mode)
    torch.manual_seed(2)  # noisy routing draws random numbers; the result must not depend on them
    for adapted, original in zip(encode(model, inputs), encode(reference, inputs)):
        torch.testing.assert_close(adapted, original, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ADD_ALL_KINDS)
def test_names_keep_layer_index_and_only_adapters_train(kind):
    model = tiny_clip()
    backbone_keys = set(model.state_dict())
    names = ADD_ALL_KINDS[kind](model)
    assert names and len(names) == len(set(names))
    parameters = dict(model.named_parameters())
    assert set(names) <= parameters.keys()
    for name in names:
        assert re.match(r"^(visual\.transformer|transformer)\.resblocks\.\d+\.", name), name
    # The backbone's own state-dict keys are untouched, so pretrained weights still load.
    assert backbone_keys <= set(model.state_dict())
    assert all(name.split(".resblocks.")[1].split(".", 1)[1].startswith(("moe_adapter", "lora_", "parallel_adapter"))
               for name in set(model.state_dict()) - backbone_keys)

    freeze_backbone(model, names)
    assert sorted(trainable_parameter_names(model)) == sorted(names)


def test_towers_and_layers_are_covered():
    model = tiny_clip()
    names = add_moe_adapters(model, towers=("language",))
    assert all(name.startswith("transformer.resblocks.") for name in names)
    assert {int(name.split(".")[2]) for name in names} == set(range(LAYERS))
    names = add_parallel_adapter(model, blocks=2)
    assert {name.split(".parallel_adapter")[0] for name in names} == {
        "visual.transformer.resblocks.0", "visual.transformer.resblocks.1"}
    assert type(model.visual.transformer.resblocks[2]) is not AdaptedResidualAttentionBlock


def test_adapters_combine_in_one_block():
    model = tiny_clip()
    moe_names = add_moe_adapters(model)
    lora_names = add_lora(model)
    assert not set(moe_names) & set(lora_names)
    block = model.visual.transformer.resblocks[0]
    assert hasattr(block, "moe_adapter") and hasattr(block, "lora_qkv")


@pytest.mark.parametrize("kind", ADD_ALL_KINDS)
def test_gradients_reach_adapters_and_change_outputs(kind, inputs):
    model = tiny_clip()
    before = [output.detach() for output in encode(model, inputs)]
    names = ADD_ALL_KINDS[kind](model)
    freeze_backbone(model, names)
    parameters = dict(model.named_parameters())
    with torch.no_grad():  # move the zero-initialised output projections off zero
        for name in names:
            if name.endswith((".up.weight", ".B")):
                parameters[name].normal_(std=0.5)
    model.eval()
    after = encode(model, inputs)
    image_change, text_change = ((new - old).abs().max() for new, old in zip(after, before))
    assert image_change > 1e-3
    # The parallel adapter sits in the vision tower only.
    assert text_change == 0 if kind == "parallel" else text_change > 1e-3
    sum(output.square().sum() for output in after).backward()
    with_grad = {name for name in names if parameters[name].grad is not None and parameters[name].grad.abs().sum() > 0}
    if kind == "moe_top1_of_3":
        # With top-1 routing an expert no sample is routed to gets no gradient, nor does the router (the
        # softmax over a single logit is constant); every block must still train the expert it routes to.
        blocks = {name.split(".moe_adapter.")[0] for name in names}
        assert all(any(n.startswith(block + ".moe_adapter.experts.") for n in with_grad) for block in blocks)
    else:
        # Routing noise (and so its gradient) exists only in training mode.
        assert with_grad == {name for name in names if ".w_noise" not in name}
    assert all(p.grad is None for n, p in model.named_parameters() if n not in set(names))


def test_noise_weights_get_gradients_in_training_mode(inputs):
    model = tiny_clip()
    names = add_moe_adapters(model, num_experts=3, top_k=2)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            if name.endswith(".up.weight"):
                parameters[name].normal_(std=0.5)
    freeze_backbone(model, names)
    model.train()
    torch.manual_seed(0)
    sum(output.square().sum() for output in encode(model, inputs)).backward()
    assert parameters["visual.transformer.resblocks.0.moe_adapter.w_noise"].grad.abs().sum() > 0


@pytest.mark.parametrize("train_mode", [False, True])
def test_router_picks_top_k_experts_per_sample(train_mode):
    torch.manual_seed(0)
    adapter = MoEAdapter(width=16, num_experts=5, top_k=2, bottleneck=4, noisy_gating=True, batch_first=True)
    with torch.no_grad():
        adapter.w_gate.normal_()
        adapter.w_noise.normal_()
    adapter.train(train_mode)
    gates = adapter.gates(torch.randn(32, 16))
    assert gates.shape == (32, 5)
    assert ((gates > 0).sum(dim=1) == 2).all()
    torch.testing.assert_close(gates.sum(dim=1), torch.ones(32))


def test_moe_output_is_gate_weighted_expert_sum():
    torch.manual_seed(0)
    adapter = MoEAdapter(width=16, num_experts=3, top_k=2, bottleneck=4, noisy_gating=False, batch_first=False)
    with torch.no_grad():
        adapter.w_gate.normal_()
        for expert in adapter.experts:
            expert.up.weight.normal_()
    x = torch.randn(7, 5, 16)  # (L, N, D)
    gates = adapter.gates(x[0])
    expected = sum(gates[:, i, None, None] * expert(x.transpose(0, 1)) for i, expert in enumerate(adapter.experts))
    torch.testing.assert_close(adapter(x), expected.transpose(0, 1))


def test_noisy_routing_only_in_training():
    torch.manual_seed(0)
    adapter = MoEAdapter(width=16, num_experts=4, top_k=1, bottleneck=4, noisy_gating=True, batch_first=True)
    first_tokens = torch.randn(64, 16)
    adapter.eval()
    assert torch.equal(adapter.gates(first_tokens), adapter.gates(first_tokens))
    adapter.train()
    assert not torch.equal(adapter.gates(first_tokens), adapter.gates(first_tokens))


@pytest.mark.parametrize("target", ["qkv", "out", "fc", "proj"])
def test_lora_equals_merged_weight(target, inputs):
    """A LoRA update must act exactly like adding scale * B @ A to the adapted weight."""
    model = tiny_clip().eval()
    merged = copy.deepcopy(model)
    add_lora(model, rank=3, alpha=6.0, targets=(target,))
    for tower_model, tower_merged in [(model.visual.transformer, merged.visual.transformer),
                                      (model.transformer, merged.transformer)]:
        for block, block_merged in zip(tower_model.resblocks, tower_merged.resblocks):
            lora = getattr(block, f"lora_{target}")
            assert lora.scale == 2.0
            with torch.no_grad():
                lora.B.normal_(std=0.1)
                delta = lora.scale * lora.B @ lora.A
                weight = {"qkv": block_merged.attn.in_proj_weight, "out": block_merged.attn.out_proj.weight,
                          "fc": block_merged.mlp.c_fc.weight, "proj": block_merged.mlp.c_proj.weight}[target]
                weight += delta
    for adapted, reference in zip(encode(model, inputs), encode(merged, inputs)):
        torch.testing.assert_close(adapted, reference, atol=1e-5, rtol=1e-4)


def test_lora_default_alpha_is_rank():
    model = tiny_clip()
    add_lora(model, rank=4, towers=("vision",))
    assert model.visual.transformer.resblocks[0].lora_qkv.scale == 1.0
    assert not hasattr(model.transformer.resblocks[0], "lora_qkv")


def test_bad_arguments_raise():
    model = tiny_clip()
    with pytest.raises(ValueError):
        add_lora(model, targets=("query",))
    with pytest.raises(ValueError):
        add_lora(model, towers="vision")
    with pytest.raises(ValueError):
        add_moe_adapters(model, towers=("audio",))
    with pytest.raises(ValueError):
        add_moe_adapters(model, num_experts=2, top_k=3)
    with pytest.raises(ValueError):
        add_parallel_adapter(model, blocks=LAYERS + 1)
    with pytest.raises(ValueError):
        freeze_backbone(model, ["no.such.parameter"])
    add_parallel_adapter(model, blocks=1)
    with pytest.raises(ValueError, match="already has"):
        add_parallel_adapter(model, blocks=1)


def test_linear_head_grows_and_keeps_old_rows():
    head = LinearHead(8, num_classes=3)
    old_weight, old_bias = head.weight.detach().clone(), head.bias.detach().clone()
    head.expand(2)
    assert head.num_classes == 5 and head(torch.randn(4, 8)).shape == (4, 5)
    assert torch.equal(head.weight[:3], old_weight) and torch.equal(head.bias[:3], old_bias)
    assert head.weight.requires_grad and head.weight.is_leaf
    empty = LinearHead(8, bias=False)
    assert empty.num_classes == 0
    empty.expand(4)
    assert empty(torch.randn(2, 8)).shape == (2, 4)
    with pytest.raises(ValueError):
        head.expand(0)
