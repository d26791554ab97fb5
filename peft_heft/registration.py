"""Make PEFT know the ``HEFT`` method.

PEFT's :class:`~peft.utils.peft_types.PeftType` is a closed ``str`` enum and
:func:`peft.utils.register_peft_method` only accepts names that are already members, so a
plugin has to add the member itself. This module does that once, idempotently, and then
registers :class:`~peft_heft.HeftConfig` / :class:`~peft_heft.HeftModel` the official way.
"""

from __future__ import annotations

import enum
import json
import os
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

    from .config import HeftConfig
    from .model import HeftModel

    mapping = cast(dict, PEFT_TYPE_TO_CONFIG_MAPPING)  # keyed by PeftType members, which are str: "HEFT" matches
    placeholder = mapping.get(HEFT_NAME)
    if placeholder is not None and type(placeholder).__name__ == "_NotRegisteredMeta":
        del mapping[HEFT_NAME]  # the autoload hook's stand-in (imports peft_heft on first use): replaced now
    member = cast(PeftType, _add_enum_member(PeftType, HEFT_NAME, HEFT_NAME))
    _add_model_card_section()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(member) is HeftModel:
        return
    if member in PEFT_TYPE_TO_TUNER_MAPPING:
        raise RuntimeError(
            f"Another package already registered a PEFT method called {HEFT_NAME!r} "
            f"({PEFT_TYPE_TO_TUNER_MAPPING[member].__module__}); peft-heft cannot register its own."
        )
    register_peft_method(name=HEFT_NAME.lower(), config_cls=HeftConfig, model_cls=HeftModel, prefix=HeftModel.prefix)


def _add_model_card_section() -> None:
    """After PEFT writes its model card for a HEFT adapter, add the HEFT section (settings, loading snippet).

    PEFT has no per-method hook for the card, so ``PeftModel.create_or_update_model_card`` is wrapped once; the
    wrapper does nothing more for other PEFT methods.
    """
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_peft_heft_wrapped", False):
        return

    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        from .config import HeftConfig
        from .modelcard import update_model_card

        config = self.peft_config.get(self.active_adapter)
        if isinstance(config, HeftConfig):
            update_model_card(output_dir, config)

    create_or_update_model_card._peft_heft_wrapped = True  # type: ignore[attr-defined]  # idempotency marker
    create_or_update_model_card.__doc__ = original.__doc__
    PeftModel.create_or_update_model_card = create_or_update_model_card  # type: ignore[method-assign]  # the wrap

    # `PeftModel.push_to_hub` is transformers' PushToHubMixin.push_to_hub: it saves into a temporary folder, then
    # overwrites README.md with the Hub's card (or a generic one) and uploads the folder. Add the HEFT section to
    # whatever card is about to be uploaded.
    upload = PeftModel._upload_modified_files

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        from .config import HeftConfig
        from .modelcard import update_model_card

        config = self.peft_config.get(self.active_adapter)
        if isinstance(config, HeftConfig):
            update_model_card(working_dir, config, model_id=repo_id)
        return upload(self, working_dir, repo_id, *args, **kwargs)

    PeftModel._upload_modified_files = _upload_modified_files  # type: ignore[method-assign]  # the wrap above
    _record_settings_in_weights()
    _check_folder_in_load_adapter()
    _name_the_file_of_bad_json()


def _record_settings_in_weights() -> None:
    """After PEFT saves a HEFT adapter, record its settings in the weights' safetensors metadata.

    ``adapter_config.json`` alone decides how PEFT rebuilds an adapter; an edited config (other positions, another
    intervention type) loaded without complaint and changed the outputs. ``HeftConfig.from_pretrained`` compares the
    config with these recorded settings (see ``peft_heft.saving``).
    """
    from peft import PeftModel

    original = PeftModel.save_pretrained
    if getattr(original, "_peft_heft_wrapped", False):
        return

    def save_pretrained(self, save_directory, *args, **kwargs):
        original(self, save_directory, *args, **kwargs)
        from .config import HeftConfig
        from .saving import stamp_settings

        if not kwargs.get("is_main_process", True) or kwargs.get("safe_serialization", True) is False:
            return
        selected = kwargs.get("selected_adapters") or list(self.peft_config)
        for name in selected:
            config = self.peft_config.get(name)
            if isinstance(config, HeftConfig):
                folder = save_directory if name == "default" else os.path.join(save_directory, name)
                stamp_settings(str(folder), config)

    save_pretrained._peft_heft_wrapped = True  # type: ignore[attr-defined]  # idempotency marker
    save_pretrained.__doc__ = original.__doc__
    PeftModel.save_pretrained = save_pretrained  # type: ignore[method-assign]  # the wrap above


def _check_folder_in_load_adapter() -> None:
    """Run HEFT's checks of a local adapter folder on every loading path.

    ``PeftModel.from_pretrained`` without a config reads it through ``HeftConfig.from_pretrained``, which checks the
    folder; ``AutoPeftModel*`` and ``from_pretrained(config=...)`` build the config without it. All of them go through
    ``load_adapter``, so the same checks run there, before the weights are read.
    """
    from peft import PeftModel

    original = PeftModel.load_adapter
    if getattr(original, "_peft_heft_wrapped", False):
        return

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        from .config import HeftConfig
        from .saving import CONFIG_NAME, check_local_adapter_folder, check_settings

        folder = os.path.join(str(model_id), kwargs.get("subfolder") or "")
        config = self.peft_config.get(adapter_name)
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            if config is None:
                with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as handle:
                    is_heft = json.load(handle).get("peft_type") == HEFT_NAME
            else:
                is_heft = isinstance(config, HeftConfig)
            if is_heft:
                check_local_adapter_folder(folder)
                if config is not None:
                    check_settings(folder, config)
        return original(self, model_id, adapter_name, *args, **kwargs)

    load_adapter._peft_heft_wrapped = True  # type: ignore[attr-defined]  # idempotency marker
    load_adapter.__doc__ = original.__doc__
    PeftModel.load_adapter = load_adapter  # type: ignore[method-assign]  # the wrap above


def _name_the_file_of_bad_json() -> None:
    """PEFT reads ``adapter_config.json`` with a bare ``json.load``: a syntax error named no file. Name it."""
    from peft import PeftConfig

    original = PeftConfig.from_json_file.__func__  # type: ignore[attr-defined]  # a classmethod
    if getattr(original, "_peft_heft_wrapped", False):
        return

    def from_json_file(cls, path_json_file, **kwargs):
        try:
            return original(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path_json_file} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}). "
                "The adapter's config file was damaged or edited by hand: fix the syntax there, or copy or save the "
                "adapter again."
            ) from error

    from_json_file._peft_heft_wrapped = True  # type: ignore[attr-defined]  # idempotency marker
    from_json_file.__doc__ = original.__doc__
    PeftConfig.from_json_file = classmethod(from_json_file)  # type: ignore[method-assign,assignment]  # the wrap
