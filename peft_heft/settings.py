"""The one list of HEFT adapter settings: what the save check, the resume check and the search fingerprint compare.

Every check that asks "is this the same adapter?" reads its fields from here, so a new ``HeftConfig`` field is added
in one place and every check sees it.
"""

from __future__ import annotations

import json
from typing import Any

# The stages of a HEFT adapter, in the order of the paper (coarse, then fine), then the two that are not.
STAGES = ("lora", "reft", "joint", "frozen")

# The HeftConfig fields that only shape the ReFT interventions: what replace_interventions() may change, what the
# fine-stage search varies.
INTERVENTION_SETTINGS = (
    "intervention_layers",
    "intervention_type",
    "intervention_rank",
    "intervention_positions",
    "intervention_component",
    "share_intervention_weights",
    "intervention_dropout",
    "intervention_act_fn",
    "intervention_add_bias",
)

# The LoRA fields that change what the saved weights are or how they are applied (and dropout, which changes how a
# resumed run trains).
LORA_SETTINGS = (
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "target_parameters",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "bias",
    "lora_bias",
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
    "trainable_token_indices",
)

# The base model's shape the adapter was built for.
BASE_MODEL_SETTINGS = ("base_model_hidden_size", "base_model_num_layers")

# Everything that decides whether a checkpoint is the same adapter: the resume check compares all of them.
ADAPTER_SETTINGS = (*LORA_SETTINGS, *INTERVENTION_SETTINGS, *BASE_MODEL_SETTINGS)

# What a saved adapter_config.json records about itself (``HeftConfig.saved_settings``): the fields that decide what
# the saved tensors mean. Positions, type and sharing are not visible in any tensor's shape.
SAVED_SETTINGS = (
    "intervention_type",
    "intervention_positions",
    "intervention_layers",
    "intervention_rank",
    "intervention_component",
    "share_intervention_weights",
    "intervention_act_fn",
    "intervention_add_bias",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "target_modules",
    *BASE_MODEL_SETTINGS,
)


def settings_of(config: Any, fields: tuple[str, ...] = SAVED_SETTINGS) -> dict[str, Any]:
    """``config``'s values of ``fields`` in a JSON-comparable form (module sets sorted, positions normalised)."""
    settings: dict[str, Any] = {}
    for name in fields:
        value = getattr(config, name, None)
        value = getattr(value, "value", value)  # enums (task_type) compare by their string
        if name != "intervention_layers" and isinstance(value, (set, frozenset, tuple, list)):
            value = sorted(value, key=str)
        if name == "intervention_positions" and isinstance(value, str):
            value = value.strip().lower().replace(" ", "")
        settings[name] = value
    return json.loads(json.dumps(settings, default=str))


# ------------------------------------------------------------------------------- the record a saved config carries
RECORD_FIELD = "saved_settings"  # HeftConfig's field; the same name in adapter_config.json


def differing_settings(config: Any, recorded: dict[str, Any]) -> list[str]:
    """The fields of ``recorded`` (a save's record) that ``config`` no longer matches."""
    current = settings_of(config)
    return [name for name in SAVED_SETTINGS if name in recorded and recorded[name] != current.get(name)]


class SettingsMismatchError(ValueError):
    """A saved adapter's config no longer matches the settings its weights were saved with.

    Loading it would succeed and silently change the outputs (positions and intervention types are visible in no
    tensor's shape), so it is refused. A `ValueError`.

    Args:
        config: the config as read (``HeftConfig``).
        recorded (`dict`): the settings its save recorded (``saved_settings`` in adapter_config.json).
        where (`str`): the config file, named in the message when the loader knows it.

    Example:
    ```python
    >>> import peft_heft
    >>> from peft import PeftModel
    >>> try:
    ...     model = PeftModel.from_pretrained(base_model, "an-adapter-whose-config-was-edited")
    ... except peft_heft.SettingsMismatchError as error:
    ...     print(error)  # names each field: the config's value and the one the weights were saved with
    ```
    """

    def __init__(self, config: Any, recorded: dict[str, Any], where: str = "adapter_config.json") -> None:
        self.config, self.recorded = config, recorded
        current = settings_of(config)
        details = "; ".join(
            f"{name}: adapter_config.json has {current.get(name)!r}, the weights were saved with {recorded[name]!r}"
            for name in differing_settings(config, recorded)
        )
        super().__init__(
            f"{where} does not match the weights saved with it ({details}). The config was edited after the adapter "
            "was saved, and loading it would silently change the outputs. Restore the config to the weights' "
            f"settings (shown above; save_pretrained records them under '{RECORD_FIELD}' in adapter_config.json), or "
            "train and save an adapter with the new settings."
        )

    def at(self, where: str) -> SettingsMismatchError:
        """The same error, naming the config file the loader read."""
        return SettingsMismatchError(self.config, self.recorded, where)


def check_recorded_settings(config: Any, recorded: dict[str, Any] | None, where: str = "adapter_config.json") -> None:
    """Raise :class:`SettingsMismatchError` when ``config`` differs from the ``recorded`` settings of its save."""
    if recorded is not None and differing_settings(config, recorded):
        raise SettingsMismatchError(config, recorded, where)


# ----------------------------------------- adapters saved by earlier development builds: the record in the weights
LEGACY_METADATA_KEY = "heft_settings"  # where older releases recorded the settings: the safetensors metadata


def legacy_recorded_settings(weights_path: str) -> dict[str, Any] | None:
    """The settings an older release recorded in ``weights_path``'s safetensors metadata, or ``None``."""
    from safetensors import safe_open

    with safe_open(weights_path, framework="pt") as handle:
        text = (handle.metadata() or {}).get(LEGACY_METADATA_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{weights_path} has unreadable HEFT settings in its metadata ({error}); save the adapter again."
        ) from error


def check_legacy_settings(folder: str, config: Any) -> None:
    """Refuse ``config`` (read from ``folder``) when it differs from the settings an older release recorded in the
    weights' metadata. Adapters saved since record them in adapter_config.json, checked when the config is built."""
    import os

    weights = os.path.join(folder, "adapter_model.safetensors")
    if os.path.isfile(weights):
        check_recorded_settings(config, legacy_recorded_settings(weights), os.path.join(folder, "adapter_config.json"))
