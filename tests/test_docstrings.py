"""Every object in the API reference has a PEFT/transformers-style docstring: Args (when it takes any) and Example."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"
NAMES = re.findall(r"^::: ([\w.]+)$", API_PAGE.read_text(), flags=re.MULTILINE)


def resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    while module:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            module, _, parent = module.rpartition(".")
            attr = f"{parent}.{attr}"
    raise ImportError(dotted)


def test_api_page_lists_the_public_api():
    import peft_heft

    listed = {name.rsplit(".", 1)[-1] for name in NAMES}
    assert set(peft_heft.__all__) <= listed, set(peft_heft.__all__) - listed


@pytest.mark.parametrize("dotted", NAMES)
def test_docstring_has_args_and_example(dotted):
    obj = resolve(dotted)
    doc = inspect.getdoc(obj) or ""
    assert "Example" in doc, f"{dotted}: no Example section"
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = [
        p
        for p in inspect.signature(target).parameters.values()
        if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if params and not (inspect.isclass(obj) and obj.__init__ is object.__init__):
        assert "Args" in doc, f"{dotted}: takes {[p.name for p in params]} but has no Args section"
