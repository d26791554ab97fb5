"""No save is ever lost: SIGKILL at random moments of a StagedSFTTrainer.save_model loop, and interrupted saves
finished or cleaned up; config edits and damaged files refused on load with the file named."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import heft_config, tiny_llama
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_heft.persistence import COMMIT_MARKER, STAGING_PREFIX

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("seed", [1234])
def test_sigkill_during_save_loop_never_loses_the_adapter(tmp_path, seed):
    """20 SIGKILLs at random moments of a save loop: after each, the folder loads as the old adapter or the new one
    (never neither, never a mix), and a later save cleans up what the killed ones left."""
    out = str(tmp_path / "adapter")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    run = subprocess.run(
        [sys.executable, str(TESTS / "save_kill_harness.py"), out, "20", str(seed)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    rounds = [line for line in lines if "round" in line]
    assert len(rounds) == 20
    checked = [r for r in rounds if r["last_complete"] is not None]
    assert len(checked) >= 19
    outcomes = []
    for r in checked:
        assert r["loaded"] is not None and len(r["loaded"]) == 1, r  # one save, not a mix
        outcomes.append(r["loaded"][0] - r["last_complete"])
        assert outcomes[-1] in (0, 1), r  # the old adapter or the one being written
        assert len(r["litter"]) <= 1, r  # at most the save the kill cut short: the next save removes it
    # many kills landed inside a save (its staging folder was left behind), so the checks above saw real cut saves
    assert sum(1 for r in checked if r["litter"]) >= 5, rounds


def _saved_adapter(tmp_path, **overrides):
    model = get_peft_model(tiny_llama(), heft_config(**overrides))
    model.base_model.set_stage("reft")
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return model, folder


def test_committed_staging_folder_is_finished_on_load_and_incomplete_one_is_not_used(tmp_path):
    model, folder = _saved_adapter(tmp_path)
    # a save killed after its commit marker, before its files moved in: weights changed, config changed too
    staged_model, staged_folder = _saved_adapter(tmp_path / "other", intervention_positions="f3+l3")
    staging = folder / f"{STAGING_PREFIX}999999-abc"
    staging.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (staging / name).write_bytes((staged_folder / name).read_bytes())
    (staging / COMMIT_MARKER).write_text("complete\n")
    incomplete = folder / f"{STAGING_PREFIX}999998-def"
    incomplete.mkdir()
    (incomplete / "adapter_config.json").write_text("{")
    loaded = PeftModel.from_pretrained(tiny_llama(), str(folder))
    assert loaded.peft_config["default"].intervention_positions == "f3+l3"  # the committed save won
    assert not staging.exists()
    assert incomplete.exists()  # a reader never deletes a save that may still be in progress


def _saved_adapter_with_local_base(tmp_path):
    """A saved adapter, the base model saved beside it, the adapter config's path and its parsed content."""
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    _, folder = _saved_adapter(tmp_path)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    return base, folder, path, config


def test_settings_are_recorded_in_the_saved_config(tmp_path):
    _, folder = _saved_adapter(tmp_path)
    settings = json.loads((folder / "adapter_config.json").read_text())["saved_settings"]
    assert settings["intervention_positions"] == "f2+l2"
    assert settings["intervention_type"] == "loreft"
    assert settings["intervention_layers"] == [1, -1]
    assert settings["intervention_rank"] == 2 and settings["r"] == 4


@pytest.mark.parametrize(
    "field, value, recorded",
    [
        ("intervention_positions", "f3+l3", "'f2+l2'"),
        ("intervention_type", "direft", "'loreft'"),
        ("lora_alpha", 16, "8"),
        ("share_intervention_weights", True, "False"),
        ("intervention_layers", [1, 2], "[1, -1]"),
    ],
)
@pytest.mark.parametrize("loader", ["PeftModel", "AutoPeftModel", "PeftConfig"])
def test_edited_config_that_disagrees_with_its_weights_is_refused(tmp_path, field, value, recorded, loader):
    base, folder, path, config = _saved_adapter_with_local_base(tmp_path)
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        if loader == "PeftModel":
            PeftModel.from_pretrained(base, str(folder))
        elif loader == "AutoPeftModel":
            AutoPeftModelForCausalLM.from_pretrained(str(folder))
        else:
            import peft_heft

            peft_heft.HeftConfig.from_pretrained(str(folder))
    text = str(info.value)
    # PEFT's AutoPeftModel reads the config through PeftConfig, which names no file to HEFT: the message names the file
    where = "adapter_config.json" if loader == "AutoPeftModel" else str(path)
    assert f"{where} does not match the weights" in text
    assert f"{field}: adapter_config.json has {value!r}, the weights were saved with {recorded}" in text
    assert "Restore the config" in text


def test_config_edited_in_code_after_loading_saves_and_loads(tmp_path):
    """The record is checked once, when a saved config is read: a config changed in code is saved with a new one."""
    base, folder, path, config = _saved_adapter_with_local_base(tmp_path)
    loaded = PeftConfig.from_pretrained(str(folder))
    assert loaded.saved_settings is None  # checked, then cleared: dataclasses.replace / edits never trip it
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    model.base_model.replace_interventions(intervention_positions="f3+l3")
    model.save_pretrained(tmp_path / "edited")
    again = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "edited"))
    assert again.peft_config["default"].intervention_positions == "f3+l3"


def test_settings_recorded_by_earlier_builds_in_the_weights_metadata_are_still_checked(tmp_path):
    base, folder, path, config = _saved_adapter_with_local_base(tmp_path)
    recorded = config.pop("saved_settings")
    weights = folder / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt", "heft_settings": json.dumps(recorded)})
    config["intervention_positions"] = "f3+l3"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="intervention_positions: adapter_config.json has 'f3\\+l3', the weights"):
        PeftModel.from_pretrained(base, str(folder))


def test_extra_lora_tensor_in_the_weights_is_refused(tmp_path):
    _, folder = _saved_adapter(tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key.replace("q_proj", "k_proj")] = weights[key].clone()
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(tiny_llama(), str(folder))
    assert "1 unexpected LoRA or intervention weight(s)" in str(info.value) and "k_proj" in str(info.value)
    assert "nothing was dropped" in str(info.value)


def test_edited_rank_without_metadata_names_the_tensor_and_both_shapes(tmp_path):
    _, folder = _saved_adapter(tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})  # an older save, unstamped
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    del config["saved_settings"]  # with no record of its settings, the shape check still names the tensor
    config["r"] = 6
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(tiny_llama(), str(folder))
    text = str(info.value)
    assert "tensor(s) of another shape" in text and "(4, 32) in the file, (6, 32) from the config" in text
    assert "r=6" in text and "restore the config" in text


def test_adapter_config_with_a_json_syntax_error_gets_pefts_own_error(tmp_path):
    """PEFT reads adapter_config.json (and decides its method) before HEFT's code runs: a syntax error is PEFT's
    JSONDecodeError, as for every PEFT method. peft-heft once wrapped PeftConfig.from_json_file to name the file; it
    patches nothing upstream now."""
    _, folder = _saved_adapter(tmp_path)
    path = folder / "adapter_config.json"
    path.write_text(path.read_text().replace('"r":', '"r"', 1))
    for load in (
        lambda: PeftModel.from_pretrained(tiny_llama(), str(folder)),
        lambda: PeftConfig.from_pretrained(str(folder)),
    ):
        with pytest.raises(json.JSONDecodeError):
            load()


def test_pickles_and_bad_weights_are_refused_on_every_loading_path(tmp_path):
    base, folder, path, config = _saved_adapter_with_local_base(tmp_path)
    path.write_text(json.dumps(config))
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    # HeftConfig.from_pretrained checks the folder before anything reads it; PeftModel.from_pretrained (without a
    # config) and AutoPeftModel (which passes none on) build the config with it
    for load in (
        lambda: PeftModel.from_pretrained(tiny_llama(), str(folder)),
        lambda: AutoPeftModelForCausalLM.from_pretrained(str(folder)),
    ):
        with pytest.raises(ValueError, match="is not a readable safetensors file"):
            load()
    (folder / "adapter_model.safetensors").unlink()
    torch.save({}, folder / "adapter_model.bin")
    for load in (
        lambda: PeftModel.from_pretrained(tiny_llama(), str(folder)),
        lambda: AutoPeftModelForCausalLM.from_pretrained(str(folder)),
    ):
        with pytest.raises(ValueError, match="peft-heft loads safetensors only"):
            load()


def test_final_save_holds_no_pickle_and_its_card_names_the_output_folder(tmp_path):
    from sft_fixtures import cpu_sft_args, make_dataset, tiny_sft_model, tiny_tokenizer

    from peft_heft import HeftConfig, StagedSFTTrainer

    out = tmp_path / "final"
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=cpu_sft_args(str(tmp_path / "run"), lora_max_steps=1, reft_max_steps=1, learning_rate=1e-3),
        train_dataset=make_dataset("prompt_completion", 8),
        processing_class=tiny_tokenizer(),
        peft_config=HeftConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], intervention_positions="f2"),
    )
    trainer.train()
    trainer.save_model(str(out))
    names = sorted(os.listdir(out))
    assert "training_args.bin" not in names and not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    saved_args = json.loads((out / "training_args.json").read_text())
    assert saved_args["lora_max_steps"] == 1 and saved_args["stage_order"] == ["lora", "reft"]
    card = (out / "README.md").read_text()
    assert STAGING_PREFIX not in card
    # the loading code a user copies from the card names the folder the adapter ended up in (not the staging one)
    snippet = re.search(r'AutoPeftModelForCausalLM\.from_pretrained\("([^"]+)"\)', card)
    assert snippet and os.path.samefile(snippet.group(1), out), card
    assert not [n for n in names if n.startswith(STAGING_PREFIX)]
