"""Make PEFT know the ``HEFT`` method.

PEFT's :class:`~peft.utils.peft_types.PeftType` is a closed ``str`` enum and
:func:`peft.utils.register_peft_method` only accepts names that are already members, so a
plugin has to add the member itself. This module does that once, idempotently, and then
registers :class:`~peft_heft.HeftConfig` / :class:`~peft_heft.HeftModel` the official way.
"""

from __future__ import annotations

import enum
from typing import Any, cast

from peft.utils.peft_types import PeftType

HEFT_NAME = "HEFT"


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to a ``str``-mixin enum (Python 3.11 to 3.13), idempotently."""
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        return existing
    add_member = getattr(enum_cls, "_add_member_", None)  # Python >= 3.13
    # Built by hand the way EnumType builds members; typed Any because these are Enum internals.
    member: Any = str.__new__(cast(Any, enum_cls), value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    member._sort_order_ = len(enum_cls._member_names_)
    if add_member is not None:
        add_member(name, member)
    else:
        enum_cls._member_map_[name] = member
        enum_cls._member_names_.append(name)
        # EnumType.__setattr__ refuses to rebind members; the name is not a member attribute yet.
        type.__setattr__(enum_cls, name, member)
    enum_cls._value2member_map_[value] = member
    return member


def register_heft() -> None:
    """Register ``PeftType.HEFT`` with PEFT's mappings. Safe to call any number of times.

    ``import peft_heft`` calls it; call it yourself only after something reset PEFT's mappings.

    Returns:
        `None`. Raises `RuntimeError` when another package registered a different method named ``HEFT``.

    Example:
    ```python
    >>> import peft_heft
    >>> peft_heft.register_heft()  # idempotent
    ```
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .tuner.config import HeftConfig
    from .tuner.model import HeftModel

    mapping = cast(dict, PEFT_TYPE_TO_CONFIG_MAPPING)  # keyed by PeftType members, which are str: "HEFT" matches
    placeholder = mapping.get(HEFT_NAME)
    if placeholder is not None and type(placeholder).__name__ == "_NotRegisteredMeta":
        del mapping[HEFT_NAME]  # the autoload hook's stand-in (imports peft_heft on first use): replaced now
    member = cast(PeftType, _add_enum_member(PeftType, HEFT_NAME, HEFT_NAME))
    if PEFT_TYPE_TO_TUNER_MAPPING.get(member) is HeftModel:
        return
    if member in PEFT_TYPE_TO_TUNER_MAPPING:
        raise RuntimeError(
            f"Another package already registered a PEFT method called {HEFT_NAME!r} "
            f"({PEFT_TYPE_TO_TUNER_MAPPING[member].__module__}); peft-heft cannot register its own."
        )
    register_peft_method(name=HEFT_NAME.lower(), config_cls=HeftConfig, model_cls=HeftModel, prefix=HeftModel.prefix)
