"""benchmarks/gpu_check.py: its --cpu-smoke mode runs every check's code path on CPU and writes the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
CHECKS = {"bf16_staged", "qlora_staged", "generate_cache", "device_map", "step_ratios", "padding_free"}


def run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=300)


def test_cpu_smoke_writes_every_check_with_pass_and_numbers(tmp_path):
    pytest.importorskip("bitsandbytes")
    proc = run("--cpu-smoke", "--out", str(tmp_path), "--only", *sorted(CHECKS))  # the sharded ones: slow test below
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-5000:]  # 1: a check failed, still reported
    report = json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())
    assert report["environment"]["mode"] == "cpu-smoke"
    assert {"torch", "transformers", "gpu"} <= set(report["environment"])
    checks = report["checks"]
    assert set(checks) == CHECKS
    for name, result in checks.items():
        assert "pass" in result and "error" not in result, (name, result.get("error"))
    for name in ("bf16_staged", "qlora_staged"):
        result = checks[name]
        assert isinstance(result["eval_loss_before"], float) and isinstance(result["eval_loss_after_reft"], float)
        assert result["steps"] == {"lora": 3, "reft": 3}
        assert isinstance(result["reload"]["relative_diff"], float)
    assert checks["bf16_staged"]["pass"] is True  # float32 on CPU: trains both stages, reloads to the same logits
    # 4-bit on CPU: LoRA gets gradients after the trainer's no-grad evaluations (HEFT keeps bitsandbytes' repacking off)
    assert checks["qlora_staged"]["pass"] is True
    assert checks["qlora_staged"]["stages"]["lora"]["grad_norm_max"] > 0
    assert checks["generate_cache"]["rows_equal"] == checks["generate_cache"]["rows"]
    assert checks["device_map"]["relative_diff"] == 0.0
    ratios = checks["step_ratios"]["ratios"]
    assert ratios and all(isinstance(r["value"], float) or r.get("why_missing") for r in ratios)
    assert isinstance(checks["step_ratios"]["median_ms"]["lora_step"], float)
    padding_free = checks["padding_free"]  # float32 on CPU: padding-free steps lose what padded steps lose
    assert padding_free["pass"] is True and padding_free["loss_relative_diff_max"] <= 1e-4
    assert [s for s, _ in padding_free["losses"]["padding_free"]] == ["lora"] * 3 + ["reft"] * 3
    assert set(padding_free["peak_memory_mib"]) == {"heft_padded", "heft_padding_free", "lora_padding_free"}
    markdown = (tmp_path / "gpu_check_cpu_smoke.md").read_text()
    assert all(f"| {name} |" in markdown for name in CHECKS)


def test_without_cuda_it_exits_2_with_a_clear_message(tmp_path):
    proc = run("--out", str(tmp_path), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "needs a CUDA GPU" in proc.stderr and "python benchmarks/gpu_check.py" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cpu_smoke_fsdp2_and_qlora_fsdp_checks_launch_really_fsdp2_and_reload(tmp_path):
    """The GPU check's FSDP2 launches (2 CPU processes, FSDP2 forced onto CPU by the test script's hack), ~1 min."""
    pytest.importorskip("bitsandbytes")
    proc = run("--cpu-smoke", "--out", str(tmp_path), "--only", "fsdp2", "qlora_fsdp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    checks = json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())["checks"]
    for name in ("fsdp2", "qlora_fsdp"):
        result = checks[name]
        assert result["pass"] is True and result["really_fsdp2"] is True, (name, result)
        assert result["engine"]["dtensor_params"] > 0 and result["processes"] == 2
        assert result["reload"]["pass"] is True
