"""benchmarks/gpu_check.py: its --cpu-smoke mode runs every check's code path on CPU and writes the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
CHECKS = {"bf16_staged", "qlora_staged", "generate_cache", "device_map", "step_ratios"}


def run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=300)


def test_cpu_smoke_writes_every_check_with_pass_and_numbers(tmp_path):
    pytest.importorskip("bitsandbytes")
    proc = run("--cpu-smoke", "--out", str(tmp_path))
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
    markdown = (tmp_path / "gpu_check_cpu_smoke.md").read_text()
    assert all(f"| {name} |" in markdown for name in CHECKS)


def test_without_cuda_it_exits_2_with_a_clear_message(tmp_path):
    proc = run("--out", str(tmp_path), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "needs a CUDA GPU" in proc.stderr and "python benchmarks/gpu_check.py" in proc.stderr
    assert not list(tmp_path.iterdir())
