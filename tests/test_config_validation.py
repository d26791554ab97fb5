"""HeftConfig refuses wrong types and useless values early, naming the option, the value and the fix.

Nothing is coerced: a truthy string is not True, a bool is not rank 1, a string is not a number.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from peft_heft import HeftConfig
from peft_heft.config import MAX_INTERVENTION_POSITIONS


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
