"""peft-heft patches nothing upstream: importing it and using a HEFT model (train both stages, save, load, card)
replaces or adds no attribute of any peft / transformers / trl / accelerate module or class, apart from PEFT's
registration tables, and leaves process-wide state (sys.stdout, sys.meta_path, the matplotlib backend) alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Runs in a fresh interpreter, so that nothing imported by other tests hides a patch.
SNAPSHOT_SCRIPT = r"""
import inspect, json, sys, types

UPSTREAM = ("peft", "transformers", "trl", "accelerate")
import matplotlib
import peft, transformers, trl, accelerate  # noqa: E401
import peft.peft_model, peft.config, peft.mapping, peft.tuners.lora, peft.utils.save_and_load  # noqa: E401
import transformers.trainer, transformers.modeling_utils, transformers.utils.hub  # noqa: E401
import trl.trainer.sft_trainer, trl.trainer.dpo_trainer, trl.trainer.utils  # noqa: E401
import accelerate.hooks, accelerate.big_modeling  # noqa: E401


def upstream_modules():
    return {n: m for n, m in list(sys.modules.items()) if isinstance(m, types.ModuleType) and n.split(".")[0] in UPSTREAM}


def snapshot():
    seen = {}
    for name, module in upstream_modules().items():
        seen[name] = {k: id(v) for k, v in list(vars(module).items())}
        for key, value in list(vars(module).items()):
            if inspect.isclass(value) and getattr(value, "__module__", "") == name:
                seen[f"{name}.{key}"] = {k: id(v) for k, v in list(vars(value).items())}
    return seen


def ours(value):
    func = getattr(value, "__func__", value)
    code = getattr(func, "__code__", None)
    return code is not None and ("peft_heft" in code.co_filename)


before = snapshot()
values_before = {}
for name, module in upstream_modules().items():
    values_before[name] = dict(vars(module))
state_before = (id(sys.stdout), id(sys.stderr), list(map(id, sys.meta_path)), matplotlib.get_backend())

sys.path.insert(0, sys.argv[1])
import peft_heft  # noqa: E402
from run_heft_once import run_heft_once  # noqa: E402

run_heft_once(sys.argv[2])
after = snapshot()
changed = []
for owner, attrs in before.items():
    now = after.get(owner, {})
    is_class = owner not in values_before
    for key, ident in now.items():
        if key == "__slotnames__":  # copyreg's cache, set on a class by Python the first time copy.copy() copies one
            continue
        if key not in attrs:
            obj = sys.modules.get(owner)
            if is_class:
                mod, _, cls = owner.rpartition(".")
                value = vars(getattr(sys.modules[mod], cls))[key]
            else:
                value = vars(obj)[key]
            if is_class or ours(value):
                changed.append(f"added {owner}.{key}")
        elif attrs[key] != ident:
            if is_class:
                changed.append(f"replaced {owner}.{key}")
            else:
                old = values_before[owner].get(key)
                if inspect.isfunction(old) or inspect.isclass(old) or ours(vars(sys.modules[owner])[key]):
                    changed.append(f"replaced {owner}.{key}")
state_after = (id(sys.stdout), id(sys.stderr), list(map(id, sys.meta_path)), matplotlib.get_backend())
print(json.dumps({"changed": sorted(changed), "state_equal": state_before == state_after,
                  "state": [str(s) for s in state_before], "state_after": [str(s) for s in state_after]}))
"""

# The isolated shims, each described in docs/design.md with the upstream change that removes it.
KNOWN_SHIMS = {
    # PEFT 0.21's register_peft_method only accepts existing PeftType members: the HEFT member is added to the enum
    "added peft.utils.peft_types.PeftType.HEFT",
    # the enum's own tables, updated in place by Python's enum machinery on 3.11/3.12 (PeftType._add_member_ on 3.13)
}


def test_importing_and_using_heft_patches_nothing_upstream(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFT_HEFT_NO_AUTOLOAD": "1", "MPLBACKEND": "pdf"}
    run = subprocess.run(
        [sys.executable, "-c", SNAPSHOT_SCRIPT, str(TESTS), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(report["changed"]) - KNOWN_SHIMS == set(), report["changed"]
    assert report["state_equal"], (report["state"], report["state_after"])


@pytest.mark.slow  # a check of the check (~9 s of imports): the slow suite runs it
def test_the_snapshot_sees_a_patch(tmp_path):
    """The same check on a process that does patch PEFT finds it (the check is not blind)."""
    script = SNAPSHOT_SCRIPT.replace(  # no HEFT use here (it takes ~10 s): only the patch the snapshot must see
        "run_heft_once(sys.argv[2])",
        "peft.PeftModel.save_pretrained = lambda self, *a, **k: None",
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(TESTS), str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PEFT_HEFT_NO_AUTOLOAD": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert "replaced peft.peft_model.PeftModel.save_pretrained" in report["changed"]
