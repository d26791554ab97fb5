import json
import subprocess
import sys

import pytest
from peft import LoraConfig, PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import peft_heft
from peft_heft import HeftConfig, HeftModel
from peft_heft.registration import _add_enum_member, register_heft


def test_heft_is_a_peft_type_and_registration_is_idempotent():
    assert PeftType("HEFT") is PeftType.HEFT
    assert PeftType.HEFT == "HEFT"
    register_heft()
    register_heft()
    assert list(PeftType).count(PeftType.HEFT) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING["HEFT"] is HeftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HEFT] is HeftModel
    assert _add_enum_member(PeftType, "HEFT", "HEFT") is PeftType.HEFT


def test_second_import_in_fresh_interpreter_is_harmless():
    code = "import importlib, peft_heft, peft_heft.registration as r; r.register_heft(); importlib.reload(r); r.register_heft(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_config_keeps_every_lora_option_and_sets_peft_type():
    config = HeftConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules=["q_proj"],
        use_rslora=True,
        use_dora=True,
        layers_to_transform=[0, 1],
        modules_to_save=["lm_head"],
    )
    assert config.peft_type == PeftType.HEFT
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.use_rslora, config.use_dora) == (16, 32, True, True)
    assert config.layers_to_transform == [0, 1]


def test_config_roundtrip_through_json(tmp_path):
    config = HeftConfig(
        task_type="CAUSAL_LM",
        target_modules=["q_proj"],
        intervention_layers=[0, -1],
        intervention_type="noreft",
        intervention_rank=3,
        intervention_positions="f5+l2",
        share_intervention_weights=True,
        intervention_dropout=0.05,
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HEFT"
    for key in (
        "intervention_layers",
        "intervention_type",
        "intervention_rank",
        "intervention_positions",
        "intervention_component",
        "share_intervention_weights",
        "intervention_dropout",
    ):
        assert key in saved
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, HeftConfig)
    assert loaded.intervention_layers == [0, -1]
    assert loaded.intervention_positions == "f5+l2"
    assert loaded.share_intervention_weights is True
    assert loaded.num_position_groups == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"intervention_positions": "f7l7"}, "Unknown intervention_positions"),
        ({"intervention_positions": "middle"}, "Unknown intervention_positions"),
        ({"intervention_positions": "f0"}, "selects no token"),
        ({"intervention_rank": 0}, "intervention_rank must be a positive int"),
        ({"intervention_type": "nope"}, "Unknown intervention_type 'nope'"),
        ({"intervention_component": "mlp_output"}, "intervention_component 'mlp_output' is not supported"),
        ({"intervention_dropout": 1.0}, "intervention_dropout must be in"),
        ({"intervention_layers": "some"}, "intervention_layers must be 'all'"),
        ({"intervention_layers": []}, "non-empty list"),
        ({"intervention_act_fn": "wiggle"}, "Unknown intervention_act_fn"),
    ],
)
def test_bad_config_is_refused_early(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HeftConfig(target_modules=["q_proj"], **kwargs)


def test_positions_groups():
    assert HeftConfig(intervention_positions="f7+l7").num_position_groups == 2
    assert HeftConfig(intervention_positions="f7+l7", share_intervention_weights=True).num_position_groups == 1
    assert HeftConfig(intervention_positions="l3").num_position_groups == 1
    assert HeftConfig(intervention_layers=3).intervention_layers == [3]


def test_public_api_exports():
    for name in ("HeftConfig", "HeftModel", "register_intervention_type", "LoreftIntervention"):
        assert hasattr(peft_heft, name)
