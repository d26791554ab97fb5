"""Register HEFT with PEFT as soon as ``peft`` is imported, so HEFT adapters load without ``import peft_heft``.

A regular (non-editable) install puts ``peft_heft-autoload.pth`` into site-packages; Python runs its one line at
start-up, which only adds a tiny import finder (no torch or peft import happens here). When ``peft`` is imported,
the finder lets it load normally and then puts a stand-in for HEFT into PEFT's config mapping, which imports
``peft_heft`` (registering ``PeftType.HEFT``) the first time PEFT looks HEFT up. Without this,
``PeftModel.from_pretrained`` on a HEFT adapter ends in ``KeyError: 'HEFT'``.

The finder stays in place until peft's module actually runs: transformers and trl call
``importlib.util.find_spec("peft")`` (``is_peft_available``) long before anything imports peft, and that look-up alone
must not use the finder up (it did once: ``from transformers import Trainer`` first left HEFT unregistered).

Set ``PEFT_HEFT_NO_AUTOLOAD=1`` to turn it off: peft_heft is then not imported with peft, and loading a HEFT adapter
raises an error that says to ``import peft_heft`` (instead of PEFT's bare ``KeyError: 'HEFT'``).
Editable installs do not get the ``.pth`` (``make venv`` copies it): import ``peft_heft``.
"""

import os
import sys

_DISABLED_VALUES = ("1", "true", "yes", "on")
NOT_REGISTERED_MESSAGE = (
    "This is a HEFT adapter (peft_type 'HEFT'), and HEFT is not registered with PEFT in this process. "
    "Add `import peft_heft` before loading it{why}. peft-heft registers HEFT when peft is imported unless "
    "PEFT_HEFT_NO_AUTOLOAD is set; editable installs need `import peft_heft` (or `make venv`, which installs the hook)."
)


def autoload_disabled() -> bool:
    return os.environ.get("PEFT_HEFT_NO_AUTOLOAD", "").strip().lower() in _DISABLED_VALUES


class _NotRegisteredMeta(type):
    """Metaclass of the stand-in: calling it or reading an attribute resolves to the real ``HeftConfig``."""

    def __call__(cls, *args, **kwargs):
        return cls.resolve()(*args, **kwargs)

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(cls.resolve(), name)


class HeftNotRegistered(metaclass=_NotRegisteredMeta):
    """Stands in PEFT's config mapping under ``"HEFT"`` until peft_heft is imported.

    PEFT finds the config class of every saved adapter in that mapping (``PeftConfig.from_pretrained``,
    ``PeftModel.from_pretrained``, ``AutoPeftModel*``, ``load_adapter``, hotswapping). The first use imports
    peft_heft, which registers HEFT for real and takes this stand-in out, then hands over to ``HeftConfig``. Importing
    peft_heft only then, not while peft itself is imported, matters: transformers imports peft half-way through its
    own ``trainer_utils``, where importing peft_heft (and pyvene, which imports transformers' optimizers) fails.
    With ``PEFT_HEFT_NO_AUTOLOAD`` set, the first use raises an error that says to ``import peft_heft``.
    """

    @classmethod
    def message(cls) -> str:
        why = " (PEFT_HEFT_NO_AUTOLOAD is set, so it was not imported with peft)" if autoload_disabled() else ""
        return NOT_REGISTERED_MESSAGE.format(why=why)

    @classmethod
    def resolve(cls):
        if autoload_disabled():
            raise KeyError(cls.message())
        try:
            from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

            import peft_heft  # noqa: F401  (registers PeftType.HEFT and replaces this stand-in)
        except Exception as error:
            raise KeyError(f"{cls.message()} Importing peft_heft failed: {error!r}") from error
        real = PEFT_TYPE_TO_CONFIG_MAPPING.get("HEFT")
        if real is None or real is cls:
            raise KeyError(cls.message())
        return real


def _after_peft_import() -> None:
    """Put the stand-in into PEFT's config mapping (no import of peft_heft, torch or pyvene happens here)."""
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    except Exception:
        return
    PEFT_TYPE_TO_CONFIG_MAPPING.setdefault("HEFT", HeftNotRegistered)


class _RegisterHeftAfterPeft:
    """Wraps peft's loader so that peft_heft is imported right after peft's own module ran; removes itself then.

    A plain class with ``find_spec`` (all the import system asks of a meta path finder): subclassing
    ``importlib.abc.MetaPathFinder`` imported importlib.resources, tempfile and typing at every interpreter start
    (~16 ms of a ~25 ms ``python -c pass``).
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        spec = None
        for finder in list(sys.meta_path):  # the other finders, as the import system would ask them
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_peft = spec.loader.exec_module
        finder = self

        def exec_module(module):
            if finder in sys.meta_path:
                sys.meta_path.remove(finder)  # peft runs now: nothing left to wait for
            exec_peft(module)
            _after_peft_import()

        spec.loader.exec_module = exec_module  # this spec's own loader instance
        return spec


def install() -> None:
    if "peft" in sys.modules:
        _after_peft_import()  # peft came first (e.g. imported by sitecustomize): add the stand-in now
        return
    if any(isinstance(f, _RegisterHeftAfterPeft) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _RegisterHeftAfterPeft())


install()
