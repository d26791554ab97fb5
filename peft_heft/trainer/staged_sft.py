"""``StagedSFTTrainer``: TRL's ``SFTTrainer`` running HEFT's stages (LoRA, then ReFT) in one ``train()`` call.

The pre-flight checks are in :mod:`.validation`, checkpoint markers and resuming in :mod:`.checkpoints`, the atomic
save in :mod:`peft_heft.persistence`. The fine-stage search (:func:`peft_heft.trainer.search.run_fine_stage_search`)
drives this trainer through its public per-stage API (:meth:`StagedSFTTrainer.train_stage`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

from peft import PeftConfig
from transformers import set_seed
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import (
    TrainOutput,
    enable_full_determinism,
)
from transformers.utils import logging
from trl import SFTTrainer

from ..persistence import save_trainer_output
from ..tuner.model import HeftModel, _find_heft_tuner
from .callbacks import StageProgressCallback
from .checkpoints import (
    CheckpointCompleter,
    StageCheckpointsMixin,
    checkpoint_state,
    read_marker,
    remove_stale_marker,
    resolve_resume_checkpoint,
    resumed_loss_total,
)
from .collator import PROMPT_LENGTH_COLUMN, DataCollatorForHeft
from .config import HeftSFTConfig, derived_arguments
from .data import PromptLengthsMixin
from .labelled_lm_head import score_labelled_positions_only
from .packing import check_packed_attention, packs_batches
from .reporting import StageReportMixin
from .sharding import ShardedStagesMixin
from .validation import (
    as_heft_args,
    check_not_empty,
    check_output_dir,
    check_processing_class,
    check_same_adapter,
    check_supported,
)

logger = logging.get_logger(__name__)


class StagedSFTTrainer(ShardedStagesMixin, StageReportMixin, StageCheckpointsMixin, PromptLengthsMixin, SFTTrainer):
    r"""
    [`~trl.SFTTrainer`] that trains a HEFT adapter stage by stage: LoRA first, then ReFT interventions on top.

    Takes the same arguments as [`~trl.SFTTrainer`]; `args` is a [`HeftSFTConfig`] and `peft_config` a [`HeftConfig`]
    (or `model` is already a HEFT `PeftModel`). `train()` runs every stage of `args.stage_order`: for each it switches
    the trainable parameters in place (`model.set_stage`), builds a fresh optimizer and learning-rate schedule over
    exactly those parameters with the stage's epochs/steps, learning rate and warmup, trains, and evaluates.

    Interventions are placed on each example's prompt tokens, the tokens `generate()` intervenes on at inference: the
    collator adds `intervention_locations` from the prompt of prompt-completion and conversational data (the whole
    sequence for plain text). Packing and padding-free batches are refused, since they drop the prompt boundaries.

    `train_stage(stage)` trains one stage alone (the search uses it); `completed_stages` holds each finished stage's
    metrics. Neither `train()` nor `train_stage()` changes the `args` object you passed: each stage trains under its
    own copy (`args.for_stage(stage)`), which is `trainer.args` while the stage runs.

    Checkpoints go to `output_dir/stage-<i>-<stage>/checkpoint-<step>` and are complete only once
    `heft_checkpoint.json` is written (last, atomically); `train(resume_from_checkpoint=True)` resumes the latest
    complete one in its stage, with its optimizer, scheduler and RNG state.

    Args:
        model (`str` or `PreTrainedModel` or `PeftModel`): a model id/path, a model, or a HEFT `PeftModel`.
        args (`HeftSFTConfig`): every `SFTConfig` option plus the stage schedule.
        data_collator (`Callable`, *optional*): wrapped in `DataCollatorForHeft` (TRL's collator when `None`).
        train_dataset (`datasets.Dataset`, *optional*): any TRL SFT format; `packing=True` (strategy `'bfd'`) and
            `padding_free=True` keep each sequence's prompt and attention apart (:mod:`peft_heft.trainer.packing`).
        eval_dataset (`datasets.Dataset`, *optional*): evaluated at each stage end (and per `eval_strategy`).
        processing_class (`PreTrainedTokenizerBase`, *optional*): the tokenizer.
        optimizers (`tuple`): must stay `(None, None)`: each stage builds its own optimizer and schedule.
        peft_config (`HeftConfig`, *optional*): the adapter to create when `model` is not a HEFT `PeftModel`.
        padding_side (`str`, *optional*): `"left"` to left-pad training batches.
        **kwargs (`Any`): passed to `SFTTrainer` (`callbacks`, `compute_metrics`, `formatting_func`, ...).

    Example:
    ```python
    >>> from peft_heft import HeftConfig, HeftSFTConfig, StagedSFTTrainer
    >>> args = HeftSFTConfig(output_dir="out", lora_num_train_epochs=3, reft_num_train_epochs=3,
    ...                      lora_learning_rate=2e-4, reft_learning_rate=9e-4)
    >>> trainer = StagedSFTTrainer(model="path/to/model", args=args, train_dataset=ds,
    ...                            peft_config=HeftConfig(target_modules=["q_proj", "v_proj"]))
    >>> trainer.train()
    >>> trainer.save_model()
    ```
    """

    # narrower than Trainer's annotations: args is always a HeftSFTConfig, model a HEFT PeftModel (or its wrapper)
    args: HeftSFTConfig
    model: Any
    _tag_names = ["trl", "sft", "peft-heft", "heft"]
    _name = "HEFT SFT"

    def __init__(
        self,
        model,
        args: HeftSFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        optimizers=(None, None),
        peft_config: PeftConfig | None = None,
        padding_side: str = "right",
        **kwargs,
    ):
        args = as_heft_args(args, model)
        check_supported(args, model, peft_config, optimizers)
        if padding_side == "left" and packs_batches(args):
            raise ValueError(
                "padding_side='left' has no meaning with padding_free=True or packing=True: the flattened rows have no "
                "padding. Leave padding_side at its default."
            )
        check_processing_class(model, processing_class)
        check_not_empty(train_dataset, eval_dataset)
        check_output_dir(args)
        self._stage_index: int | None = None
        self._stage_name: str | None = None
        self._stage_trial = None
        self._stage_base_args: HeftSFTConfig | None = None  # what the running stage's copy of the args came from
        # total training loss of the resumed stage's steps before its checkpoint (from the marker)
        self._stage_loss_offset = 0.0
        self._completed_stages: dict[str, dict[str, float]] = {}
        self.stage_log_history: list[dict[str, Any]] = []
        # set by the fine-stage search (run_fine_stage_search), summarized in the model card
        self.search_record: dict[str, Any] | None = None
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            optimizers=optimizers,
            peft_config=peft_config,
            **kwargs,
        )
        heft = _find_heft_tuner(self.model)
        if heft is None:
            raise TypeError(
                "StagedSFTTrainer trains HEFT adapters: pass peft_config=HeftConfig(...) or a model wrapped with one."
            )
        self._heft: HeftModel = heft
        score_labelled_positions_only(self.model.get_base_model())
        config = self.model.peft_config[self.model.active_adapter]
        self.data_collator = DataCollatorForHeft(
            self.data_collator,
            config.position_spec,
            share_weights=config.share_intervention_weights,
            padding_side=padding_side,
        )
        if packs_batches(args):
            check_packed_attention(self.model)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(StageProgressCallback)
        # first, so that a checkpoint is complete (marker written) before any other callback hears of it
        self.callback_handler.callbacks.insert(0, CheckpointCompleter(self._complete_checkpoint))
        self._check_prompts_fit(self.train_dataset)
        if isinstance(args.dataset_kwargs, dict) and args.dataset_kwargs.get("skip_prepare_dataset", False):
            logger.warning(
                "skip_prepare_dataset=True: the trainer cannot find where each prompt ends, so interventions go on "
                f"all tokens unless your examples carry a '{PROMPT_LENGTH_COLUMN}' column."
            )

    # ------------------------------------------------------------------ what others read
    @property
    def stage(self) -> str | None:
        """The stage being trained, or `None` outside `train()` / `train_stage()`."""
        return self._stage_name

    @property
    def stage_index(self) -> int | None:
        """The position of the stage being trained in `args.stage_order`, or `None` outside a stage."""
        return self._stage_index

    @property
    def heft_model(self) -> HeftModel:
        """The HEFT tuner of the trained model (`set_stage`, `replace_interventions`, ...)."""
        return self._heft

    @property
    def _output_dir(self) -> str:
        # TrainingArguments.__post_init__ replaces a missing output_dir with "trainer_output"; never None here
        return str(self.args.output_dir)

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run every stage of `args.stage_order`; returns a `TrainOutput` whose metrics cover all stages.

        Args:
            resume_from_checkpoint (`str` or `bool`, *optional*):
                A checkpoint folder written by this trainer, or `True` for the latest complete one in `output_dir`.
                Training continues in that checkpoint's stage, then runs the remaining stages.
        """
        stages = list(self.args.stage_order)
        start, checkpoint = 0, None
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in ("true", "false"):
            resume_from_checkpoint = resume_from_checkpoint.strip().lower() == "true"  # from the command line
        if resume_from_checkpoint not in (None, False):
            checkpoint, marker = resolve_resume_checkpoint(resume_from_checkpoint, self._output_dir, stages)
            adapter = self.model.active_adapter
            check_same_adapter(checkpoint, self.model.peft_config[adapter], adapter)
            start = int(marker["stage_index"])
            self.record_stages(marker.get("completed_stages", {}), marker.get("stage_log_history", []))
            start, checkpoint = self._skip_finished_stage(start, stages, checkpoint, marker)
        else:
            self.record_stages({}, [])
        total_start = time.time()
        for index in range(start, len(stages)):
            self.train_stage(
                stages[index],
                resume_from_checkpoint=checkpoint if index == start else None,
                trial=trial,
                ignore_keys_for_eval=ignore_keys_for_eval,
                **kwargs,
            )
        self.state.log_history = list(self.stage_log_history)
        return self.combined_output(stages, time.time() - total_start)

    def _skip_finished_stage(self, index: int, stages: list[str], checkpoint: str, marker: dict) -> tuple:
        """A checkpoint taken at a stage's last step closes that stage: load it and start the next stage fresh."""
        state = checkpoint_state(checkpoint)
        if not (state.max_steps > 0 and state.global_step >= state.max_steps):
            return index, checkpoint
        self._stage_index, self._stage_name = index, stages[index]
        try:
            self._load_from_checkpoint(checkpoint)
        finally:
            self._stage_index = self._stage_name = None
        # the stage's train_loss, as Trainer computes it: the total loss of its steps over their number
        total = resumed_loss_total(marker, state)
        self._completed_stages[stages[index]] = {
            "train_steps": state.global_step,
            "train_loss": total / state.global_step if state.global_step else math.nan,
        }
        self.stage_log_history.extend(state.log_history)
        return index + 1, None

    def train_stage(
        self,
        stage: str,
        *,
        resume_from_checkpoint: str | None = None,
        trial=None,
        ignore_keys_for_eval=None,
        args_overrides: Mapping[str, Any] | None = None,
        **kwargs,
    ) -> TrainOutput:
        """Train one stage of `args.stage_order` and record its metrics in `completed_stages`; returns its output.

        The stage's trainable parameters are switched in place, and it trains with a fresh optimizer and schedule on
        its own copy of the arguments (`args.for_stage(stage)`), seeded with `args.seed + <its index>`. The `args`
        you passed are never changed; `trainer.args` is the stage's copy while it runs.

        Args:
            stage (`str`): `"lora"`, `"reft"` or `"joint"`, one of `args.stage_order`.
            resume_from_checkpoint (`str`, *optional*): a complete checkpoint folder of this stage to continue from
                (`train(resume_from_checkpoint=True)` finds the latest one of a run).
            trial (`optuna.Trial` or `dict`, *optional*): passed to `Trainer.train`.
            ignore_keys_for_eval (`list[str]`, *optional*): passed to `Trainer.train`.
            args_overrides (`Mapping`, *optional*): options set on this stage's copy of the arguments before the
                stage's own options are applied (e.g. `{"reft_learning_rate": 1e-3, "save_strategy": "no"}`).
            **kwargs (`Any`): passed to `Trainer.train`.

        Returns:
            `TrainOutput`: the stage's steps, train loss and metrics (with its evaluation at the end).
        """
        order = list(self.args.stage_order)
        if stage not in order:
            raise ValueError(f"Stage {stage!r} is not in args.stage_order={order}; train_stage trains one of them.")
        if resume_from_checkpoint is not None and not isinstance(resume_from_checkpoint, (str, os.PathLike)):
            raise TypeError(
                "train_stage(resume_from_checkpoint=...) takes a checkpoint folder of the stage; to resume the latest "
                "checkpoint of a run, call train(resume_from_checkpoint=True)."
            )
        index = order.index(stage)
        checkpoint = None if resume_from_checkpoint is None else os.fspath(resume_from_checkpoint)
        base = self.args
        self._stage_index, self._stage_name, self._stage_trial = index, stage, trial
        try:
            output, metrics = self._run_stage(
                base, index, stage, checkpoint, trial, ignore_keys_for_eval, args_overrides, **kwargs
            )
            self.stage_log_history.extend(self.state.log_history)
            self._completed_stages[stage] = metrics
            self._call_stage_event("on_stage_end", metrics=metrics)
        finally:
            self._stage_index = self._stage_name = self._stage_trial = None
        return TrainOutput(global_step=output.global_step, training_loss=metrics["train_loss"], metrics=metrics)

    def _run_stage(self, base, index, stage, checkpoint, trial, ignore_keys_for_eval, args_overrides, **kwargs):
        self._release_stage_engine()
        if checkpoint is None:
            self._apply_stage(stage)  # when resuming, done after the checkpoint's weights are loaded
        elif self._sharded:
            # FSDP2 / DeepSpeed load the checkpoint after `prepare`, from their own files, which hold only the
            # parameters trainable when it was written: the complete adapter (a frozen LoRA too) and the stage's
            # trainable set must be in place before `prepare` builds the optimizer over them
            self._load_from_checkpoint(checkpoint)
        self._shard_interventions_in_their_dtype()
        # Each stage starts from its own seed (the data order derives from it); a resumed stage then gets the
        # checkpoint's RNG state back from Trainer
        enable_full_determinism(base.seed + index) if base.full_determinism else set_seed(base.seed + index)
        # A fresh optimizer, schedule and DDP wrapper over exactly this stage's trainable parameters
        self.optimizer, self.lr_scheduler = None, None
        self.model_wrapped = self.model
        resumed_steps = 0
        self._stage_loss_offset = 0.0
        if checkpoint is not None:
            state = checkpoint_state(checkpoint)
            resumed_steps = state.global_step
            self._stage_loss_offset = resumed_loss_total(read_marker(checkpoint) or {}, state)
        # Trainer's own rotation would delete an older complete checkpoint before the new one has its marker: this
        # copy rotates nothing, _complete_checkpoint rotates with the user's limit once the marker is written
        self._stage_base_args = base
        self.args = derived_arguments(base, **dict(args_overrides or {})).for_stage(stage, save_total_limit=None)
        try:
            self._call_stage_event("on_stage_begin")
            output = super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
            if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
                self._apply_stage(stage)  # loading the best checkpoint's trainable adapter selected the joint stage
                self._keep_only_best(base.save_total_limit, trial)
            metrics = dict(output.metrics)
            metrics["train_steps"] = output.global_step
            if checkpoint is not None:
                # Trainer's train_loss covers only the steps of this call: add the steps before the checkpoint back
                this_call = output.training_loss * max(output.global_step - resumed_steps, 0.001)
                total = self._stage_loss_offset + this_call
                metrics["train_loss"] = total / output.global_step if output.global_step else math.nan
                for entry in reversed(self.state.log_history):
                    if "train_loss" in entry:
                        entry["train_loss"] = metrics["train_loss"]
                        break
            if self.eval_dataset is not None and not self._evaluated_at_last_step():
                metrics.update(self.evaluate())
            else:
                metrics.update({k: v for k, v in self._last_eval_logs().items() if k.startswith("eval_")})
        finally:
            self.args, self._stage_base_args = base, None
        return output, metrics

    def _apply_stage(self, stage: str) -> None:
        trains_lora = stage in ("lora", "joint")
        merged = any(getattr(m, "merged", False) for m in self.model.modules() if hasattr(m, "merged_adapters"))
        if trains_lora and merged:
            self.model.unmerge_adapter()
        elif not trains_lora and self.args.merge_lora_before_reft and not merged:
            self.model.merge_adapter()
        # A LoRA stage after a ReFT stage (the ReFT-then-LoRA ablation) trains on top of the trained interventions,
        # as inference will apply them; a LoRA stage that comes first trains without them.
        order = list(self.args.stage_order)
        index = self._stage_index if self._stage_index is not None else order.index(stage)
        after_reft = any(earlier in ("reft", "joint") for earlier in order[:index])
        self._heft.set_stage(stage, apply_interventions=True if stage == "lora" and after_reft else None)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._sharded and model is None:
            self._load_complete_adapter(resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._stage_name is not None:
            self._apply_stage(self._stage_name)  # loading a trainable adapter selects the joint stage

    def _call_stage_event(self, event: str, **kwargs) -> None:
        for callback in self.callback_handler.callbacks:
            handler = getattr(callback, event, None)
            if callable(handler):
                handler(
                    self.args,
                    self.state,
                    self.control,
                    stage=self._stage_name,
                    stage_index=self._stage_index,
                    num_stages=len(self.args.stage_order),
                    model=self.model,
                    **kwargs,
                )

    def _last_eval_logs(self) -> dict[str, Any]:
        for entry in reversed(self.state.log_history):
            if "eval_loss" in entry:
                return entry
        return {}

    def _evaluated_at_last_step(self) -> bool:
        if self.args.load_best_model_at_end:
            return False  # the best checkpoint was just loaded: evaluate the model the next stage starts from
        return self._last_eval_logs().get("step") == self.state.global_step and self.state.global_step > 0

    # ------------------------------------------------------------------ checkpoints and saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the HEFT adapter (both stages' weights) to `output_dir`; an earlier save there stays loadable until
        this one is complete.

        Everything is written into a staging folder inside `output_dir` and flushed to disk, the staging folder is
        marked complete, and each file is moved over the old one with one atomic rename
        (`peft_heft.persistence.save_trainer_output`). A process killed at any moment leaves the old adapter or the new
        one (a committed staging folder is finished by the next save or the next load); staging folders of killed
        saves are removed by the next save. The training arguments are written as `training_args.json` (no pickle in
        the folder, so `push_to_hub` uploads none).
        """
        if _internal_call and output_dir is not None and self.args.should_save:
            remove_stale_marker(output_dir)  # a checkpoint being (re)written is incomplete until its new marker
        if self._sharded:
            return self._save_sharded(output_dir, _internal_call)
        if _internal_call or not self.args.should_save:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self._output_dir

        def write(staging: str) -> None:
            super(StagedSFTTrainer, self).save_model(staging, True)
            self.write_heft_card(staging, model_id=output_dir)  # PEFT's card gets the HEFT section

        save_trainer_output(output_dir, self.args, write)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
