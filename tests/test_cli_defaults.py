"""What a `heft-sft` user expects: layers parsed as written, a precision that works on the machine, and the model
weights that were named (the embedded copy only when asked for, or when the hub cannot be reached). No network."""

from __future__ import annotations

import logging

import huggingface_hub
import pytest
import torch

from peft_heft import cli
from peft_heft.assets import DEFAULT_MODEL, EMBEDDED_MODEL, resolve_model_name_or_path
from peft_heft.assets import model as model_module


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any hub request fails the test unless the test replaces it; offline flags start unset."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to contact the hub")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


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


# --------------------------------------------------------------------------------------------------- model weights


@pytest.fixture
def embedded(monkeypatch, tmp_path):
    """A stand-in for the converted embedded copy, so no conversion runs."""
    folder = tmp_path / "embedded-copy"
    folder.mkdir()
    monkeypatch.setattr(model_module, "embedded_model_dir", lambda convert=True: folder)
    monkeypatch.setattr(model_module, "_embedded_available", lambda: True)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    return str(folder)


@pytest.mark.parametrize("name", [EMBEDDED_MODEL, "embedded:SmolLM2-135M-Instruct", "Embedded:smollm2-135m-instruct"])
def test_the_embedded_copy_is_loaded_when_asked_for_and_the_log_says_so(embedded, caplog, name):
    with caplog.at_level(logging.INFO, logger="peft_heft"):
        assert resolve_model_name_or_path(name) == embedded
    assert embedded in caplog.text and "embedded Q4_1-dequantized copy" in caplog.text


def test_an_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"Unknown embedded model 'embedded:llama'.*\['embedded:smollm2-135m-instruct'\]"
    ):
        resolve_model_name_or_path("embedded:llama")


def test_the_hub_id_means_the_hub_weights_when_the_hub_answers(embedded, monkeypatch, caplog):
    asked = []
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, **k: asked.append(url) or object())
    with caplog.at_level(logging.INFO, logger="peft_heft"):
        assert resolve_model_name_or_path(DEFAULT_MODEL) == DEFAULT_MODEL
    assert len(asked) == 1 and "SmolLM2-135M-Instruct" in asked[0]
    assert "from the hub" in caplog.text and "embedded" not in caplog.text


def _httpx_connect_error():
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client
    return httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")


UNREACHABLE = {
    "connection": lambda: ConnectionError("network is unreachable"),
    "timeout": lambda: TimeoutError("timed out"),
    "httpx-connect": _httpx_connect_error,
}


@pytest.mark.parametrize("make_error", UNREACHABLE.values(), ids=UNREACHABLE.keys())
def test_the_embedded_copy_stands_in_when_the_hub_cannot_be_reached(embedded, monkeypatch, caplog, make_error):
    error = make_error()

    def unreachable(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    with caplog.at_level(logging.WARNING, logger="peft_heft"):
        assert resolve_model_name_or_path(DEFAULT_MODEL) == embedded
    assert "embedded Q4_1-dequantized copy" in caplog.text and "could not be reached" in caplog.text
    assert type(error).__name__ in caplog.text and EMBEDDED_MODEL in caplog.text


def test_an_answer_from_the_hub_is_not_a_reason_to_swap_weights(embedded, monkeypatch):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx2.Response(503, request=httpx2.Request("HEAD", "https://huggingface.co/x"))

    def server_error(*args, **kwargs):
        raise HfHubHTTPError("503 Service Unavailable", response=response)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", server_error)
    assert resolve_model_name_or_path(DEFAULT_MODEL) == DEFAULT_MODEL  # from_pretrained reports the hub's error


@pytest.mark.parametrize("flag", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_mode_uses_the_embedded_copy_without_a_request(embedded, monkeypatch, caplog, flag):
    monkeypatch.setenv(flag, "1")
    with caplog.at_level(logging.WARNING, logger="peft_heft"):
        assert resolve_model_name_or_path(DEFAULT_MODEL) == embedded
    assert "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)" in caplog.text
    assert "embedded Q4_1-dequantized copy" in caplog.text


def test_offline_with_the_real_model_in_the_hf_cache_uses_the_cached_weights(embedded, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/hf-cache/config.json")
    with caplog.at_level(logging.INFO, logger="peft_heft"):
        assert resolve_model_name_or_path(DEFAULT_MODEL) == DEFAULT_MODEL
    assert "from the HF cache" in caplog.text and "embedded" not in caplog.text


@pytest.mark.parametrize(
    "name", ["./missing-model", "../missing-model", "/nonexistent/model", "~/missing-heft-model", "a/b/c"]
)
def test_a_local_path_that_does_not_exist_fails_early_naming_it(name):
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_name_or_path(name)
    assert f"Model folder {name!r} does not exist" in str(info.value) and "hub id (org/name)" in str(info.value)


def test_an_org_name_id_stays_a_hub_id_and_a_file_is_not_a_model_folder(tmp_path):
    assert resolve_model_name_or_path("someone/other-model") == "someone/other-model"  # not asked about: not ours
    weights = tmp_path / "model.gguf"
    weights.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a model folder"):
        resolve_model_name_or_path(str(weights))


def test_heft_sft_refuses_a_missing_model_folder_before_loading_data(tmp_path):
    args = ["--model_name_or_path", str(tmp_path / "nope"), "--dataset_name", str(tmp_path / "not-read.jsonl")]
    with pytest.raises(FileNotFoundError, match="nope' does not exist"):
        cli.train_from_args([*args, "--output_dir", str(tmp_path / "o"), "--report_to", "none"])


def test_heft_sft_help_names_the_embedded_model(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    assert "embedded:smollm2-135m-instruct" in capsys.readouterr().out
