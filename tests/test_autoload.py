"""Loading a HEFT adapter in a fresh interpreter, with and without the import-time registration."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import heft_config, tiny_llama
from peft import get_peft_model

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import torch
from transformers import LlamaForCausalLM
from peft import PeftModel
base = LlamaForCausalLM.from_pretrained({base!r})
model = PeftModel.from_pretrained(base, {adapter!r})
print(type(model.base_model).__name__, model.peft_config["default"].peft_type == "HEFT")
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoload")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    get_peft_model(base, heft_config()).save_pretrained(root / "adapter")
    return str(root / "base"), str(root / "adapter")


def _run(code, **env):
    environment = {k: v for k, v in os.environ.items() if k != "PEFT_HEFT_NO_AUTOLOAD"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=environment, cwd=ROOT
    )


def test_without_import_or_autoload_peft_fails_on_the_unknown_type(saved):
    out = _run(
        "import sys; sys.modules.pop('_peft_heft_autoload', None)\n" + LOAD.format(base=saved[0], adapter=saved[1]),
        PEFT_HEFT_NO_AUTOLOAD="1",
    )
    assert out.returncode != 0
    assert "HEFT" in out.stderr  # PEFT's own KeyError: this is why the docs say `import peft_heft`


def test_autoload_registers_heft_when_peft_is_imported(saved):
    out = _run("import _peft_heft_autoload\n" + LOAD.format(base=saved[0], adapter=saved[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HeftModel True"


def test_explicit_import_works(saved):
    out = _run("import peft_heft\n" + LOAD.format(base=saved[0], adapter=saved[1]), PEFT_HEFT_NO_AUTOLOAD="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HeftModel True"


def test_wheel_ships_the_pth_at_site_packages_root(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("peft_heft-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "peft_heft-autoload.pth" in names and "_peft_heft_autoload.py" in names
    assert zipfile.ZipFile(wheel).read("peft_heft-autoload.pth").decode().strip() == "import _peft_heft_autoload"


def test_installed_pth_registers_heft_without_any_import(saved):
    import sysconfig

    if not (Path(sysconfig.get_paths()["purelib"]) / "peft_heft-autoload.pth").is_file():
        pytest.skip("peft_heft-autoload.pth is not installed in this environment (editable install without make)")
    out = _run(LOAD.format(base=saved[0], adapter=saved[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HeftModel True"
