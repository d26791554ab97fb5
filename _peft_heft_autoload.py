"""Register HEFT with PEFT as soon as ``peft`` is imported, so HEFT adapters load without ``import peft_heft``.

A regular (non-editable) install puts ``peft_heft-autoload.pth`` into site-packages; Python runs its one line at
start-up, which only adds a tiny import finder (no torch or peft import happens here). When ``peft`` is imported,
the finder lets it load normally and then imports ``peft_heft``, which registers ``PeftType.HEFT``. Without this,
``PeftModel.from_pretrained`` on a HEFT adapter ends in ``KeyError: 'HEFT'``.

Set ``PEFT_HEFT_NO_AUTOLOAD=1`` to turn it off. Editable installs do not get the ``.pth``: import ``peft_heft``.
"""

import importlib.abc
import importlib.util
import os
import sys


class _RegisterHeftAfterPeft(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot, and lets the normal finders locate peft below
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_peft = spec.loader.exec_module

        def exec_module(module):
            exec_peft(module)
            try:
                import peft_heft  # noqa: F401  (registers PeftType.HEFT)
            except Exception as error:  # never break `import peft`
                import warnings

                warnings.warn(f"peft-heft could not register HEFT with PEFT on import: {error!r}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if os.environ.get("PEFT_HEFT_NO_AUTOLOAD", "").lower() in ("1", "true", "yes"):
        return
    if "peft" in sys.modules or any(isinstance(f, _RegisterHeftAfterPeft) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _RegisterHeftAfterPeft())


install()
