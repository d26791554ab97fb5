"""HeftConfig and HeftSFTConfig refuse wrong types and useless values early, naming the option, the value and the fix.

Nothing is coerced: a truthy string is not True, a bool is not rank 1, a string is not a number.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from peft_heft import HeftConfig, HeftSFTConfig
from peft_heft.tuner.config import MAX_INTERVENTION_POSITIONS


def heft(**kwargs) -> HeftConfig:
    return HeftConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], **kwargs)


def assert_pieces(error: BaseException, pieces) -> None:
    message = str(error)
    for piece in pieces:
        assert piece in message, f"{piece!r} is not in the message {message!r}"


# ------------------------------------------------------------------------------------------------------- HeftConfig

WRONG_TYPES = {
    # the seen bugs: a truthy string became "shared", True became rank 1
    "share-no": ({"share_intervention_weights": "no"}, ["share_intervention_weights", "'no'", "str", "=True", "True"]),
    "share-int": ({"share_intervention_weights": 1}, ["share_intervention_weights", "1 of type int"]),
    "bias-false": ({"intervention_add_bias": "false"}, ["intervention_add_bias", "'false'", "not read as a bool"]),
    "rank-bool": ({"intervention_rank": True}, ["intervention_rank", "True of type bool", "would count as 1"]),
    "rank-str": ({"intervention_rank": "4"}, ["intervention_rank", "'4' of type str", "not a string"]),
    "rank-float": ({"intervention_rank": 2.0}, ["intervention_rank", "2.0 of type float", "not a float"]),
    "dropout-str": ({"intervention_dropout": "0.1"}, ["intervention_dropout", "'0.1' of type str", "=0.1"]),
    "dropout-bool": ({"intervention_dropout": True}, ["intervention_dropout", "True of type bool"]),
    "type-int": ({"intervention_type": 3}, ["intervention_type", "3 of type int", "'loreft'"]),
    "act-int": ({"intervention_act_fn": 1}, ["intervention_act_fn", "1 of type int", "'relu'", "None"]),
    "positions-int": ({"intervention_positions": 7}, ["intervention_positions", "7 of type int", "'f7+l7'"]),
    "component-none": ({"intervention_component": None}, ["intervention_component", "None of type NoneType"]),
    "hidden-bool": ({"base_model_hidden_size": True}, ["base_model_hidden_size", "True of type bool", "None"]),
    "hidden-str": ({"base_model_hidden_size": "12"}, ["base_model_hidden_size", "'12' of type str"]),
    "num-layers-float": ({"base_model_num_layers": 3.0}, ["base_model_num_layers", "3.0 of type float"]),
    "layers-float": ({"intervention_layers": [1.0]}, ["intervention_layers=[1.0]", "1.0 of type float", "[1, 3, -1]"]),
    "layers-bool-item": ({"intervention_layers": [0, True]}, ["True of type bool", "ints"]),
    "layers-str-item": ({"intervention_layers": ["1"]}, ["'1' of type str"]),
    "layers-bool": ({"intervention_layers": True}, ["intervention_layers", "True of type bool", "'all'"]),
    "layers-float-scalar": ({"intervention_layers": 1.5}, ["1.5 of type float"]),
}


@pytest.mark.parametrize("kwargs, pieces", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_heft_config_refuses_wrong_types(kwargs, pieces):
    with pytest.raises(TypeError) as info:
        heft(**kwargs)
    assert_pieces(info.value, pieces)


BAD_VALUES = {
    "rank-zero": ({"intervention_rank": 0}, ["intervention_rank must be a positive int", "0"]),
    "rank-negative": ({"intervention_rank": -2}, ["intervention_rank must be a positive int", "-2"]),
    "hidden-zero": ({"base_model_hidden_size": 0}, ["base_model_hidden_size must be a positive int", "None"]),
    "layers-negative-count": ({"base_model_num_layers": -1}, ["base_model_num_layers", "-1"]),
    "dropout-negative": ({"intervention_dropout": -0.1}, ["intervention_dropout must be in [0, 1)", "-0.1"]),
    "dropout-nan": ({"intervention_dropout": math.nan}, ["intervention_dropout must be in [0, 1)", "nan"]),
    "layers-text": ({"intervention_layers": "1,3"}, ["intervention_layers must be 'all'", "'1,3'", "heft-sft"]),
    "layers-twice": ({"intervention_layers": [1, 2, 1]}, ["intervention_layers=[1, 2, 1]", "layer 1 more than once"]),
    "positions-huge": (
        {"intervention_positions": "f100000000"},
        ["'f100000000'", "100000000 positions", f"at most {MAX_INTERVENTION_POSITIONS}", "gigabytes", "'all'"],
    ),
    "positions-huge-suffix": ({"intervention_positions": "f7+l9000"}, ["'f7+l9000'", "9000 positions", "8192"]),
    "add-bias-loreft": (
        {"intervention_add_bias": True},
        ["intervention_add_bias=True has no effect", "intervention_type='loreft'", "intervention_type='noreft'"],
    ),
    "add-bias-direft": (
        {"intervention_add_bias": True, "intervention_type": "direft"},
        ["intervention_type='direft'", "set it to False"],
    ),
}


@pytest.mark.parametrize("kwargs, pieces", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_heft_config_refuses_bad_values(kwargs, pieces):
    with pytest.raises(ValueError) as info:
        heft(**kwargs)
    assert_pieces(info.value, pieces)


def test_heft_config_keeps_valid_values_of_other_number_types_as_plain_python_values():
    config = heft(
        intervention_layers=(0, np.int64(-1)),
        intervention_rank=np.int64(3),
        intervention_dropout=0,
        base_model_hidden_size=32,
    )
    assert config.intervention_layers == [0, -1] and all(type(i) is int for i in config.intervention_layers)
    assert config.intervention_rank == 3 and type(config.intervention_rank) is int
    assert config.intervention_dropout == 0.0 and type(config.intervention_dropout) is float
    assert heft(intervention_layers=range(2)).intervention_layers == [0, 1]
    assert heft(intervention_layers=2).intervention_layers == [2]
    # the cap itself is allowed, and "all" has no count
    assert heft(intervention_positions=f"f{MAX_INTERVENTION_POSITIONS}").position_spec.first == 8192
    assert heft(intervention_positions="all").position_spec.all


# ---------------------------------------------------------------------------------------------------- HeftSFTConfig


def sft(tmp_path, **kwargs) -> HeftSFTConfig:
    return HeftSFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **kwargs)


LEARNING_RATES = {
    # a global 0 trains nothing in every stage that falls back to it: the first such stage is named
    "global-zero": ({"learning_rate": 0}, ["Stage 'lora'", "falls back to learning_rate=0", "lora_learning_rate > 0"]),
    "global-zero-reft-falls-back": (
        {"learning_rate": 0.0, "lora_learning_rate": 1e-3},
        ["Stage 'reft'", "reft_learning_rate is unset", "learning_rate=0.0", "Set reft_learning_rate > 0"],
    ),
    "global-negative-joint": (
        {"learning_rate": -1e-4, "stage_order": ["joint"]},
        ["Stage 'joint'", "learning_rate=-0.0001", "joint_learning_rate > 0"],
    ),
    "stage-negative": ({"lora_learning_rate": -1e-3}, ["Stage 'lora'", "lora_learning_rate=-0.001", "trains nothing"]),
    "stage-nan": ({"reft_learning_rate": math.nan}, ["Stage 'reft'", "reft_learning_rate=nan", "not a finite"]),
    "unlisted-stage-zero": ({"joint_learning_rate": 0}, ["joint_learning_rate must be > 0", "0"]),
    "warmup-negative": ({"reft_warmup_steps": -1}, ["Stage 'reft'", "warmup -1", "reft_warmup_steps >= 0"]),
}


@pytest.mark.parametrize("kwargs, pieces", LEARNING_RATES.values(), ids=LEARNING_RATES.keys())
def test_heft_sft_config_refuses_a_stage_that_would_train_nothing(tmp_path, kwargs, pieces):
    with pytest.raises(ValueError) as info:
        sft(tmp_path, **kwargs)
    assert_pieces(info.value, pieces)


def test_a_zero_global_learning_rate_is_fine_when_every_listed_stage_has_its_own(tmp_path):
    args = sft(tmp_path, learning_rate=0, lora_learning_rate=1e-3, reft_learning_rate=2e-3)
    assert [args.stage_options(s)["learning_rate"] for s in args.stage_order] == [1e-3, 2e-3]
    # a stage that is not listed never trains, so it may fall back to 0
    assert sft(tmp_path, learning_rate=0, stage_order=["reft"], reft_learning_rate=1e-3).stage_order == ["reft"]


SFT_WRONG_TYPES = {
    "max-steps-str": (
        {"lora_max_steps": "5"},
        ["lora_max_steps must be an int", "'5' of type str", "lora_max_steps=5"],
    ),
    "max-steps-float": ({"reft_max_steps": 2.0}, ["reft_max_steps", "2.0 of type float", "reft_max_steps=2"]),
    "epochs-bool": (
        {"reft_num_train_epochs": True},
        ["reft_num_train_epochs", "True of type bool", "would count as 1", "None to use num_train_epochs"],
    ),
    "lr-str": ({"joint_learning_rate": "1e-3"}, ["joint_learning_rate", "'1e-3' of type str", "=1e-3"]),
    "warmup-bool": ({"lora_warmup_steps": False}, ["lora_warmup_steps", "False of type bool"]),
    "global-lr-str": ({"learning_rate": "2e-4"}, ["learning_rate must be a number", "'2e-4' of type str"]),
    "merge-yes": ({"merge_lora_before_reft": "yes"}, ["merge_lora_before_reft", "'yes' of type str", "True or False"]),
    "merge-int": ({"merge_lora_before_reft": 1}, ["merge_lora_before_reft", "1 of type int"]),
    "stage-int": ({"stage_order": ["lora", 1]}, ["stage_order=['lora', 1]", "1 of type int", "'reft'"]),
    "stage-none": ({"stage_order": None}, ["stage_order must be a list", "None of type NoneType", "['lora', 'reft']"]),
}


@pytest.mark.parametrize("kwargs, pieces", SFT_WRONG_TYPES.values(), ids=SFT_WRONG_TYPES.keys())
def test_heft_sft_config_refuses_wrong_types(tmp_path, kwargs, pieces):
    with pytest.raises(TypeError) as info:
        sft(tmp_path, **kwargs)
    assert_pieces(info.value, pieces)


def test_heft_sft_config_keeps_good_values(tmp_path):
    args = sft(
        tmp_path, stage_order=("Reft", "lora"), lora_max_steps=5, reft_num_train_epochs=2, lora_warmup_steps=0.1
    )
    assert args.stage_order == ["reft", "lora"]
    assert args.stage_options("lora")["max_steps"] == 5 and args.stage_options("reft")["num_train_epochs"] == 2
    assert args.merge_lora_before_reft is False


def test_add_bias_is_kept_where_it_shapes_the_intervention():
    """NoReFT's projection gets its bias; a registered type receives add_bias and decides itself, so it is not refused."""
    import torch

    from peft_heft import register_intervention_type
    from peft_heft.tuner.interventions import INTERVENTION_TYPES, NoreftIntervention, build_intervention

    assert heft(intervention_type="noreft", intervention_add_bias=True).intervention_add_bias is True
    noreft = build_intervention(
        "noreft", hidden_size=8, rank=2, dropout=0.0, dtype=torch.float32, device=None, add_bias=True
    )
    assert noreft.proj_layer.bias is not None

    class MyNoreft(NoreftIntervention):
        pass

    register_intervention_type("my_noreft_with_bias", MyNoreft)
    try:
        assert heft(intervention_type="my_noreft_with_bias", intervention_add_bias=True).intervention_add_bias
    finally:
        INTERVENTION_TYPES.pop("my_noreft_with_bias")
