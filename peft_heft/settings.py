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
