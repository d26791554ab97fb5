"""Stage events for callbacks, and a progress bar that names the running stage."""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class HeftCallback(TrainerCallback):
    """A [`~transformers.TrainerCallback`] that also hears when a HEFT stage begins and ends.

    [`StagedSFTTrainer`] calls `on_stage_begin` / `on_stage_end` on every callback that defines them (subclassing this
    class is optional), with the keyword arguments `stage` (`"lora"`, `"reft"` or `"joint"`), `stage_index`,
    `num_stages` and `model`; `on_stage_end` also gets `metrics`, the stage's train (and eval) metrics.

    Example:
    ```python
    >>> from peft_heft import HeftCallback
    >>> class PrintStages(HeftCallback):
    ...     def on_stage_end(self, args, state, control, stage=None, metrics=None, **kwargs):
    ...         print(stage, metrics["train_loss"])
    >>> trainer = StagedSFTTrainer(..., callbacks=[PrintStages()])
    ```
    """

    def on_stage_begin(self, args, state, control, **kwargs):
        """Called before a stage trains, after its parameters were switched (`kwargs["stage"]` names it)."""

    def on_stage_end(self, args, state, control, **kwargs):
        """Called after a stage trained and was evaluated; `kwargs["metrics"]` holds its metrics."""


class StageProgressCallback(ProgressCallback, HeftCallback):
    """transformers' progress bar, titled with the running stage (``HEFT 1/2 lora``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stage_label: str | None = None

    def on_stage_begin(self, args, state, control, stage=None, stage_index=0, num_stages=1, **kwargs):
        self.stage_label = f"HEFT {stage_index + 1}/{num_stages} {stage}"

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if state.is_world_process_zero and self.stage_label and self.training_bar is not None:
            self.training_bar.set_description(self.stage_label)
