"""``HeftSFTConfig``: TRL's ``SFTConfig`` plus the per-stage schedule of HEFT."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

STAGE_NAMES = ("lora", "reft", "joint")
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
        if isinstance(self.stage_order, str):
            self.stage_order = [s for s in self.stage_order.replace(",", " ").split() if s]
        self.stage_order = [str(s).strip().lower() for s in self.stage_order]
        if not self.stage_order:
            raise ValueError("stage_order is empty; list at least one of 'lora', 'reft', 'joint'.")
        unknown = [s for s in self.stage_order if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"Unknown stage {unknown[0]!r} in stage_order; use 'lora', 'reft' or 'joint'.")
        if len(set(self.stage_order)) != len(self.stage_order):
            raise ValueError(
                f"stage_order {self.stage_order} repeats a stage; each stage has one set of options, list it once."
            )
        super().__post_init__()
        for stage in self.stage_order:
            options = self.stage_options(stage)
            if options["max_steps"] is not None and options["max_steps"] > 0:
                continue
            if options["max_steps"] not in (None, -1):
                raise ValueError(
                    f"{stage}_max_steps={options['max_steps']}: a listed stage needs > 0 steps (or leave it unset to "
                    "train by epochs)."
                )
            if options["num_train_epochs"] is None or options["num_train_epochs"] <= 0:
                raise ValueError(
                    f"Stage {stage!r} would train {options['num_train_epochs']} epochs. Set {stage}_num_train_epochs "
                    f"> 0 or {stage}_max_steps > 0, or remove {stage!r} from stage_order."
                )
        for stage in STAGE_NAMES:
            lr = getattr(self, f"{stage}_learning_rate")
            if lr is not None and lr <= 0:
                raise ValueError(f"{stage}_learning_rate must be > 0, got {lr}.")

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
