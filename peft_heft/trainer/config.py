"""``HeftSFTConfig``: TRL's ``SFTConfig`` plus the per-stage schedule of HEFT."""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, TypeVar

from trl import SFTConfig

from ..settings import STAGES

# The stages a trainer can train ("frozen" trains nothing).
STAGE_NAMES = tuple(stage for stage in STAGES if stage != "frozen")
# Options that can differ per stage: ``<stage>_<option>`` overrides the plain ``SFTConfig`` option for that stage.
PER_STAGE_OPTIONS = ("num_train_epochs", "max_steps", "learning_rate", "warmup_steps")


@dataclass
class HeftSFTConfig(SFTConfig):
    r"""
    Configuration for [`StagedSFTTrainer`]: every [`~trl.SFTConfig`] option, plus the HEFT stage schedule.

    HEFT trains in stages, each with its own trainable parameters, optimizer and learning-rate schedule. A stage's
    epochs, steps, learning rate and warmup come from its `lora_*` / `reft_*` / `joint_*` options when set, else from
    the usual `num_train_epochs`, `max_steps`, `learning_rate` and `warmup_steps`.

    Args:
        stage_order (`list[str]`, *optional*, defaults to `["lora", "reft"]`):
            Stages to run, in order. `"lora"` trains LoRA with interventions off (on and frozen when it follows a
            `"reft"` or `"joint"` stage), `"reft"` trains the interventions on top of the frozen LoRA-adapted model,
            `"joint"` trains both at once. `["reft", "lora"]` and `["joint"]` are the paper's ablations.
        lora_num_train_epochs (`float`, *optional*):
            Epochs of the lora stage. Falls back to `num_train_epochs`.
        reft_num_train_epochs (`float`, *optional*):
            Epochs of the reft stage. Falls back to `num_train_epochs`.
        joint_num_train_epochs (`float`, *optional*):
            Epochs of the joint stage. Falls back to `num_train_epochs`.
        lora_max_steps (`int`, *optional*):
            Optimizer steps of the lora stage; overrides its epochs when > 0. Falls back to `max_steps`.
        reft_max_steps (`int`, *optional*):
            Optimizer steps of the reft stage; overrides its epochs when > 0. Falls back to `max_steps`.
        joint_max_steps (`int`, *optional*):
            Optimizer steps of the joint stage; overrides its epochs when > 0. Falls back to `max_steps`.
        lora_learning_rate (`float`, *optional*):
            Peak learning rate of the lora stage. Falls back to `learning_rate`.
        reft_learning_rate (`float`, *optional*):
            Peak learning rate of the reft stage. Falls back to `learning_rate`.
        joint_learning_rate (`float`, *optional*):
            Peak learning rate of the joint stage. Falls back to `learning_rate`.
        lora_warmup_steps (`float`, *optional*):
            Warmup of the lora stage (steps, or a ratio of the stage's steps when < 1, like `warmup_steps`). Falls back to `warmup_steps`.
        reft_warmup_steps (`float`, *optional*):
            Warmup of the reft stage (steps, or a ratio of the stage's steps when < 1, like `warmup_steps`). Falls back to `warmup_steps`.
        joint_warmup_steps (`float`, *optional*):
            Warmup of the joint stage (steps, or a ratio of the stage's steps when < 1, like `warmup_steps`). Falls back to `warmup_steps`.
        merge_lora_before_reft (`bool`, *optional*, defaults to `False`):
            Fold the (frozen) LoRA weights into the base weights before a stage that does not train LoRA, so that
            stage runs without the LoRA branch. Unmerged again before any later stage that trains LoRA. The saved
            adapter is the same; the in-memory base weights stay merged after training (`model.unmerge_adapter()`).

    Example:
    ```python
    >>> from peft_heft import HeftSFTConfig
    >>> args = HeftSFTConfig(output_dir="out", lora_num_train_epochs=3, reft_num_train_epochs=3,
    ...                      lora_learning_rate=2e-4, reft_learning_rate=9e-4)
    ```
    """

    stage_order: list[str] = field(
        default_factory=lambda: ["lora", "reft"],
        metadata={"help": "Stages to run in order: 'lora', 'reft' and/or 'joint' (e.g. 'lora reft' or 'joint')."},
    )
    lora_num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs of the LoRA stage."})
    reft_num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs of the ReFT stage."})
    joint_num_train_epochs: float | None = field(default=None, metadata={"help": "Epochs of the joint stage."})
    lora_max_steps: int | None = field(
        default=None, metadata={"help": "Steps of the LoRA stage; overrides its epochs when > 0."}
    )
    reft_max_steps: int | None = field(
        default=None, metadata={"help": "Steps of the ReFT stage; overrides its epochs when > 0."}
    )
    joint_max_steps: int | None = field(
        default=None, metadata={"help": "Steps of the joint stage; overrides its epochs when > 0."}
    )
    lora_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the LoRA stage."})
    reft_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the ReFT stage."})
    joint_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the joint stage."})
    lora_warmup_steps: float | None = field(
        default=None, metadata={"help": "Warmup of the LoRA stage (steps, or a ratio when < 1)."}
    )
    reft_warmup_steps: float | None = field(
        default=None, metadata={"help": "Warmup of the ReFT stage (steps, or a ratio when < 1)."}
    )
    joint_warmup_steps: float | None = field(
        default=None, metadata={"help": "Warmup of the joint stage (steps, or a ratio when < 1)."}
    )
    merge_lora_before_reft: bool = field(
        default=False,
        metadata={"help": "Fold the frozen LoRA weights into the base weights for stages that do not train LoRA."},
    )

    def __post_init__(self):
        self.stage_order = _checked_stage_order(self.stage_order)
        for stage in STAGE_NAMES:  # before SFTConfig's checks, so a wrong type is named before anything uses it
            for option in PER_STAGE_OPTIONS:
                name = f"{stage}_{option}"
                if getattr(self, name) is not None:
                    _checked_number(name, getattr(self, name), _OPTION_KINDS[option])
        for option in PER_STAGE_OPTIONS:  # the shared values the stages fall back to
            _checked_number(option, getattr(self, option), _OPTION_KINDS[option])
        if not isinstance(self.merge_lora_before_reft, bool):
            raise TypeError(
                f"merge_lora_before_reft must be a bool (True or False), got {self.merge_lora_before_reft!r} of type "
                f"{type(self.merge_lora_before_reft).__name__}; pass merge_lora_before_reft=True or False (a string "
                "is not read as a bool: any non-empty string would count as True)."
            )
        super().__post_init__()
        for stage in self.stage_order:
            options = self.stage_options(stage)
            if options["max_steps"] is not None and options["max_steps"] > 0:
                pass
            elif options["max_steps"] not in (None, -1):
                raise ValueError(
                    f"{stage}_max_steps={options['max_steps']}: a listed stage needs > 0 steps (or leave it unset to "
                    "train by epochs)."
                )
            elif options["num_train_epochs"] is None or options["num_train_epochs"] <= 0:
                raise ValueError(
                    f"Stage {stage!r} would train {options['num_train_epochs']} epochs. Set {stage}_num_train_epochs "
                    f"> 0 or {stage}_max_steps > 0, or remove {stage!r} from stage_order."
                )
            lr = options["learning_rate"]
            if not (lr > 0 and math.isfinite(lr)):
                own = getattr(self, f"{stage}_learning_rate")
                source = (
                    f"{stage}_learning_rate={own}"
                    if own is not None
                    else f"{stage}_learning_rate is unset, so it falls back to learning_rate={lr}"
                )
                why = "trains nothing" if lr <= 0 else "is not a finite number"
                raise ValueError(
                    f"Stage {stage!r} would train with learning rate {lr} ({source}), which {why}. Set "
                    f"{stage}_learning_rate > 0 (or learning_rate > 0 for every stage that has no own rate)."
                )
            warmup = options["warmup_steps"]
            if warmup is not None and warmup < 0:
                raise ValueError(
                    f"Stage {stage!r} has warmup {warmup}: set {stage}_warmup_steps >= 0 (steps, or a ratio of the "
                    "stage's steps when < 1)."
                )
        for stage in STAGE_NAMES:
            lr = getattr(self, f"{stage}_learning_rate")
            if lr is not None and not (lr > 0 and math.isfinite(lr)):
                raise ValueError(f"{stage}_learning_rate must be > 0, got {lr}.")

    def for_stage(self, stage: str, **overrides: Any) -> HeftSFTConfig:
        """A copy of these arguments as `stage` trains under them: its epochs, steps, learning rate and warmup in the
        plain options, then `overrides`. These arguments are not changed."""
        return derived_arguments(self, **{**self.stage_options(stage), **overrides})

    def stage_options(self, stage: str) -> dict:
        """The effective ``num_train_epochs``, ``max_steps``, ``learning_rate`` and ``warmup_steps`` of ``stage``."""
        if stage not in STAGE_NAMES:
            raise ValueError(f"Unknown stage {stage!r}; use 'lora', 'reft' or 'joint'.")
        options = {}
        for option in PER_STAGE_OPTIONS:
            value = getattr(self, f"{stage}_{option}")
            options[option] = getattr(self, option) if value is None else value
        if getattr(self, f"{stage}_max_steps") is None and getattr(self, f"{stage}_num_train_epochs") is not None:
            options["max_steps"] = -1  # the stage's own epochs win over a global max_steps
        return options


_Args = TypeVar("_Args")


def derived_arguments(args: _Args, **overrides: Any) -> _Args:
    """A shallow copy of the training arguments ``args`` with ``overrides`` set; ``args`` itself is not changed.

    Not ``dataclasses.replace``: that reruns ``TrainingArguments.__post_init__``, whose device setup resets
    accelerate's shared ``AcceleratorState`` under the running trainer's ``Accelerator`` (its ``mixed_precision``
    and distributed type vanish). The overrides are plain values, so sharing the other fields' objects is safe.
    """
    names = {f.name for f in dataclasses.fields(args)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{type(args).__name__} has no option {unknown[0]!r}.")
    derived = copy.copy(args)
    for name, value in overrides.items():
        setattr(derived, name, value)
    return derived


# What each per-stage option holds: ``float`` also takes an int (``lora_num_train_epochs=3``), ``int`` takes no float.
_OPTION_KINDS = {"num_train_epochs": float, "max_steps": int, "learning_rate": float, "warmup_steps": float}


def _checked_number(name: str, value, kind: type) -> None:
    """A ``TypeError`` naming ``name``, the value, its type and what to pass, unless ``value`` is really a ``kind``.

    Python callers reach ``__post_init__`` with whatever they passed (``TrlParser`` converts command-line text first),
    so nothing is coerced here: a bool is not a count (``True`` would be 1 step), a string is not a number.
    """
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        what, example = "an int", "5"
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        what, example = "a number", "3" if "epochs" in name else "2e-4" if "learning_rate" in name else "10"
    if ok:
        return
    if isinstance(value, (str, float)):  # what the caller probably meant, when it is clear ("5" -> 5, 2.0 -> 2)
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and (kind is not int or number.is_integer()):
            example = str(int(number)) if kind is int else str(value)
    if isinstance(value, bool):
        hint = f"a bool is not {what}: True would count as 1"
    elif isinstance(value, str):
        hint = "a number, not a string: only the heft-sft command line parses text"
    elif kind is int and isinstance(value, numbers.Real):
        hint = "steps are whole: an int, not a float"
    else:
        hint = "a plain number"
    if name.split("_", 1)[0] in STAGE_NAMES:
        hint += f"; or leave it None to use {name.split('_', 1)[1]}"
    raise TypeError(
        f"{name} must be {what}, got {value!r} of type {type(value).__name__}; pass {name}={example} ({hint})."
    )


def _checked_stage_order(stage_order) -> list[str]:
    """``stage_order`` as a list of known, distinct, lower-case stage names (a string is split on commas/spaces)."""
    if isinstance(stage_order, str):
        stage_order = [s for s in stage_order.replace(",", " ").split() if s]
    elif not isinstance(stage_order, (list, tuple)):
        raise TypeError(
            f"stage_order must be a list of stage names, got {stage_order!r} of type {type(stage_order).__name__}; "
            "pass e.g. stage_order=['lora', 'reft'] (or the string 'lora reft')."
        )
    for stage in stage_order:
        if not isinstance(stage, str):
            raise TypeError(
                f"stage_order={list(stage_order)!r} holds {stage!r} of type {type(stage).__name__}; stages are named "
                "by strings: 'lora', 'reft' or 'joint'."
            )
    stages = [s.strip().lower() for s in stage_order]
    if not stages:
        raise ValueError("stage_order is empty; list at least one of 'lora', 'reft', 'joint'.")
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"Unknown stage {unknown[0]!r} in stage_order; use 'lora', 'reft' or 'joint'.")
    if len(set(stages)) != len(stages):
        raise ValueError(f"stage_order {stages} repeats a stage; each stage has one set of options, list it once.")
    return stages
