"""Tests for hybridzo.groups: rule-based param groups from parameter names.

Expected selections are written out by hand (or derived from the layer number
with plain arithmetic), never computed with the code under test.
"""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hybridzo.groups import DEFAULT_LAYER_PATTERN, GroupRule, build_param_groups, describe_groups, layer_index


def fake_named_parameters(names, frozen=()):
    """(name, Parameter) pairs for ``names``; names in ``frozen`` get requires_grad=False."""
    return [(name, nn.Parameter(torch.zeros(2), requires_grad=name not in frozen)) for name in names]


def names_by_group(groups, named):
    """Map group name -> list of parameter names, via tensor identity."""
    name_of = {id(tensor): name for name, tensor in reversed(named)}  # first name wins for tied tensors
    return {group["name"]: [name_of[id(p)] for p in group["params"]] for group in groups}


def open_clip_names(vision_layers=4, text_layers=4):
    vision = [f"visual.transformer.resblocks.{i}.attn.in_proj_weight" for i in range(vision_layers)]
    text = [f"transformer.resblocks.{i}.mlp.c_fc.weight" for i in range(text_layers)]
    return ["visual.class_embedding", "visual.proj", *vision, "token_embedding.weight", *text, "logit_scale"]


def vision_block(i):
    return f"visual.transformer.resblocks.{i}.attn.in_proj_weight"


def text_block(i):
    return f"transformer.resblocks.{i}.mlp.c_fc.weight"


# ---------------------------------------------------------------- layer_index


@pytest.mark.parametrize(
    "name, expected",
    [
        ("visual.transformer.resblocks.0.attn.in_proj_weight", 0),
        ("transformer.resblocks.11.mlp.c_fc.weight", 11),
        ("blocks.7.attn.qkv.weight", 7),
        ("encoder.layer.3.attention.self.query.weight", 3),
        ("model.layers.10.mlp.up_proj.weight", 10),
        ("transformer.h.5.attn.c_attn.weight", 5),
        ("blocks.2.lora_A.0.weight", 2),  # first container token, not the LoRA index
        ("model.layers.4.mlp.experts.7.w1", 4),
        ("moe.experts.1.fc1.weight", None),
        ("fc1.weight", None),
        ("visual.proj", None),
        ("token_embedding.weight", None),
        ("resblocks.0a.weight", None),  # index must be a whole component
        ("myblocks.3.weight", None),  # container must be a whole component
        ("layers", None),
    ],
)
def test_layer_index_default_pattern(name, expected):
    assert layer_index(name) == expected


def test_layer_index_custom_pattern_and_bad_patterns():
    assert layer_index("stage.2.unit.5.conv", r"unit\.(\d+)") == 5
    assert layer_index("stage.2.unit.5.conv", re.compile(r"stage\.(\d+)")) == 2
    assert layer_index("head.weight", r"unit\.(\d+)") is None
    with pytest.raises(ValueError, match="layer_pattern.*exactly one"):
        layer_index("unit.5", r"unit\.\d+")
    with pytest.raises(ValueError, match="layer_pattern.*not a regex"):
        layer_index("unit.5", r"unit\.(\d+")
    with pytest.raises(ValueError, match="layer_pattern.*not a non-negative integer"):
        layer_index("unit.x", r"unit\.(\w)")
    assert DEFAULT_LAYER_PATTERN.groups == 1


# ---------------------------------------------------------- layer patterns


@pytest.mark.parametrize(
    "layers, vision_indices",
    [
        ("hop-odd", [0, 2]),  # layers 1 and 3
        ("hop-even", [1, 3]),  # layers 2 and 4
        ("prefix:1", [0]),
        ("prefix:3", [0, 1, 2]),
        ("suffix:1", [3]),
        ("suffix:3", [1, 2, 3]),
        ("prefix:4", [0, 1, 2, 3]),
    ],
)
def test_layer_patterns_on_open_clip_names(layers, vision_indices):
    named = fake_named_parameters(open_clip_names())
    groups = build_param_groups(named, [GroupRule(branch=r"^visual\.", layers=layers, name="v")])
    expected_vision = [vision_block(i) for i in vision_indices]
    expected_default = [name for name in open_clip_names() if name not in expected_vision]
    assert names_by_group(groups, named) == {"v": expected_vision, "default": expected_default}


def test_all_includes_parameters_without_layer_index():
    named = fake_named_parameters(open_clip_names())
    groups = build_param_groups(named, [GroupRule(branch=r"^visual\.", layers="all", name="v")])
    assert names_by_group(groups, named)["v"] == [
        "visual.class_embedding",
        "visual.proj",
        *[vision_block(i) for i in range(4)],
    ]


def test_two_branches_with_options_and_default():
    named = fake_named_parameters(open_clip_names(vision_layers=3, text_layers=2))
    groups = build_param_groups(
        named,
        rules=[
            GroupRule(r"^visual\.", "hop-odd", {"mode": "zo", "eps": 5e-4, "sign": "coordinate"}, name="vision-zo"),
            GroupRule(r"^transformer\.", "hop-odd", {"mode": "zo", "eps": 1e-3}, name="language-zo"),
        ],
        default={"mode": "fo"},
    )
    assert [{k: v for k, v in group.items() if k != "params"} for group in groups] == [
        {"name": "vision-zo", "mode": "zo", "eps": 5e-4, "sign": "coordinate"},
        {"name": "language-zo", "mode": "zo", "eps": 1e-3},
        {"name": "default", "mode": "fo"},
    ]
    assert names_by_group(groups, named) == {
        "vision-zo": [vision_block(0), vision_block(2)],
        "language-zo": [text_block(0)],
        "default": [
            "visual.class_embedding",
            "visual.proj",
            vision_block(1),
            "token_embedding.weight",
            text_block(1),
            "logit_scale",
        ],
    }


@pytest.mark.parametrize(
    "names, branch",
    [
        ([f"blocks.{i}.attn.qkv.weight" for i in range(5)] + ["cls_token", "head.weight"], r"^blocks\."),
        ([f"encoder.layer.{i}.attention.self.query.weight" for i in range(5)] + ["pooler.dense.weight"], "encoder"),
        ([f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + ["lm_head.weight"], r"\.layers\."),
    ],
    ids=["timm", "hf-bert", "hf-llama"],
)
def test_layer_patterns_on_timm_and_hf_names(names, branch):
    named = fake_named_parameters(names)
    selected = {}
    for layers in ("hop-odd", "hop-even", "prefix:2", "suffix:2"):
        groups = build_param_groups(named, [GroupRule(branch, layers, name="r")])
        selected[layers] = names_by_group(groups, named)["r"]
    assert selected == {
        "hop-odd": [names[0], names[2], names[4]],
        "hop-even": [names[1], names[3]],
        "prefix:2": [names[0], names[1]],
        "suffix:2": [names[3], names[4]],
    }


class TinyNet(nn.Module):
    """A torch module with timm-like names: stem, blocks.N.{fc1,fc2}, head."""

    def __init__(self, depth):
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(4, 4), "fc2": nn.Linear(4, 4)}) for _ in range(depth))
        self.head = nn.Linear(4, 2)


def test_real_module_hop_odd_and_suffix():
    model = TinyNet(depth=5)
    groups = build_param_groups(
        model.named_parameters(),
        [
            GroupRule(r"^blocks\.", "suffix:1", {"mode": "fo"}, name="last"),
            GroupRule(r"^blocks\.", "hop-odd", {"mode": "zo"}, name="odd"),
        ],
        default={"mode": "fo"},
    )
    by_name = {group["name"]: group["params"] for group in groups}
    block = model.blocks
    expected_last = [p for layer in [block[4]] for p in layer.parameters()]
    # layer 5 (index 4) was taken by the first rule, so "odd" keeps layers 1 and 3
    expected_odd = [p for layer in [block[0], block[2]] for p in layer.parameters()]
    expected_default = [
        *model.stem.parameters(),
        *block[1].parameters(),
        *block[3].parameters(),
        *model.head.parameters(),
    ]
    assert [id(p) for p in by_name["last"]] == [id(p) for p in expected_last]
    assert [id(p) for p in by_name["odd"]] == [id(p) for p in expected_odd]
    assert [id(p) for p in by_name["default"]] == [id(p) for p in expected_default]


def test_real_open_clip_model():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=4, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=4),
    )
    groups = build_param_groups(
        model.named_parameters(),
        [
            GroupRule(r"^visual\.", "hop-odd", {"mode": "zo"}, name="vision-zo"),
            GroupRule(r"^transformer\.", "hop-even", {"mode": "zo"}, name="language-zo"),
        ],
        default={"mode": "fo"},
    )
    by_name = {group["name"]: group["params"] for group in groups}
    vision_expected = [
        *model.visual.transformer.resblocks[0].parameters(),
        *model.visual.transformer.resblocks[2].parameters(),
    ]
    text_expected = [
        *model.transformer.resblocks[1].parameters(),
        *model.transformer.resblocks[3].parameters(),
    ]
    chosen = {id(p) for p in vision_expected + text_expected}
    default_expected = [p for p in model.parameters() if id(p) not in chosen]
    assert [id(p) for p in by_name["vision-zo"]] == [id(p) for p in vision_expected]
    assert [id(p) for p in by_name["language-zo"]] == [id(p) for p in text_expected]
    assert [id(p) for p in by_name["default"]] == [id(p) for p in default_expected]
    assert [g["mode"] for g in groups] == ["zo", "zo", "fo"]


# ------------------------------------------------------- complementarity


def selected_indices(layers, num_layers, branch=r"^blocks\."):
    names = [f"blocks.{i}.weight" for i in range(num_layers)] + ["head.weight"]
    named = fake_named_parameters(names)
    groups = build_param_groups(named, [GroupRule(branch, layers, name="r")])
    return [layer_index(name) for name in names_by_group(groups, named)["r"]]


def test_hop_odd_even_complementary_and_numbered_from_one():
    odd, even = selected_indices("hop-odd", 6), selected_indices("hop-even", 6)
    assert odd == [0, 2, 4]  # layers 1, 3, 5: index 0 is layer 1
    assert even == [1, 3, 5]
    assert sorted(odd + even) == list(range(6))


def test_prefix_and_suffix_complement():
    for k in range(1, 6):
        assert sorted(selected_indices(f"prefix:{k}", 6) + selected_indices(f"suffix:{6 - k}", 6)) == list(range(6))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_layers=st.integers(min_value=1, max_value=24))
def test_layer_pattern_properties(data, num_layers):
    k = data.draw(st.integers(min_value=1, max_value=num_layers), label="K")
    layer_numbers = lambda layers: [i + 1 for i in selected_indices(layers, num_layers)]  # noqa: E731
    odd = layer_numbers("hop-odd")
    even = layer_numbers("hop-even") if num_layers > 1 else []
    assert set(odd).isdisjoint(even)
    assert sorted(odd + even) == list(range(1, num_layers + 1))
    assert all(n % 2 == 1 for n in odd)
    prefix = layer_numbers(f"prefix:{k}")
    assert len(prefix) == k and prefix == list(range(1, k + 1))
    assert layer_numbers(f"suffix:{k}") == list(range(num_layers - k + 1, num_layers + 1))


# -------------------------------------------------------------- assignment


def test_frozen_parameters_excluded_but_counted_for_layers():
    names = [f"blocks.{i}.adapter.weight" for i in range(2)] + [f"blocks.{i}.attn.weight" for i in range(6)]
    frozen = {f"blocks.{i}.attn.weight" for i in range(6)}
    named = fake_named_parameters(names, frozen=frozen)
    # 6 backbone layers (frozen) set the depth: suffix:5 is layers 2..6, so only adapter index 1
    groups = build_param_groups(named, [GroupRule("blocks", "suffix:5", name="r")])
    assert names_by_group(groups, named) == {"r": ["blocks.1.adapter.weight"], "default": ["blocks.0.adapter.weight"]}
    assert all(p.requires_grad for group in groups for p in group["params"])


def test_counts_only_parameters_passed_in():
    adapters = fake_named_parameters([f"blocks.{i}.adapter.weight" for i in range(3)])
    groups = build_param_groups(adapters, [GroupRule("blocks", "suffix:1", name="r")])
    assert names_by_group(groups, adapters)["r"] == ["blocks.2.adapter.weight"]


def test_layer_count_is_highest_index_plus_one():
    # adapters on layers 2 and 4 only: the branch has 4 layers, not 2
    adapters = fake_named_parameters(["blocks.1.adapter.weight", "blocks.3.adapter.weight"])
    groups = build_param_groups(adapters, [GroupRule("blocks", "suffix:2", name="r")])
    assert names_by_group(groups, adapters) == {"r": ["blocks.3.adapter.weight"], "default": ["blocks.1.adapter.weight"]}


def test_default_group_omitted_when_empty_and_default_options():
    named = fake_named_parameters(["blocks.0.w", "blocks.1.w"])
    groups = build_param_groups(named, [GroupRule("", "all", {"mode": "zo"}, name="everything")], default={"mode": "fo"})
    assert [g["name"] for g in groups] == ["everything"]
    only_default = build_param_groups(named, [], default={"mode": "fo", "lr": 0.1})
    assert [{k: v for k, v in g.items() if k != "params"} for g in only_default] == [
        {"name": "default", "mode": "fo", "lr": 0.1}
    ]
    assert build_param_groups(named, [])[0].keys() == {"params", "name"}
    assert build_param_groups([], []) == []


def test_first_rule_wins_and_default_names():
    named = fake_named_parameters([f"blocks.{i}.w" for i in range(4)])
    groups = build_param_groups(named, [GroupRule("blocks", "prefix:2"), GroupRule("blocks", "all")])
    assert names_by_group(groups, named) == {
        "rule0": ["blocks.0.w", "blocks.1.w"],
        "rule1": ["blocks.2.w", "blocks.3.w"],
    }


def test_parameter_order_preserved():
    names = ["z.blocks.3.w", "a.blocks.0.w", "m.blocks.2.w", "b.blocks.1.w", "head"]
    named = fake_named_parameters(names)
    groups = build_param_groups(named, [GroupRule("blocks", "all", name="r")])
    assert names_by_group(groups, named) == {"r": names[:4], "default": ["head"]}


def test_tied_weights_appear_once():
    shared = nn.Parameter(torch.zeros(3))
    other = nn.Parameter(torch.zeros(3))
    named = [("token_embedding.weight", shared), ("blocks.0.w", other), ("lm_head.weight", shared)]
    groups = build_param_groups(named, [GroupRule("lm_head", "all", name="head")])
    # the first rule selecting the tensor under any name takes it; a later rule gets nothing
    with pytest.raises(ValueError, match=r"'head' \(#1\).*already taken"):
        build_param_groups(named, [GroupRule("token", "all", name="emb"), GroupRule("lm_head", "all", name="head")])
    assert [id(p) for p in groups[0]["params"]] == [id(shared)]
    assert [id(p) for p in groups[1]["params"]] == [id(other)]
    all_params = [p for group in build_param_groups(named, []) for p in group["params"]]
    assert [id(p) for p in all_params] == [id(shared), id(other)]


def test_tied_weight_within_one_rule_appears_once():
    shared = nn.Parameter(torch.zeros(3))
    named = [("blocks.0.w", shared), ("blocks.1.w", shared), ("blocks.2.w", nn.Parameter(torch.zeros(3)))]
    groups = build_param_groups(named, [GroupRule("blocks", "all", name="r")])
    assert len(groups) == 1 and len(groups[0]["params"]) == 2


def test_custom_layer_pattern():
    names = [f"stage.{i}.unit.conv.weight" for i in range(4)] + ["fc.weight"]
    named = fake_named_parameters(names)
    groups = build_param_groups(named, [GroupRule("stage", "hop-even", name="r")], layer_pattern=r"stage\.(\d+)")
    assert names_by_group(groups, named)["r"] == [names[1], names[3]]
    with pytest.raises(ValueError, match="'r' \\(#0\\).*selects no trainable parameter"):
        build_param_groups(named, [GroupRule("stage", "hop-even", name="r")])  # default pattern: no index


def test_num_layers_override():
    adapters = fake_named_parameters([f"blocks.{i}.adapter.weight" for i in range(3)])
    as_int = build_param_groups(adapters, [GroupRule("blocks", "suffix:2", name="r")], num_layers=4)
    assert names_by_group(as_int, adapters)["r"] == ["blocks.2.adapter.weight"]  # layers 3..4 of 4
    as_mapping = build_param_groups(
        adapters,
        [GroupRule("blocks", "suffix:2", name="r"), GroupRule("blocks", "all", name="rest")],
        num_layers={"r": 4},
    )
    assert names_by_group(as_mapping, adapters) == {
        "r": ["blocks.2.adapter.weight"],
        "rest": ["blocks.0.adapter.weight", "blocks.1.adapter.weight"],
    }


def test_num_layers_errors():
    named = fake_named_parameters([f"blocks.{i}.w" for i in range(3)])
    rule = GroupRule("blocks", "all", name="r")
    with pytest.raises(ValueError, match=r"num_layers: 2 for rule 'r' \(#0\).*index 2"):
        build_param_groups(named, [rule], num_layers=2)
    with pytest.raises(ValueError, match="num_layers: key 'typo' names no rule"):
        build_param_groups(named, [rule], num_layers={"typo": 3})
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="num_layers.*positive int"):
            build_param_groups(named, [rule], num_layers=bad)


def test_options_are_copied():
    options = {"mode": "zo"}
    rule = GroupRule("", "all", options, name="r")
    options["mode"] = "fo"
    groups = build_param_groups(fake_named_parameters(["w"]), [rule])
    groups[0]["mode"] = "changed"
    assert rule.options["mode"] == "zo"
    with pytest.raises(TypeError):
        rule.options["mode"] = "fo"


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layers="hop-3", name="v"), r"Invalid layers: 'hop-3' in rule 'v'"),
        (dict(layers="prefix:0", name="v"), r"Invalid layers: 'prefix:0' in rule 'v'"),
        (dict(layers="suffix:-2", name="v"), r"Invalid layers: 'suffix:-2' in rule 'v'"),
        (dict(layers="prefix:x"), r"Invalid layers: 'prefix:x' in unnamed rule"),
        (dict(layers="odd", name="v"), r"Invalid layers: 'odd' in rule 'v'.*'hop-odd'"),
        (dict(branch="visual.(", name="v"), r"Invalid branch: 'visual.\(' in rule 'v' is not a regex"),
        (dict(options={"params": []}, name="v"), r"Invalid options: key 'params' in rule 'v'"),
        (dict(options={"name": "x"}, name="v"), r"Invalid options: key 'name' in rule 'v'"),
        (dict(name=""), r"Invalid name: ''"),
    ],
)
def test_rule_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupRule(**kwargs)


def test_branch_matching_nothing():
    named = fake_named_parameters(open_clip_names())
    rules = [GroupRule(r"^visual\.", "all", name="v"), GroupRule(r"^audio\.", "hop-odd", name="audio")]
    with pytest.raises(ValueError, match=r"Invalid branch: '\^audio\\\\.' in rule 'audio' \(#1\) matches no parameter"):
        build_param_groups(named, rules)


def test_layer_pattern_selecting_nothing():
    named = fake_named_parameters(["visual.proj", "visual.class_embedding"])
    with pytest.raises(ValueError, match=r"Invalid layers: 'hop-odd' in rule 'v' \(#0\) selects no trainable"):
        build_param_groups(named, [GroupRule(r"^visual\.", "hop-odd", name="v")])
    frozen = fake_named_parameters(["blocks.0.w", "blocks.1.w"], frozen={"blocks.0.w"})
    with pytest.raises(ValueError, match=r"Invalid layers: 'prefix:1' in rule 'rule0' \(#0\) selects no trainable"):
        build_param_groups(frozen, [GroupRule("blocks", "prefix:1")])


@pytest.mark.parametrize("layers", ["prefix:5", "suffix:5"])
def test_prefix_suffix_larger_than_layer_count(layers):
    named = fake_named_parameters(open_clip_names(vision_layers=4))
    with pytest.raises(ValueError, match=rf"Invalid layers: '{layers}' in rule 'v' \(#0\) asks for 5 layers.* has 4"):
        build_param_groups(named, [GroupRule(r"^visual\.", layers, name="v")])


def test_hop_even_on_single_layer_branch():
    named = fake_named_parameters(open_clip_names(vision_layers=1))
    with pytest.raises(ValueError, match=r"Invalid layers: 'hop-even' in rule 'v' \(#0\).* 1 layer"):
        build_param_groups(named, [GroupRule(r"^visual\.", "hop-even", name="v")])


def test_rule_fully_shadowed_by_earlier_rule():
    named = fake_named_parameters([f"blocks.{i}.w" for i in range(4)])
    rules = [GroupRule("blocks", "all", name="a"), GroupRule("blocks", "hop-odd", name="b")]
    with pytest.raises(ValueError, match=r"Invalid branch/layers: .* in rule 'b' \(#1\).*already taken"):
        build_param_groups(named, rules)


def test_duplicate_rule_names_and_bad_arguments():
    named = fake_named_parameters(["blocks.0.w"])
    with pytest.raises(ValueError, match=r"Invalid name: 'rule1' of rule #1 repeats the name of rule #0"):
        build_param_groups(named, [GroupRule("blocks", name="rule1"), GroupRule("blocks")])
    with pytest.raises(ValueError, match="Invalid default: key 'params'"):
        build_param_groups(named, [], default={"params": []})
    with pytest.raises(TypeError, match=r"rules\[0\] is a dict"):
        build_param_groups(named, [{"branch": "blocks"}])
    with pytest.raises(ValueError, match="layer_pattern.*exactly one"):
        build_param_groups(named, [], layer_pattern=r"blocks\.\d+")


# ---------------------------------------------------------------- describe


def test_describe_groups():
    groups = [
        {"params": [torch.zeros(3, 4), torch.zeros(1000)], "name": "vision-zo", "mode": "zo"},
        {"params": [torch.zeros(5)], "mode": "fo"},
    ]
    lines = describe_groups(groups).splitlines()
    assert [line.split() for line in lines] == [
        ["group", "mode", "tensors", "elements"],
        ["vision-zo", "zo", "2", "1,012"],
        ["group1", "fo", "1", "5"],
        ["total", "3", "1,017"],
    ]
