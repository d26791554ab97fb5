"""Where peft-heft keeps what it prepares once (converted model, extracted data sets)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..persistence import build_folder_atomically

CACHE_ENV = "PEFT_HEFT_CACHE"


def cache_dir() -> Path:
    """The peft-heft cache: ``$PEFT_HEFT_CACHE``, else ``<HF_HOME>/peft_heft`` (``~/.cache/huggingface/peft_heft``).

    Returns:
        `Path` (not created here).

    Example:
    ```python
    >>> cache_dir()
    PosixPath('/home/me/.cache/huggingface/peft_heft')
    ```
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "peft_heft"


def build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` in a temporary sibling of ``target`` and move it into place only when it succeeded.

    A crash or Ctrl-C half way leaves no half-written ``target`` behind, so a later call simply builds it again
    (:func:`peft_heft.persistence.build_folder_atomically`).
    """
    return build_folder_atomically(target, build)


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (some data packages have heavy imports)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
