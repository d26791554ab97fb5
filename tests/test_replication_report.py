"""The learning-curve replication's report (benchmarks/replicate_curves.py): its verdicts are computed from the
numbers, the committed table and README block are what the committed JSON gives, and workers sharing the benchmark
never take the same run. No training here: the runs are built by hand or read from the committed results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


@pytest.fixture(scope="module")
def rc():
    sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its sibling replicate_heft
    try:
        spec = importlib.util.spec_from_file_location("replicate_curves", REPO / "benchmarks" / "replicate_curves.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def curve(*points):
    """(stage, step, train_seconds, accuracy) tuples as the benchmark stores them."""
    return [dict(stage=st, step=step, train_seconds=s, accuracy=a) for st, step, s, a in points]


def run(method, seed, accuracy, seconds, points, task="t"):
    return dict(task=task, method=method, seed=seed, accuracy=accuracy, train_seconds=seconds, curve=curve(*points))


def test_accuracy_at_is_the_last_point_measured_never_interpolated(rc):
    c = curve(("lora", 50, 100.0, 0.5), ("lora", 100, 200.0, 0.7), ("reft", 125, 300.0, 0.9))
    assert rc.accuracy_at(c, 100.0) == 0.5
    assert rc.accuracy_at(c, 199.0) == 0.5  # an interpolation would give 0.698
    assert rc.accuracy_at(c, 200.0) == 0.7
    assert rc.accuracy_at(c, 300.0) == 0.9
    assert rc.accuracy_at(c, 99.0) is None  # before the first measurement
    assert rc.accuracy_at(c, 301.0) is None  # past the end of the run
    assert rc.accuracy_at([], 1.0) is None


def test_verdicts_pair_seeds_and_read_float_noise_as_a_tie(rc):
    results = {
        "runs": {
            "t/lora/0": run("lora", 0, 0.850, 900.0, [("lora", 125, 900.0, 0.850)]),
            "t/lora/1": run("lora", 1, 0.850, 900.0, [("lora", 125, 900.0, 0.850)]),
            # mean 0.85 up to float noise: 0.835 + 0.865 != 1.7 exactly
            "t/heft/0": run("heft", 0, 0.835, 1000.0, [("lora", 60, 500.0, 0.800), ("reft", 60, 1000.0, 0.835)]),
            "t/heft/1": run("heft", 1, 0.865, 1000.0, [("lora", 60, 500.0, 0.900), ("reft", 60, 1000.0, 0.865)]),
            "t/reft/0": run("reft", 0, 0.700, 800.0, [("reft", 125, 800.0, 0.700)]),  # one seed only
        }
    }
    verdicts = rc.summarize(results)["t"]["verdicts"]
    heft_lora = next(v for v in verdicts if "HEFT (" in v and "LoRA-only's" in v)
    assert " ties LoRA-only's final accuracy (0.850, +0.000)" in heft_lora
    assert "within the seeds' spread" in heft_lora
    assert "which both have" not in heft_lora
    heft_reft = next(v for v in verdicts if "HEFT (" in v and "ReFT-only's" in v)
    # paired on seed 0: HEFT's seed 0 (0.835), not its 2-seed mean (0.850), against ReFT-only's one seed
    assert heft_reft.startswith("t: HEFT (0.835, 16.7 min) beats ReFT-only's final accuracy (0.700, +0.135)")
    assert heft_reft.endswith("(on seed(s) [0], which both have).")
    # HEFT is the longer run: compared where it stood at ReFT-only's end (800 s: its coarse stage's 0.800)
    assert "at ReFT-only's training time (13.3 min) HEFT had 0.800 (+0.100)" in heft_reft
    fine = next(v for v in verdicts if "fine stage" in v)
    assert fine == (
        "t: HEFT's fine stage keeps the accuracy its coarse stage reached: 0.850 at the end of the LoRA stage, "
        "0.850 at the end (+0.000)."
    )


def test_no_method_above_majority_is_said(rc):
    zero = dict(task="t", method="zero_shot", accuracy=0.4, majority_accuracy=0.6, majority_label="no")
    results = {"runs": {"t/zero": zero, "t/lora/0": run("lora", 0, 0.61, 10.0, [("lora", 1, 10.0, 0.61)])}}
    assert any(
        "no method is more than 0.02 above the majority class" in v for v in rc.summarize(results)["t"]["verdicts"]
    )
    results["runs"]["t/lora/0"]["accuracy"] = 0.7
    assert not any("majority class" in v for v in rc.summarize(results)["t"]["verdicts"])


def test_committed_report_and_readme_are_what_the_committed_json_gives(rc):
    """Nobody edited a number by hand: the table, verdicts and README block regenerate from the JSON exactly."""
    results = json.loads((RESULTS / "replication_curves.json").read_text())
    summary = rc.summarize(results)
    hint = "rewrite them with `python benchmarks/replicate_curves.py --report` (after a change to the report code)"
    assert rc.markdown(results, summary, "replication_curves") == (RESULTS / "replication_curves.md").read_text(), hint
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index(rc.README_START) + len(rc.README_START) : readme.index(rc.README_END)]
    assert block.strip() == rc.readme_block(results, summary).strip(), hint
    # every planned run is in: the README reads the final numbers
    assert "Not run yet" not in (RESULTS / "replication_curves.md").read_text()


def test_store_claims_a_run_once_and_takes_over_a_dead_workers_claim(rc, tmp_path):
    store = rc.Store(tmp_path / "results.json", tmp_path / "claims")
    assert store.claim("t/lora/0")
    # another live worker of the benchmark holds t/lora/1
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "replicate_curves"])
    try:
        (tmp_path / "claims" / "t--lora--1.pid").write_text(str(other.pid))
        assert not store.claim("t/lora/1")
    finally:
        other.kill()
        other.wait()
    assert store.claim("t/lora/1")  # its worker died: the claim is taken over
    assert (tmp_path / "claims" / "t--lora--1.pid").read_text() == str(os.getpid())
    # a pid reused by an unrelated process is not a worker
    (tmp_path / "claims" / "t--reft--0.pid").write_text(str(os.getppid()))
    assert store.claim("t/reft/0")
    # a finished run is never claimed again
    (tmp_path / "results.json").write_text(json.dumps({"runs": {"t/heft/0": {}}}))
    assert not store.claim("t/heft/0")
    store.release("t/lora/0")
    assert not (tmp_path / "claims" / "t--lora--0.pid").exists()
