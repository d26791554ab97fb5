"""``HeftConfig``: every ``peft.LoraConfig`` option plus the ReFT intervention options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig
from peft.utils.peft_types import PeftType

from .interventions import get_intervention_class
from .positions import PositionSpec

SUPPORTED_COMPONENTS = ("block_output",)


@dataclass
class HeftConfig(LoraConfig):
    """Configuration of a HEFT adapter: LoRA on the weights, then ReFT interventions on hidden states.

    All :class:`peft.LoraConfig` arguments keep their names and meaning (``r``, ``lora_alpha``, ``target_modules``,
    ``use_dora``, ``use_rslora``, ``layers_to_transform``, ``modules_to_save``, ``init_lora_weights`` ...). The
    intervention arguments follow pyreft's vocabulary.

    Args:
        intervention_layers (`list[int]`, `int` or `"all"`):
            Decoder layers whose output is intervened on. Negative indices count from the end.
        intervention_type (`str`):
            `"loreft"`, `"noreft"`, `"direft"` or a name registered with `register_intervention_type`.
        intervention_rank (`int`):
            Rank of each intervention (pyreft's `low_rank_dimension`).
        intervention_positions (`str`):
            Prompt positions to intervene on: `"f<n>"`, `"l<n>"`, `"f<n>+l<n>"` or `"all"`.
        intervention_component (`str`):
            Where in the layer to intervene. Only `"block_output"` (the decoder layer's output) is supported.
        share_intervention_weights (`bool`):
            With `"f<n>+l<n>"`, use one intervention per layer for prefix and suffix (pyreft's `share_weights`).
        intervention_dropout (`float`):
            Dropout on the intervention output (pyreft semantics); off in `eval()`.
        intervention_act_fn (`str`, *optional*):
            Activation on `W h + b` (a `transformers.activations.ACT2FN` key); `None` means linear.
        intervention_add_bias (`bool`):
            Bias of NoReFT's projection layer (pyreft's `add_bias`).
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
    intervention_add_bias: bool = field(default=False, metadata={"help": "Bias in NoReFT's projection layer."})
    base_model_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the model the adapter was made for (filled in automatically)."}
    )
    base_model_num_layers: int | None = field(
        default=None,
        metadata={"help": "Decoder layer count of the model the adapter was made for (filled in automatically)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.HEFT  # type: ignore[attr-defined]  # member added at import by registration.py

        layers = self.intervention_layers
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"intervention_layers must be 'all', an int or a list of ints, got {layers!r}.")
        elif isinstance(layers, bool):
            raise TypeError("intervention_layers must be 'all', an int or a list of ints, got a bool.")
        elif isinstance(layers, int):
            self.intervention_layers = [layers]
        else:
            layers = list(layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"intervention_layers must be a non-empty list of ints or 'all', got {layers!r}.")
            self.intervention_layers = layers

        if not isinstance(self.intervention_rank, int) or self.intervention_rank < 1:
            raise ValueError(f"intervention_rank must be a positive int, got {self.intervention_rank!r}.")
        PositionSpec.parse(self.intervention_positions)
        if self.intervention_component not in SUPPORTED_COMPONENTS:
            raise ValueError(
                f"intervention_component {self.intervention_component!r} is not supported; use one of "
                f"{SUPPORTED_COMPONENTS}."
            )
        if not 0.0 <= float(self.intervention_dropout) < 1.0:
            raise ValueError(f"intervention_dropout must be in [0, 1), got {self.intervention_dropout}.")
        get_intervention_class(self.intervention_type)
        if self.intervention_act_fn is not None:
            from transformers.activations import ACT2FN

            if self.intervention_act_fn not in ACT2FN:
                raise ValueError(
                    f"Unknown intervention_act_fn {self.intervention_act_fn!r}; use a key of "
                    "transformers.activations.ACT2FN (e.g. 'relu', 'gelu') or None."
                )

    @property
    def position_spec(self) -> PositionSpec:
        return PositionSpec.parse(self.intervention_positions)

    @property
    def num_position_groups(self) -> int:
        return self.position_spec.num_groups(self.share_intervention_weights)


def _check_safetensors_header(path: str) -> None:
    """Read only the header of ``path``, so a truncated or corrupt weights file fails here with its name."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}). It is probably truncated or corrupt: copy or "
            "download the adapter again, or save it again with save_pretrained."
        ) from error


def _refuse_pickled_weights(config_cls):
    """Wrap ``from_pretrained`` so a local HEFT adapter holding only pickled weights is refused early."""
    original = config_cls.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        import os

        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if os.path.isdir(folder):
            has_safetensors = os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
            pickled = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(folder, f))]
            if pickled and not has_safetensors:
                raise ValueError(
                    f"{folder} holds HEFT weights only as {pickled[0]} (a pickle). peft-heft loads safetensors only, "
                    "so that loading an adapter never runs code from it. Where you trust the file, convert it once to "
                    "adapter_model.safetensors with safetensors.torch.save_file."
                )
            if not has_safetensors and os.path.isfile(os.path.join(folder, "adapter_config.json")):
                raise FileNotFoundError(
                    f"{folder} has adapter_config.json but no adapter_model.safetensors: the adapter's weights are "
                    "missing (an interrupted copy or download?). Copy the whole adapter folder again, or save it again "
                    "with save_pretrained."
                )
            if has_safetensors:
                _check_safetensors_header(os.path.join(folder, "adapter_model.safetensors"))
        return original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    from_pretrained.__doc__ = original.__doc__
    config_cls.from_pretrained = classmethod(from_pretrained)
    return config_cls


_refuse_pickled_weights(HeftConfig)
