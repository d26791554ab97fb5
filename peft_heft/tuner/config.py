"""``HeftConfig``: every ``peft.LoraConfig`` option plus the ReFT intervention options."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig
from peft.utils.peft_types import PeftType

from ..persistence import CONFIG_NAME, check_local_adapter_folder
from ..settings import RECORD_FIELD, SettingsMismatchError, check_legacy_settings, check_recorded_settings, settings_of
from .interventions import get_intervention_class, has_no_bias_option
from .positions import PositionSpec

SUPPORTED_COMPONENTS = ("block_output",)
# The most positions one side of a position spec may name ("f8192", "l8192"): locations are a (batch, groups, n)
# tensor whatever the prompt length, so "f100000000" would allocate gigabytes. "all" covers every prompt token.
MAX_INTERVENTION_POSITIONS = 8192


@dataclass
class HeftConfig(LoraConfig):
    """Configuration of a HEFT adapter: LoRA on the weights, then ReFT interventions on hidden states.

    All :class:`peft.LoraConfig` arguments keep their names and meaning (``r``, ``lora_alpha``, ``target_modules``,
    ``use_dora``, ``use_rslora``, ``layers_to_transform``, ``modules_to_save``, ``init_lora_weights`` ...). The
    intervention arguments follow pyreft's vocabulary. They are type-checked, never coerced: bool options take
    `True`/`False` (not `"no"`), int options an int (not a bool or a string), so a wrong type is a `TypeError`
    naming the option, the value and its type.

    Args:
        intervention_layers (`list[int]`, `int` or `"all"`):
            Decoder layers whose output is intervened on. Negative indices count from the end.
        intervention_type (`str`):
            `"loreft"`, `"noreft"`, `"direft"` or a name registered with `register_intervention_type`.
        intervention_rank (`int`):
            Rank of each intervention (pyreft's `low_rank_dimension`).
        intervention_positions (`str`):
            Prompt positions to intervene on: `"f<n>"`, `"l<n>"`, `"f<n>+l<n>"` or `"all"`, with n at most
            `MAX_INTERVENTION_POSITIONS` (8192) per side; `"all"` covers every prompt token.
        intervention_component (`str`):
            Where in the layer to intervene. Only `"block_output"` (the decoder layer's output) is supported.
        share_intervention_weights (`bool`):
            With `"f<n>+l<n>"`, use one intervention per layer for prefix and suffix (pyreft's `share_weights`).
        intervention_dropout (`float`):
            Dropout on the intervention output (pyreft semantics); off in `eval()`.
        intervention_act_fn (`str`, *optional*):
            Activation on `W h + b` (a `transformers.activations.ACT2FN` key); `None` means linear.
        intervention_add_bias (`bool`):
            Bias of NoReFT's projection layer (pyreft's `add_bias`): for `"noreft"` and registered types only;
            `True` with `"loreft"` or `"direft"` (which have no such layer) is an error rather than ignored.
        base_model_hidden_size (`int`, *optional*):
            Filled in when the adapter is created and checked when it is loaded, so that an adapter is never put on a
            model of another shape.
        base_model_num_layers (`int`, *optional*):
            The number of decoder layers, filled in and checked like `base_model_hidden_size`.

    Example:
        ```py
        >>> import peft_heft
        >>> from peft import get_peft_model
        >>> config = peft_heft.HeftConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"],
        ...                               intervention_layers=[2, 4], intervention_positions="f7+l7")
        >>> model = get_peft_model(base_model, config)
        ```
    """

    intervention_layers: list[int] | int | Literal["all"] = field(
        default="all",
        metadata={"help": "Decoder layers to intervene on: a list of ints (negative allowed), one int, or 'all'."},
    )
    intervention_type: str = field(
        default="loreft",
        metadata={"help": "Intervention class: 'loreft', 'noreft', 'direft', or one registered by the user."},
    )
    intervention_rank: int = field(default=4, metadata={"help": "Rank r of each intervention (r <= hidden size)."})
    intervention_positions: str = field(
        default="f7+l7",
        metadata={"help": "Prompt positions: 'f<n>', 'l<n>', 'f<n>+l<n>' (pyreft syntax) or 'all'."},
    )
    intervention_component: str = field(
        default="block_output", metadata={"help": f"Where to intervene; one of {SUPPORTED_COMPONENTS}."}
    )
    share_intervention_weights: bool = field(
        default=False,
        metadata={"help": "Use one intervention per layer for both prefix and suffix positions of 'f<n>+l<n>'."},
    )
    intervention_dropout: float = field(default=0.0, metadata={"help": "Dropout on the intervention output."})
    intervention_act_fn: str | None = field(
        default=None, metadata={"help": "Activation applied to W h + b (ACT2FN key); None for linear."}
    )
    intervention_add_bias: bool = field(
        default=False,
        metadata={"help": "Bias in NoReFT's projection layer ('noreft' and user types only; an error elsewhere)."},
    )
    base_model_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the model the adapter was made for (filled in automatically)."}
    )
    base_model_num_layers: int | None = field(
        default=None,
        metadata={"help": "Decoder layer count of the model the adapter was made for (filled in automatically)."},
    )
    saved_settings: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Written by save_pretrained, leave it unset: the settings the saved weights were trained with "
            "(intervention type, positions, layers, ranks, LoRA shape). A config loaded with settings that differ "
            "from this record (adapter_config.json edited by hand) is refused, since it would load without error "
            "and silently change the outputs. Checked once when the config is built, then cleared."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.HEFT  # type: ignore[attr-defined]  # member added at import by registration.py

        self.intervention_layers = _checked_layers(self.intervention_layers)
        self.intervention_type = _checked(str, "intervention_type", self.intervention_type, example="'loreft'")
        get_intervention_class(self.intervention_type)
        self.intervention_rank = _checked(int, "intervention_rank", self.intervention_rank, example="4")
        if self.intervention_rank < 1:
            raise ValueError(
                f"intervention_rank must be a positive int, got {self.intervention_rank!r}; pyreft uses 1-8."
            )
        positions = _checked(str, "intervention_positions", self.intervention_positions, example="'f7+l7'")
        spec = PositionSpec.parse(positions)
        widest = max(spec.first, spec.last)
        if widest > MAX_INTERVENTION_POSITIONS:
            raise ValueError(
                f"intervention_positions {positions!r} asks for {widest} positions per side; at most "
                f"{MAX_INTERVENTION_POSITIONS} are allowed. Intervention locations are a batch x groups x n tensor "
                "whatever the prompt length, so such an n allocates gigabytes although each row only has its own "
                "real tokens (each side is clipped to half of them). To intervene on every prompt token use 'all'; "
                f"else give a count <= {MAX_INTERVENTION_POSITIONS}, e.g. 'f7+l7'."
            )
        component = _checked(str, "intervention_component", self.intervention_component, example="'block_output'")
        if component not in SUPPORTED_COMPONENTS:
            raise ValueError(
                f"intervention_component {component!r} is not supported; use one of {SUPPORTED_COMPONENTS}."
            )
        self.share_intervention_weights = _checked(bool, "share_intervention_weights", self.share_intervention_weights)
        self.intervention_add_bias = _checked(bool, "intervention_add_bias", self.intervention_add_bias)
        if self.intervention_add_bias and has_no_bias_option(get_intervention_class(self.intervention_type)):
            raise ValueError(
                f"intervention_add_bias=True has no effect with intervention_type={self.intervention_type!r}: it adds "
                "the bias of NoReFT's projection layer, and that type has none (its learned source W h + b always "
                "has its bias). Remove intervention_add_bias (or set it to False), or use intervention_type='noreft'."
            )
        self.intervention_dropout = _checked(float, "intervention_dropout", self.intervention_dropout, example="0.1")
        if not 0.0 <= self.intervention_dropout < 1.0:
            raise ValueError(
                f"intervention_dropout must be in [0, 1), got {self.intervention_dropout!r}; 0.0 turns dropout off."
            )
        if self.intervention_act_fn is not None:
            _checked(str, "intervention_act_fn", self.intervention_act_fn, example="'relu' (or None for linear)")
            from transformers.activations import ACT2FN

            if self.intervention_act_fn not in ACT2FN:
                raise ValueError(
                    f"Unknown intervention_act_fn {self.intervention_act_fn!r}; use a key of "
                    "transformers.activations.ACT2FN (e.g. 'relu', 'gelu') or None."
                )
        for name in ("base_model_hidden_size", "base_model_num_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            value = _checked(int, name, value, example="None (get_peft_model fills it in) or an int such as 576")
            if value < 1:
                raise ValueError(
                    f"{name} must be a positive int or None, got {value!r}; leave it None: get_peft_model fills it in."
                )
            setattr(self, name, value)
        # a loaded config is checked against the record of its save once; the record is rewritten by each save, so
        # a config changed in code afterwards (replace_interventions, dataclasses.replace) is never refused
        recorded, self.saved_settings = self.saved_settings, None
        check_recorded_settings(self, recorded)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's dict of the config, plus the record of the settings the saved weights depend on."""
        data = super().to_dict()
        data[RECORD_FIELD] = settings_of(self)
        return data

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's ``from_pretrained``, with a local adapter folder checked first.

        A save interrupted by a kill is finished before anything is read; pickled-only, missing or corrupt weights
        are refused; a config that differs from the settings recorded at save time is refused, naming its file.
        """
        folder = str(pretrained_model_name_or_path)
        folder = os.path.join(folder, subfolder) if subfolder else folder
        if os.path.isfile(folder):  # PEFT would say it "can't find adapter_config.json" at the path of that very file
            parent = os.path.dirname(folder) or "."
            raise ValueError(
                f"{folder!r} is a file; an adapter is loaded from the folder that holds adapter_config.json and "
                f"adapter_model.safetensors. Pass the folder: {parent!r}, e.g. PeftModel.from_pretrained(base_model, "
                f"{parent!r})."
            )
        local = os.path.isdir(folder)
        if local:
            check_local_adapter_folder(folder)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except SettingsMismatchError as error:
            raise error.at(os.path.join(folder, CONFIG_NAME) if local else CONFIG_NAME) from None
        if local:
            check_legacy_settings(folder, config)  # adapters saved before the record moved into the config
        return config

    @property
    def position_spec(self) -> PositionSpec:
        return PositionSpec.parse(self.intervention_positions)

    @property
    def num_position_groups(self) -> int:
        return self.position_spec.num_groups(self.share_intervention_weights)


_KINDS = {bool: "a bool (True or False)", int: "an int", float: "a number (float)", str: "a string"}


def _checked(kind: type, name: str, value: Any, example: str | None = None) -> Any:
    """``value`` when it is really of ``kind``, else a ``TypeError`` naming the field, the value, its type and the fix.

    Nothing is coerced: a bool is not an int (``True`` would be rank 1), a string is not a bool (``"no"`` is truthy)
    and a string is not a number. Integral and real numbers of other types (e.g. numpy's) become plain int / float.
    """
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if ok:
        return value if kind is str else kind(value)
    fix = f"pass {name}={example}" if example else f"pass {name}=True or {name}=False"
    if kind is bool and isinstance(value, str):
        fix += f"; a string is not read as a bool (any non-empty string, {value!r} too, would count as True)"
    elif kind is not bool and isinstance(value, bool):
        fix += f"; a bool is not {_KINDS[kind]} (True would count as 1)"
    elif kind in (int, float) and isinstance(value, str):
        fix += "; a number, not a string"
    elif kind is int and isinstance(value, float):
        fix += "; an int, not a float"
    raise TypeError(f"{name} must be {_KINDS[kind]}, got {value!r} of type {type(value).__name__}; {fix}.")


def _checked_layers(layers: Any) -> list[int] | Literal["all"]:
    """``intervention_layers`` as ``"all"`` or a non-empty list of distinct ints; anything else is refused."""
    fix = "pass 'all', one int (e.g. 3) or a list of ints (e.g. [1, 3, -1]; negatives count from the end)"
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(
                f"intervention_layers must be 'all', an int or a list of ints, got the string {layers!r}; {fix}. "
                "(heft-sft --intervention_layers parses text such as '1,3' into a list for you.)"
            )
        return "all"
    if isinstance(layers, bool) or not isinstance(layers, (numbers.Integral, list, tuple, range)):
        raise TypeError(
            f"intervention_layers must be 'all', an int or a list of ints, got {layers!r} of type "
            f"{type(layers).__name__}; {fix}."
        )
    if isinstance(layers, numbers.Integral):
        return [int(layers)]
    values = list(layers)
    if not values:
        raise ValueError(f"intervention_layers must be a non-empty list of ints or 'all', got {layers!r}; {fix}.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(
                f"intervention_layers={layers!r} holds {value!r} of type {type(value).__name__}; layer indices are "
                f"ints: {fix}."
            )
    values = [int(v) for v in values]
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(
            f"intervention_layers={values} lists layer {repeated[0]} more than once; list each layer once."
        )
    return values
