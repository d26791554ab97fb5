"""The pinned dependency set, constraints/pinned.txt: show how an environment differs from it, or rewrite it.

Run it with the Python of the environment it is about (it reads that environment's installed distributions):

- ``.venv-latest/bin/python scripts/pins.py show transformers peft``: the named packages' installed versions next
  to their pins, then every other pinned package whose installed version differs (``make test-latest`` prints this).
- ``.venv-latest/bin/python scripts/pins.py write``: rewrite constraints/pinned.txt from that environment (after a
  green ``make test-latest``, to move the pins to the newest releases), then list the lower bounds in pyproject.toml
  that must be raised to match (tests/test_dependency_policy.py fails until they are).

Not pinned: torch (the Makefile installs the build that fits the machine) and what only torch needs, the project
itself, and the packaging tools.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints" / "pinned.txt"
PYPROJECT = ROOT / "pyproject.toml"
# torch's own build decides these (and nvidia-*/triton on GPU machines): pinning them could clash with that build.
TORCH_OWN = {"torch", "sympy", "mpmath", "networkx", "triton"}
TOOLS = {"pip", "setuptools", "wheel"}

HEADER = """\
# Known-good versions: what `make test` (and so CI) installs, with `pip install -c constraints/pinned.txt -e ".[dev]"`.
# pyproject.toml's lower bounds are the pins of the direct dependencies; tests/test_dependency_policy.py checks that.
# Not pinned: torch (the Makefile installs the build that fits the machine, TORCH_VERSION on CPU) and what only torch
# needs (sympy, mpmath, networkx; nvidia-* and triton on GPU machines). `make test-latest` tests the newest releases.
# How to bump: CONTRIBUTING.md, "Dependencies". Rewritten by `<venv>/bin/python scripts/pins.py write`.
"""


def direct_requirements(pyproject: Path = PYPROJECT) -> list[Requirement]:
    """pyproject.toml's dependencies, then those of each extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``{canonical name: version}`` from a constraints file of ``name==version`` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def installed() -> dict[str, tuple[str, str]]:
    """``{canonical name: (name as distributed, version)}`` for this environment."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonicalize_name(name)] = (name, dist.version)
    return found


def show(names: list[str]) -> int:
    pins, have = read_pins(), installed()
    width = max([len(n) for n in names] + [len(n) for n in pins]) + 2

    def row(key: str) -> str:
        pin = pins.get(key)
        version = have[key][1] if key in have else "(not installed)"
        note = "not pinned" if pin is None else ("= pin" if pin == version else f"pinned {pin}")
        return f"  {have.get(key, (key,))[0]:<{width}}{version:<14}{note}"

    print(f"installed in {sys.prefix}, against {CONSTRAINTS.relative_to(ROOT)}:")
    keys = [canonicalize_name(n) for n in names]
    for key in keys:
        print(row(key))
    drift = [key for key in sorted(pins) if key not in keys and key in have and have[key][1] != pins[key]]
    print(f"other pinned packages at another version: {len(drift) or 'none'}")
    for key in drift:
        print(row(key))
    return 0


def write() -> int:
    requirements = direct_requirements()
    project = canonicalize_name(tomllib.loads(PYPROJECT.read_text())["project"]["name"])
    direct = {canonicalize_name(r.name) for r in requirements}
    have = {
        key: value
        for key, value in installed().items()
        if key not in TORCH_OWN | TOOLS | {project} and not key.startswith("nvidia-")
    }
    missing = sorted(direct - TORCH_OWN - set(have))
    if missing:
        print(f"not installed here, so not pinned: {', '.join(missing)}", file=sys.stderr)
        return 1
    groups = [
        ("# Direct dependencies (pyproject.toml: dependencies and extras)", sorted(direct & set(have))),
        ("# What they pull in; the data packages the Makefile installs with --no-deps", sorted(set(have) - direct)),
    ]
    text = HEADER
    for title, keys in groups:
        text += "\n" + title + "\n" + "".join(f"{have[key][0]}=={have[key][1]}\n" for key in keys)
    CONSTRAINTS.parent.mkdir(exist_ok=True)
    CONSTRAINTS.write_text(text)
    print(f"wrote {CONSTRAINTS.relative_to(ROOT)}: {sum(len(keys) for _, keys in groups)} pins")
    for line in dict.fromkeys(str(r) for r in requirements):  # extras repeat some requirements
        requirement = Requirement(line)
        key = canonicalize_name(requirement.name)
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        if key in have and lower != [have[key][1]]:
            print(f"  raise in pyproject.toml: {requirement} -> lower bound {have[key][1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("show", help="installed versions against the pins").add_argument("names", nargs="*")
    commands.add_parser("write", help="rewrite constraints/pinned.txt from this environment")
    args = parser.parse_args(argv)
    return show(args.names) if args.command == "show" else write()


if __name__ == "__main__":
    raise SystemExit(main())
