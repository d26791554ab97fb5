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


def _installed_pth() -> bool:
    import sysconfig

    return (Path(sysconfig.get_paths()["purelib"]) / "peft_heft-autoload.pth").is_file()


AUTO_LOAD = """
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained({adapter!r})
print(type(model.base_model).__name__, model.peft_config["default"].peft_type == "HEFT")
"""

IMPORT_ORDERS = {
    "transformers Trainer first": "from transformers import Trainer\n",
    "trl first": "import trl\n",
    "accelerate first": "import accelerate\n",
    "peft first": "import peft\n",
    "from peft import PeftModel only": "from peft import PeftModel\n",
    "find_spec of peft first": "import importlib.util; importlib.util.find_spec('peft'); import transformers\n",
    "transformers is_peft_available first": "from transformers.utils import is_peft_available; is_peft_available()\n",
}


@pytest.fixture(scope="module")
def saved_with_base_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoload_orders")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    model = get_peft_model(base, heft_config())
    model.peft_config["default"].base_model_name_or_path = str(root / "base")
    model.save_pretrained(root / "adapter")
    return str(root / "adapter")


@pytest.mark.parametrize("order", sorted(IMPORT_ORDERS))
def test_every_import_order_registers_heft_in_a_fresh_process(order, saved_with_base_path):
    """Each order in a fresh interpreter, with only the start-up hook (the installed .pth, or its module imported
    first the way the .pth does): AutoPeftModelForCausalLM loads the HEFT adapter."""
    prefix = "" if _installed_pth() else "import _peft_heft_autoload\n"
    out = _run(prefix + IMPORT_ORDERS[order] + AUTO_LOAD.format(adapter=saved_with_base_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "HeftModel True"


@pytest.mark.parametrize("order", ["transformers Trainer first", "peft first"])
def test_autoload_turned_off_says_to_import_peft_heft(order, saved_with_base_path):
    prefix = "" if _installed_pth() else "import _peft_heft_autoload\n"
    code = prefix + IMPORT_ORDERS[order] + AUTO_LOAD.format(adapter=saved_with_base_path)
    out = _run(code, PEFT_HEFT_NO_AUTOLOAD="1")
    assert out.returncode != 0
    assert "This is a HEFT adapter (peft_type 'HEFT'), and HEFT is not registered" in out.stderr
    assert "Add `import peft_heft` before loading it (PEFT_HEFT_NO_AUTOLOAD is set" in out.stderr
    # and the hint steps aside once the user does import peft_heft
    fixed = _run(
        code.replace(
            "from peft import AutoPeftModelForCausalLM", "import peft_heft\nfrom peft import AutoPeftModelForCausalLM"
        ),
        PEFT_HEFT_NO_AUTOLOAD="1",
    )
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert fixed.stdout.strip().splitlines()[-1] == "HeftModel True"


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


def test_the_start_up_hook_imports_nothing_at_interpreter_start():
    """The .pth runs in every interpreter of the environment: importing the hook adds no module but itself (it once
    pulled in importlib.abc -> importlib.resources, tempfile, typing: ~19 ms per start; docs/design.md)."""
    script = (
        "import os, sys; before = set(sys.modules); import _peft_heft_autoload; "  # site imports os at start-up
        "print(sorted(set(sys.modules) - before)); print(type(sys.meta_path[0]).__name__)"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    added, finder = run.stdout.splitlines()
    assert added == "['_peft_heft_autoload']"
    assert finder == "_RegisterHeftAfterPeft"  # in front, until peft is imported (then it removes itself)
