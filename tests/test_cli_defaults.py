"""What a `heft-sft` user expects: layers parsed as written and a precision that works on the machine."""

from __future__ import annotations

import logging

import pytest
import torch

from peft_heft import cli

# ------------------------------------------------------------------------------------------- --intervention_layers

PARSED = {
    "space": ("1 3", [1, 3]),  # the bug: this trained layer 13
    "comma": ("1,3", [1, 3]),
    "comma-space": ("1, 3", [1, 3]),
    "brackets": ("[1, 3]", [1, 3]),
    "negative": ("-1", -1),
    "negatives": ("-2 -1", [-2, -1]),
    "one": ("3", 3),
    "one-bracketed": ("[3]", [3]),
    "all": ("all", "all"),
    "unquoted-words": (["1", "3"], [1, 3]),  # `--intervention_layers 1 3`
    "unquoted-brackets": (["[1,", "3]"], [1, 3]),  # `--intervention_layers [1, 3]` split by the shell
    "yaml-list": ([0, -1], [0, -1]),
    "yaml-int": (2, 2),
}


@pytest.mark.parametrize("value, expected", PARSED.values(), ids=PARSED.keys())
def test_intervention_layers_text_parses_as_written(value, expected):
    assert cli.parse_layers(value) == expected


REFUSED = {
    "range": ("1-3", ["'1-3'", "range is not expanded"]),
    "semicolon": ("1;3", ["'1;3'", "not one layer index"]),
    "float": ("1.0", ["'1.0'"]),
    "empty-entry": ("1,,3", ["'1,,3'", "empty entry"]),
    "mixed-separators": ("1 2, 3", ["'1 2, 3'", "split on commas", "'1 2'"]),
    "underscore": ("1_3", ["'1_3'"]),  # int() would read 13
    "unbalanced": ("[1, 3", ["unbalanced"]),
    "nothing": ("", ["names no layer"]),
    "yaml-float": ([1.0], ["1.0 (float)"]),
    "yaml-bool": ([True], ["True (bool)"]),
}


@pytest.mark.parametrize("value, pieces", REFUSED.values(), ids=REFUSED.keys())
def test_ambiguous_intervention_layers_are_refused_with_the_accepted_forms(value, pieces):
    with pytest.raises(ValueError) as info:
        cli.parse_layers(value)
    for piece in [*pieces, "--intervention_layers", "'1 3', '1,3' or '[1, 3]'"]:
        assert piece in str(info.value)


@pytest.mark.parametrize("flags, expected", [(["1", "3"], [1, 3]), (["1 3"], [1, 3]), (["-1"], [-1]), ([], "all")])
def test_the_parser_hands_the_layers_to_heft_config(tmp_path, flags, expected):
    args = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "true", "--bf16", "false"]
    _, _, model_args, heft_args = cli.parse_args(args + (["--intervention_layers", *flags] if flags else []))
    model_args.lora_target_modules = ["q_proj"]
    assert cli.build_heft_config(model_args, heft_args).intervention_layers == expected


# ------------------------------------------------------------------------------------------------------- precision

BASE = ["--output_dir", "out", "--report_to", "none"]


@pytest.mark.parametrize("supported", [False, True])
def test_without_precision_flags_bf16_follows_the_hardware_and_is_logged(monkeypatch, caplog, supported):
    monkeypatch.setattr(cli, "_hardware_supports_bf16", lambda: supported)
    parser = cli.build_parser()
    with caplog.at_level(logging.INFO, logger="peft_heft"):
        assert cli._default_precision(parser, BASE) is supported
    assert parser.get_default("bf16") is supported
    assert ("bf16 mixed precision" if supported else "float32, bf16 off") in caplog.text


EXPLICIT = {
    "bf16": ["--bf16", "false"],
    "bf16-equals": ["--bf16=true"],
    "fp16": ["--fp16", "false"],
    "use-cpu": ["--use_cpu", "true"],
    "use-cpu-dashes": ["--use-cpu", "true"],
}


@pytest.mark.parametrize("flags", EXPLICIT.values(), ids=EXPLICIT.keys())
def test_an_explicit_precision_option_is_left_to_the_user(monkeypatch, flags):
    monkeypatch.setattr(cli, "_hardware_supports_bf16", lambda: pytest.fail("the hardware must not be asked"))
    parser = cli.build_parser()
    assert cli._default_precision(parser, BASE + flags) is None
    assert parser.get_default("bf16") is None  # TRL's own default (bf16 unless fp16) applies


def test_a_precision_key_in_the_yaml_counts_as_explicit(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_hardware_supports_bf16", lambda: pytest.fail("the hardware must not be asked"))
    config = tmp_path / "heft.yaml"
    config.write_text("bf16: false\noutput_dir: out\n")
    assert cli._default_precision(cli.build_parser(), ["--config", str(config)]) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_on_cpu_the_parsed_config_trains_in_float32_and_an_explicit_bf16_still_errors(tmp_path):
    _, training_args, _, _ = cli.parse_args(["--output_dir", str(tmp_path), "--report_to", "none"])
    assert training_args.bf16 is False and training_args.fp16 is False
    with pytest.raises(ValueError, match="Your setup doesn't support bf16/gpu"):
        cli.parse_args(["--output_dir", str(tmp_path), "--report_to", "none", "--bf16", "true"])
