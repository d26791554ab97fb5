"""``StagedSFTTrainer``: TRL's ``SFTTrainer`` running HEFT's stages (LoRA, then ReFT) in one ``train()`` call."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from peft import PeftConfig
from transformers import set_seed
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import ProgressCallback, TrainerState
from transformers.trainer_utils import TrainOutput, enable_full_determinism, rotate_checkpoints
from transformers.training_args import ParallelMode
from transformers.utils import logging
from trl import SFTTrainer
from trl.data_utils import get_dataset_column_names

from ..config import HeftConfig
from ..fs import fsync_tree
from ..model import INTERVENTION_SETTINGS, HeftModel, _find_heft_tuner
from ..modelcard import replace_quick_start, update_model_card
from ..saving import finish_interrupted_saves, new_staging_folder, replace_into
from .callbacks import StageProgressCallback
from .checkpoints import (
    MARKER_NAME,
    checkpoint_files,
    resolve_resume_checkpoint,
    stage_dir_name,
    write_json_atomic,
)
from .collator import PROMPT_LENGTH_COLUMN, DataCollatorForHeft
from .config import PER_STAGE_OPTIONS, HeftSFTConfig
from .labelled_lm_head import score_labelled_positions_only
from .prompts import (
    FULL_LENGTH_COLUMN,
    pretokenized_prompt_length_fn,
    prompt_length_fn,
    truncate_prompt_length_fn,
)

logger = logging.get_logger(__name__)
TRAINING_ARGS_JSON = "training_args.json"


class StagedSFTTrainer(SFTTrainer):
    r"""
    [`~trl.SFTTrainer`] that trains a HEFT adapter stage by stage: LoRA first, then ReFT interventions on top.

    Takes the same arguments as [`~trl.SFTTrainer`]; `args` is a [`HeftSFTConfig`] and `peft_config` a [`HeftConfig`]
    (or `model` is already a HEFT `PeftModel`). `train()` runs every stage of `args.stage_order`: for each it switches
    the trainable parameters in place (`model.set_stage`), builds a fresh optimizer and learning-rate schedule over
    exactly those parameters with the stage's epochs/steps, learning rate and warmup, trains, and evaluates.

    Interventions are placed on each example's prompt tokens, the tokens `generate()` intervenes on at inference: the
    collator adds `intervention_locations` from the prompt of prompt-completion and conversational data (the whole
    sequence for plain text). Packing and padding-free batches are refused, since they drop the prompt boundaries.

    Checkpoints go to `output_dir/stage-<i>-<stage>/checkpoint-<step>` and are complete only once
    `heft_checkpoint.json` is written (last, atomically); `train(resume_from_checkpoint=True)` resumes the latest
    complete one in its stage, with its optimizer, scheduler and RNG state.

    Args:
        model (`str` or `PreTrainedModel` or `PeftModel`): a model id/path, a model, or a HEFT `PeftModel`.
        args (`HeftSFTConfig`): every `SFTConfig` option plus the stage schedule.
        data_collator (`Callable`, *optional*): wrapped in `DataCollatorForHeft` (TRL's collator when `None`).
        train_dataset (`datasets.Dataset`, *optional*): any TRL SFT format; packing is refused.
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
        args = _as_heft_args(args, model)
        _check_supported(args, model, peft_config, optimizers)
        _check_processing_class(model, processing_class)
        _check_not_empty(train_dataset, eval_dataset)
        _check_output_dir(args)
        self._stage_index: int | None = None
        self._stage_name: str | None = None
        # total (not mean) training loss of the resumed stage's steps before its checkpoint, from the marker
        self._resume_loss_total = 0.0
        self._stage_loss_offset = 0.0
        self._completed_stages: dict[str, dict[str, float]] = {}
        self.stage_log_history: list[dict[str, Any]] = []
        self._search_record: dict[str, Any] | None = None  # set by search_fine_stage, summarized in the model card
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
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(StageProgressCallback)
        self._check_prompts_fit(self.train_dataset)
        if self._skip_prepare_dataset:
            logger.warning(
                "skip_prepare_dataset=True: the trainer cannot find where each prompt ends, so interventions go on "
                f"all tokens unless your examples carry a '{PROMPT_LENGTH_COLUMN}' column."
            )

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if packing:
            raise ValueError(_PACKING_ERROR)
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
        pretokenized = _check_dataset_format(dataset, args, formatting_func, dataset_name)
        if pretokenized:
            dataset = dataset.map(pretokenized_prompt_length_fn, **map_kwargs)
        rows_before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if rows_before and isinstance(dataset, Dataset) and len(dataset) < rows_before:
            _report_dropped_rows(rows_before, len(dataset), args, dataset_name)
        keep_end = args.max_length is not None and args.truncation_mode == "keep_end"
        if not pretokenized:
            if isinstance(dataset, Dataset):
                map_kwargs["desc"] = f"Finding prompt tokens of {dataset_name} dataset"
            dataset = dataset.map(
                prompt_length_fn,
                fn_kwargs={
                    "tokenizer": self._tokenizer,
                    "chat_template": self.chat_template,
                    "keep_end": keep_end,
                },
                **map_kwargs,
            )
        if isinstance(dataset, Dataset):
            map_kwargs["desc"] = f"Fitting prompt lengths of {dataset_name} dataset to truncation"
        return dataset.map(
            truncate_prompt_length_fn,
            fn_kwargs={"keep_end": keep_end},
            remove_columns=[FULL_LENGTH_COLUMN],
            **map_kwargs,
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if PROMPT_LENGTH_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, PROMPT_LENGTH_COLUMN]

    def _check_prompts_fit(self, dataset) -> None:
        if not isinstance(dataset, Dataset) or PROMPT_LENGTH_COLUMN not in dataset.column_names or not len(dataset):
            return
        lengths = dataset[PROMPT_LENGTH_COLUMN]
        empty = sum(1 for n in lengths if n == 0)
        if empty == len(lengths) and any(s != "lora" for s in self.args.stage_order):
            raise ValueError(
                "No training example keeps any prompt token after truncation, so the interventions have no position "
                f"to act on (max_length={self.args.max_length}, truncation_mode={self.args.truncation_mode!r}). "
                "Raise max_length or use truncation_mode='keep_start'."
            )
        if empty:
            logger.warning(
                f"{empty} of {len(lengths)} training examples keep no prompt token after truncation; the "
                "interventions skip them."
            )

    # ------------------------------------------------------------------ stages
    @property
    def _output_dir(self) -> str:
        # TrainingArguments.__post_init__ replaces a missing output_dir with "trainer_output"; never None here
        return str(self.args.output_dir)

    @property
    def stage(self) -> str | None:
        """The stage being trained, or `None` outside `train()`."""
        return self._stage_name

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
            _check_same_adapter(checkpoint, self.model.peft_config[adapter], adapter)
            start = int(marker["stage_index"])
            self._completed_stages = {k: dict(v) for k, v in marker.get("completed_stages", {}).items()}
            self.stage_log_history = list(marker.get("stage_log_history", []))
            start, checkpoint = self._skip_finished_stage(start, stages, checkpoint, marker)
        else:
            self._completed_stages, self.stage_log_history = {}, []
        total_start = time.time()
        try:
            for index in range(start, len(stages)):
                self._train_stage(
                    index, stages[index], checkpoint if index == start else None, trial, ignore_keys_for_eval, **kwargs
                )
        finally:
            self._stage_index = self._stage_name = None
        self.state.log_history = list(self.stage_log_history)
        return self._combined_output(stages, time.time() - total_start)

    def search_fine_stage(
        self,
        n_trials: int,
        search_space=None,
        *,
        metric: str = "eval_loss",
        direction: str | None = None,
        storage: str | None = None,
        study_name: str | None = None,
        sampler=None,
        pruner=None,
        output_dir: str | None = None,
    ):
        """Train the coarse (LoRA) stage once, then search the fine (ReFT) stage with Optuna; returns the study.

        The LoRA stage of `args.stage_order` is trained once (skipped when this trainer already trained it, or loaded
        from `<output_dir>/search/coarse` when an earlier run of the search saved it there). Each of the `n_trials`
        trials then restores the coarse weights in place (checked bitwise; the model is not reloaded), rebuilds the
        interventions with the trial's settings ([`HeftModel.replace_interventions`]), sets the ReFT stage's learning
        rate and epochs, and trains the ReFT stage. Every evaluation (per `eval_strategy`, and at the stage's end)
        reports `metric` to the trial; a trial the pruner stops ends pruned. At the end the best trial's settings and
        intervention weights are put on the model, so `save_model()` saves it as a normal HEFT adapter, and the study
        is written to `<output_dir>/search/study.json` (every trial's number, parameters, value, state, duration) and
        `study.png`. Stages after the ReFT stage in `stage_order` are not run by the search.

        Args:
            n_trials (`int`): trials to run in this call (a resumed study adds them to its earlier ones).
            search_space (`FineStageSearchSpace`, *optional*): the settings to search; the default one when `None`.
                Checked against the model before any training.
            metric (`str`, defaults to `"eval_loss"`): the evaluation metric compared (`eval_` is prepended if
                missing); it must be computed by `evaluate()`.
            direction (`str`, *optional*): `"minimize"` or `"maximize"`; by default minimize losses, maximize others.
            storage (`str`, *optional*): an Optuna storage URL such as `"sqlite:///search.db"`; the study is loaded
                from it if it exists (resume), and the coarse stage is reloaded from `<output_dir>/search/coarse`.
            study_name (`str`, *optional*): the study's name (`"heft-fine-stage"` with a storage).
            sampler (`optuna.samplers.BaseSampler`, *optional*): by default `TPESampler(seed=args.seed)`.
            pruner (`optuna.pruners.BasePruner`, *optional*): by default Optuna's (`MedianPruner`).
            output_dir (`str`, *optional*): where `search/` goes; `args.output_dir` by default.

        Raises:
            `ImportError`: Optuna is not installed (`pip install optuna`).
            `ValueError`: no `eval_dataset`, a metric that is not computed, several processes, a stage order without
                a LoRA stage before a ReFT stage, or a search space this model cannot take.

        Example:
        ```python
        >>> from peft_heft.trainer.search import FineStageSearchSpace
        >>> study = trainer.search_fine_stage(20, FineStageSearchSpace(ranks=[1, 4]), storage="sqlite:///s.db")
        >>> trainer.save_model()  # the best trial's adapter
        ```
        """
        from .search import run_fine_stage_search

        return run_fine_stage_search(
            self,
            n_trials,
            search_space,
            metric=metric,
            direction=direction,
            storage=storage,
            study_name=study_name,
            sampler=sampler,
            pruner=pruner,
            output_dir=output_dir,
        )

    def _skip_finished_stage(
        self, index: int, stages: list[str], checkpoint: str, marker: dict | None = None
    ) -> tuple[int, str | None]:
        """A checkpoint taken at a stage's last step closes that stage: load it and start the next stage fresh."""
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        self._resume_loss_total = _resumed_loss_total(marker or {}, state)
        if not (state.max_steps > 0 and state.global_step >= state.max_steps):
            return index, checkpoint
        self._stage_index, self._stage_name = index, stages[index]
        self._load_from_checkpoint(checkpoint)
        # the stage's train_loss, as Trainer computes it: the total loss of its steps over their number
        self._completed_stages[stages[index]] = {
            "train_steps": state.global_step,
            "train_loss": self._resume_loss_total / state.global_step if state.global_step else math.nan,
        }
        self.stage_log_history.extend(state.log_history)
        return index + 1, None

    def _train_stage(self, index, stage, checkpoint, trial, ignore_keys_for_eval, **kwargs) -> None:
        args = self.args
        self._stage_index, self._stage_name = index, stage
        if checkpoint is None:
            self._apply_stage(stage)  # when resuming, done after the checkpoint's weights are loaded
        # Each stage starts from its own seed (the data order derives from it); a resumed stage then gets the
        # checkpoint's RNG state back from Trainer
        enable_full_determinism(args.seed + index) if args.full_determinism else set_seed(args.seed + index)
        # A fresh optimizer, schedule and DDP wrapper over exactly this stage's trainable parameters
        self.optimizer, self.lr_scheduler = None, None
        self.model_wrapped = self.model
        saved = {option: getattr(args, option) for option in PER_STAGE_OPTIONS}
        for option, value in args.stage_options(stage).items():
            setattr(args, option, value)
        self._stage_loss_offset = self._resume_loss_total if checkpoint is not None else 0.0
        self._call_stage_event("on_stage_begin")
        try:
            output = super().train(
                resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
            metrics = dict(output.metrics)
            metrics["train_steps"] = output.global_step
            if checkpoint is not None:
                # Trainer's train_loss covers only the steps of this call: add the steps before the checkpoint back
                total = self._stage_loss_offset + self._total_loss_scalar
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
            for option, value in saved.items():
                setattr(args, option, value)
        self.stage_log_history.extend(self.state.log_history)
        self._completed_stages[stage] = metrics
        self._call_stage_event("on_stage_end", metrics=metrics)

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
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._stage_name is not None:
            self._apply_stage(self._stage_name)  # loading a trainable adapter selects the joint stage

    def _load_best_model(self) -> None:
        super()._load_best_model()  # best checkpoint of the current stage (checkpoints are tracked per stage)
        if self._stage_name is not None:
            self._apply_stage(self._stage_name)

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

    def _combined_output(self, stages: list[str], runtime: float) -> TrainOutput:
        metrics: dict[str, float] = {}
        steps, weighted_loss = 0, 0.0
        for stage in stages:
            stage_metrics = self._completed_stages.get(stage, {})
            for key, value in stage_metrics.items():
                metrics[f"{stage}_{key}"] = value
            n = int(stage_metrics.get("train_steps", 0))
            steps += n
            weighted_loss += n * float(stage_metrics.get("train_loss", 0.0))
        metrics["train_runtime"] = sum(self._completed_stages.get(s, {}).get("train_runtime", 0.0) for s in stages)
        metrics["train_steps"] = steps
        metrics["train_loss"] = weighted_loss / steps if steps else math.nan
        metrics["total_wall_time"] = runtime
        return TrainOutput(global_step=steps, training_loss=metrics["train_loss"], metrics=metrics)

    def log(self, logs: dict[str, Any], start_time: float | None = None) -> None:
        if self._stage_name is not None:
            logs = {**logs, "stage": self._stage_name}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        if self._stage_index is None or self._stage_name is None:
            return run_dir
        return os.path.join(run_dir, stage_dir_name(self._stage_index, self._stage_name))

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        stale_marker = os.path.join(folder, MARKER_NAME)
        if self.args.should_save and os.path.isfile(stale_marker):
            os.remove(stale_marker)  # rewriting a checkpoint of an earlier run: incomplete until the new marker lands
        # Rotation must not delete an older complete checkpoint before the new one is complete: run it after the marker
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        # every rank writes its own RNG state into the folder: the marker's file list must come after all of them
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        # the stage's running loss total so far (drained into _total_loss_scalar at each log, the rest in _tr_loss)
        tr_loss = getattr(self, "_tr_loss", None)
        stage_loss = self._stage_loss_offset + getattr(self, "_total_loss_scalar", 0.0)
        stage_loss += float(tr_loss.item()) if tr_loss is not None else 0.0
        fsync_tree(folder)
        write_json_atomic(
            os.path.join(folder, MARKER_NAME),
            {
                "format": 2,
                "stage_index": self._stage_index,
                "stage": self._stage_name,
                "stage_order": list(self.args.stage_order),
                "global_step": self.state.global_step,
                "completed_stages": self._completed_stages,
                "stage_log_history": self.stage_log_history,
                "stage_train_loss": {"total": stage_loss, "steps": self.state.global_step},
                "files": checkpoint_files(folder),
            },
        )
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the HEFT adapter (both stages' weights) to `output_dir`; an earlier save there stays loadable until
        this one is complete.

        Everything is written into a staging folder inside `output_dir` and flushed to disk, the staging folder is
        marked complete, and each file is moved over the old one with one atomic rename. A process killed at any
        moment leaves the old adapter or the new one (a committed staging folder is finished by the next save or the
        next load); staging folders of killed saves are removed by the next save. The training arguments are written
        as `training_args.json` (no pickle in the folder, so `push_to_hub` uploads none).
        """
        if _internal_call or not self.args.should_save or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self._output_dir
        save_staged(output_dir, self.args, lambda staging: super(StagedSFTTrainer, self).save_model(staging, True))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def create_model_card(  # type: ignore[override]  # TRL's signature, which differs from Trainer's
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None
    ) -> None:
        """TRL's model card, with TRL's quick start replaced by HEFT's loading code (which needs `import peft_heft`)
        and a HEFT section: both stages' settings, their schedule, the data set and the final metrics."""
        if not self.is_world_process_zero():
            return
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self._output_dir, "README.md")
        model_id = self.hub_model_id or self.args.hub_model_id or self._output_dir
        replace_quick_start(path, model_id)
        config = self.model.peft_config[self.model.active_adapter]
        training = {}
        for stage in self.args.stage_order:
            options = self.args.stage_options(stage)
            steps = self._completed_stages.get(stage, {}).get("train_steps")
            training[stage] = {
                "epochs": options["num_train_epochs"] if options["max_steps"] in (-1, None) else "-",
                "max_steps": options["max_steps"] if options["max_steps"] not in (-1, None) else "-",
                "learning_rate": options["learning_rate"],
                "steps trained": steps if steps is not None else "-",
            }
        update_model_card(
            self._output_dir,
            config,
            model_id=model_id,
            training=training,
            dataset_name=dataset_name,
            metrics=self._card_metrics(),
            tags=[tags] if isinstance(tags, str) else list(tags or []),
            search=self._search_record,
        )

    def _card_metrics(self) -> dict:
        metrics = {}
        for stage, values in self._completed_stages.items():
            for key, value in values.items():
                if isinstance(value, (int, float)) and ("loss" in key or key.startswith("eval_")):
                    metrics[f"{stage}_{key}"] = value
        return metrics


def _training_args_as_json(folder: str, args: HeftSFTConfig) -> None:
    """Replace Trainer's pickled `training_args.bin` with the same arguments as JSON."""
    pickled = os.path.join(folder, TRAINING_ARGS_NAME)
    if os.path.exists(pickled):
        os.remove(pickled)
    with open(os.path.join(folder, TRAINING_ARGS_JSON), "w", encoding="utf-8") as handle:
        handle.write(args.to_json_string())


def save_staged(output_dir: str, args, write: Callable[[str], None]) -> None:
    """Run ``write(folder)`` into a staging folder inside ``output_dir``, then move its files over the old ones.

    The existing card is copied in first (PEFT updates a card in place: what the user wrote in it stays), the
    training arguments are added as ``training_args.json`` and the card's loading code is pointed at ``output_dir``;
    `peft_heft.saving.replace_into` then commits the folder and renames each file into place. A killed save leaves
    the old adapter or the new one.
    """
    check_writable_folder(output_dir, "save_model's output_dir", "trainer.save_model('a-folder')")
    finish_interrupted_saves(output_dir, remove_incomplete=True)
    staging = new_staging_folder(output_dir)
    try:
        card = os.path.join(output_dir, "README.md")
        if os.path.isfile(card):
            shutil.copy2(card, os.path.join(staging, "README.md"))
        write(staging)
        _training_args_as_json(staging, args)
        _point_card_at(os.path.join(staging, "README.md"), staging, output_dir)
        replace_into(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _point_card_at(card: str, staging: str, output_dir: str) -> None:
    """The card was written in the staging folder: its loading code must name the output folder."""
    if not os.path.isfile(card):
        return
    with open(card, encoding="utf-8") as handle:
        text = handle.read()
    if staging in text:
        with open(card, "w", encoding="utf-8") as handle:
            handle.write(text.replace(staging, output_dir))


_PACKING_ERROR = (
    "StagedSFTTrainer does not support packing or padding-free batches: HEFT places interventions on each example's "
    "prompt tokens, and packing merges examples into one row and drops their prompt boundaries. Set packing=False, "
    "eval_packing=False and padding_free=False."
)


def _as_heft_args(args, model) -> HeftSFTConfig:
    if isinstance(args, HeftSFTConfig):
        return args
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
        return HeftSFTConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-HEFT")
    raise TypeError(
        f"StagedSFTTrainer needs args=HeftSFTConfig(...), got {type(args).__name__}. HeftSFTConfig takes every "
        "SFTConfig option plus the stage schedule (stage_order, lora_*/reft_* epochs, steps and learning rates)."
    )


def _check_supported(args: HeftSFTConfig, model, peft_config, optimizers) -> None:
    if args.packing or args.eval_packing or args.padding_free:
        raise ValueError(_PACKING_ERROR)
    if args.n_gpu > 1 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        raise ValueError(
            f"StagedSFTTrainer sees {args.n_gpu} GPUs in one process, so transformers' Trainer would wrap the model in "
            "torch.nn.DataParallel, which HEFT models cannot run under (its replicas share the original's forward "
            "hooks and interventions). Launch the script with `accelerate launch` or `torchrun --nproc_per_node "
            f"{args.n_gpu}` (DistributedDataParallel, one process per GPU), or make one GPU visible "
            "(CUDA_VISIBLE_DEVICES=0)."
        )
    engine = _sharding_engine(args)
    if engine is not None:
        name, source = engine
        raise ValueError(
            f"StagedSFTTrainer does not support {name} ({source}) yet: each stage changes which parameters require "
            "grad (LoRA, then the interventions) and rebuilds the optimizer, and from the second stage on "
            f"transformers' Trainer would do that on a model {name} has already wrapped ({_SHARDING_DETAIL[name]}). "
            "That is not tested, so it is refused. What works: DistributedDataParallel over several GPUs "
            "(`accelerate launch` or `torchrun --nproc_per_node <gpus>` without FSDP/DeepSpeed), and QLoRA "
            "(a 4-bit base) on one GPU."
        )
    if optimizers is not None and any(o is not None for o in optimizers):
        raise ValueError(
            "StagedSFTTrainer builds a fresh optimizer and schedule for each stage over that stage's parameters, so "
            "a pre-built `optimizers=(optimizer, scheduler)` cannot be used. Pass `optimizer_cls_and_kwargs=(cls, "
            "kwargs)` or set `optim` in HeftSFTConfig instead."
        )
    if peft_config is not None and not isinstance(peft_config, HeftConfig):
        raise TypeError(
            f"peft_config must be a HeftConfig for StagedSFTTrainer, got {type(peft_config).__name__}. HeftConfig "
            "takes every LoraConfig option plus the intervention settings."
        )
    if not isinstance(model, str) and is_peft_model(model):
        peft_type = str(getattr(model.peft_config[model.active_adapter], "peft_type", ""))
        if _find_heft_tuner(model) is None:
            raise ValueError(
                f"The model is already wrapped in a PEFT {peft_type.split('.')[-1]} adapter, not HEFT. Pass the base "
                "model with peft_config=HeftConfig(...), or merge_and_unload() the other adapter first."
            )
    elif peft_config is None:
        raise ValueError("StagedSFTTrainer needs peft_config=HeftConfig(...) (or a model already wrapped with HEFT).")


_SHARDING_DETAIL = {
    "FSDP": "it shards the parameters when the first stage prepares the model, and accelerate does not re-shard an "
    "already wrapped model for the next stage",
    "DeepSpeed": "it builds its engine and ZeRO optimizer over the parameters that require grad when the first stage "
    "prepares the model; the next stage would build a second engine around the same, already partitioned model",
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _sharding_engine(args: HeftSFTConfig) -> tuple[str, str] | None:
    """FSDP or DeepSpeed, as set in the training arguments or by `accelerate launch`'s config (its env variables)."""
    if args.deepspeed:
        return "DeepSpeed", "args.deepspeed is set"
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed", "ACCELERATE_USE_DEEPSPEED=true, from accelerate's config"
    if args.fsdp or getattr(args, "fsdp_plugin_args", None) is not None:
        return "FSDP", "args.fsdp is set"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP", "ACCELERATE_USE_FSDP=true, from accelerate's config"
    return None


# ------------------------------------------------------------------ early checks with clear messages
_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "processor_config.json",
    "preprocessor_config.json",
)


def _check_processing_class(model, processing_class) -> None:
    """Without a tokenizer, TRL loads one from the model's name or path: refuse when there is none to load from."""
    if processing_class is not None or isinstance(model, str):
        return
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not name:
        raise ValueError(
            f"processing_class is None, and the model ({type(base).__name__}) has no name or path to load its "
            "tokenizer from: it was built from a config, so config._name_or_path is empty. Pass the tokenizer: "
            "StagedSFTTrainer(model, ..., processing_class=tokenizer), e.g. "
            "tokenizer = AutoTokenizer.from_pretrained(<the model's tokenizer id or folder>)."
        )
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f)) for f in _TOKENIZER_FILES):
        raise ValueError(
            f"processing_class is None, and the model's folder {name} holds no tokenizer files "
            f"({', '.join(_TOKENIZER_FILES[:3])}, ...) to load one from. Pass processing_class=tokenizer, or save the "
            f"tokenizer into that folder first (tokenizer.save_pretrained({name!r}))."
        )


def _check_not_empty(train_dataset, eval_dataset) -> None:
    """An empty dataset fails deep inside TRL (a bare StopIteration): name it instead."""
    if isinstance(train_dataset, Dataset) and len(train_dataset) == 0:
        raise ValueError(
            "train_dataset is empty (0 rows): there is nothing to train on. Check the split you passed and any "
            "filter or select applied to it."
        )
    if isinstance(train_dataset, IterableDataset):
        try:
            next(iter(train_dataset))
        except StopIteration:
            raise ValueError(
                "train_dataset is an empty IterableDataset (it yields no example): there is nothing to train on."
            ) from None
    evals = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
    for key, dataset in evals.items():
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            name = "eval_dataset" if key is None else f"eval_dataset[{key!r}]"
            raise ValueError(
                f"{name} is empty (0 rows). Pass a non-empty split, or eval_dataset=None to skip evaluation."
            )


def _check_output_dir(args: HeftSFTConfig) -> None:
    """Checkpoints and the adapter go to output_dir: find out now, not at the first save, that it cannot hold them."""
    if not args.should_save:
        return  # only the saving process writes there
    check_writable_folder(str(args.output_dir), "output_dir", "HeftSFTConfig(output_dir=...)")


def check_writable_folder(given: str, name: str, how: str) -> None:
    """Refuse, with what to do, a folder path that is a file, lies under a file, or cannot be written; create it."""
    path = os.path.abspath(given)
    a_name = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            f"{name}={given!r} is an existing file, not a folder; checkpoints and the adapter are saved as a folder "
            f"(adapter_config.json, adapter_model.safetensors, ...). Pass the path of a folder ({how}), or move the "
            "file away."
        )
    existing = path
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(
            f"{name}={given!r} cannot be created: {existing} is a file, not a folder. Pass {a_name} whose parents "
            "are folders."
        )
    try:
        os.makedirs(path, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".heft-write-check-", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        message = (
            f"{name}={given!r} is not writable ({error.strerror or error}); checkpoints and the adapter are saved "
            f"there. Pass {a_name} you can write to, or fix its permissions."
        )
        raise (PermissionError(message) if isinstance(error, PermissionError) else OSError(message)) from error


_SFT_FORMATS = (
    "'text' (language modeling: the column named by dataset_text_field, now {text_field!r}); "
    "'messages' (conversational language modeling: a list of role/content turns); "
    "'prompt' + 'completion' (prompt-completion, as strings or as role/content lists); "
    "'conversations' (ShareGPT from/value turns, converted to messages); "
    "or tokenized 'input_ids'"
)


def _check_dataset_format(dataset, args: HeftSFTConfig, formatting_func, dataset_name: str) -> bool:
    """Refuse, before TRL's KeyError deep in `datasets.map`, a dataset in no SFT format or with None prompts/completions.

    Returns whether the dataset is already tokenized (has `input_ids`).
    """
    try:
        columns = list(get_dataset_column_names(dataset))
    except StopIteration:
        raise ValueError(f"The {dataset_name} dataset is empty: it yields no example.") from None
    if "input_ids" in columns:
        return True
    present = set(columns)
    text_field = args.dataset_text_field
    formats = _SFT_FORMATS.format(text_field=text_field)
    if "prompt" in present and "completion" not in present:
        preference = "chosen" in present and "rejected" in present
        hint = (
            "It looks like preference data (prompt/chosen/rejected), which SFT cannot train on. To fine-tune on the "
            "preferred answers, rename 'chosen' to 'completion' and drop 'rejected': "
            "dataset.rename_column('chosen', 'completion').remove_columns('rejected')."
            if preference
            else "Add a 'completion' column, or rename 'prompt' if it holds the whole text."
        )
        raise ValueError(
            f"The {dataset_name} dataset has a 'prompt' column but no 'completion' column (columns: {columns}); "
            f"TRL's SFT preparation reads 'prompt' only together with 'completion'. {hint} SFT formats: {formats}."
        )
    readable = bool({"prompt", "messages", "conversations", text_field} & present)
    if not readable and formatting_func is None:
        preference_hint = (
            " 'chosen'/'rejected' are preference data, which SFT cannot train on; to fine-tune on the preferred "
            "answers, use 'chosen' as 'messages' (or 'text') and drop 'rejected'."
            if {"chosen", "rejected"} <= present
            else ""
        )
        raise ValueError(
            f"The {dataset_name} dataset has columns {columns}, none of which TRL's SFT preparation reads. "
            f"StagedSFTTrainer takes the formats SFTTrainer takes: {formats}.{preference_hint} Rename your columns "
            "(dataset.rename_column(old, new)), set dataset_text_field, or pass formatting_func= returning each "
            "example's text."
        )
    # the columns TRL tokenizes, in its order: prompt-completion, then messages, then text
    if "prompt" in present:
        used = ["prompt", "completion"]
    elif "messages" in present:
        used = ["messages"]
    elif "conversations" in present:
        used = ["conversations"]
    else:
        used = [text_field] if formatting_func is None else []
    if isinstance(dataset, Dataset):
        _check_no_none(dataset, used, dataset_name)
    return False


def _check_no_none(dataset: Dataset, columns: list[str], dataset_name: str) -> None:
    """Name the first row whose prompt/completion/text/messages is None (TRL fails on it with an AttributeError)."""
    for column in columns:
        if not dataset.data.column(column).null_count:  # no None in the whole table: nothing to search
            continue
        nulls = dataset.with_format("arrow")[column].is_null().to_pylist()  # the rows of this view (select/filter)
        rows = [i for i, null in enumerate(nulls) if null]
        if not rows:
            continue
        more = f" ({len(rows)} rows in all: {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''})"
        raise ValueError(
            f"Row {rows[0]} of the {dataset_name} dataset has {column}=None{more if len(rows) > 1 else ''}. Every "
            f"row needs a {column!r} value (a string, or a list of turns): drop or fill those rows first, e.g. "
            f"dataset = dataset.filter(lambda row: row[{column!r}] is not None)."
        )


def _report_dropped_rows(before: int, after: int, args: HeftSFTConfig, dataset_name: str) -> None:
    """TRL drops rows that truncation leaves without a token to learn: all of them is an error, some a warning."""
    if after == 0:
        raise ValueError(
            f"Every example of the {dataset_name} dataset ({before}) was dropped while preparing it: truncation to "
            f"max_length={args.max_length} (truncation_mode={args.truncation_mode!r}) leaves none of them a "
            "completion token to learn, so each prompt is at least max_length tokens long. Raise max_length above "
            "the prompts' token length, or shorten the prompts."
        )
    logger.warning(
        f"{before - after} of {before} examples of the {dataset_name} dataset were dropped: truncation to "
        f"max_length={args.max_length} left them no completion token to learn (their prompt fills max_length). "
        "Raise max_length to keep them."
    )


# Adapter settings that change what the saved weights are or how they are applied (and dropouts, which change how a
# resumed run trains): a checkpoint resumed under another value would load wrongly, fail to load, or train differently.
_ADAPTER_FIELDS = (
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
    *INTERVENTION_SETTINGS,
    "base_model_hidden_size",
    "base_model_num_layers",
)


def _comparable(field: str, value, num_layers) -> Any:
    value = getattr(value, "value", value)  # enums (task_type) compare by their string
    if isinstance(value, (set, frozenset, tuple, list)):
        value = [_comparable(field, v, None) for v in value]
        if field != "intervention_layers":
            return sorted(value, key=repr)
    if field == "intervention_layers" and isinstance(num_layers, int) and num_layers > 0:
        if value == "all":
            return list(range(num_layers))
        if isinstance(value, int):
            value = [value]
        if isinstance(value, list):
            return [i % num_layers if isinstance(i, int) else i for i in value]
    return value


def _shown(field: str, value) -> Any:
    """A setting as the error message shows it: module lists (saved from sets, in any order) sorted."""
    value = getattr(value, "value", value)
    if isinstance(value, (set, frozenset)) or (isinstance(value, list) and field != "intervention_layers"):
        return sorted(value, key=str)
    return value


def _check_same_adapter(checkpoint: str, config, adapter_name: str) -> None:
    """Resuming under another adapter configuration silently mixes two setups (or fails in load_state_dict)."""
    path = os.path.join(checkpoint, "adapter_config.json")
    if not os.path.isfile(path):
        path = os.path.join(checkpoint, adapter_name, "adapter_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    num_layers = getattr(config, "base_model_num_layers", None) or saved.get("base_model_num_layers")
    differences = []
    for field in _ADAPTER_FIELDS:
        if field not in saved or not hasattr(config, field):
            continue  # an older config without the field
        if field.startswith("base_model_") and None in (saved[field], getattr(config, field)):
            continue  # filled in when the adapter is created: not yet known on a config alone
        theirs = _comparable(field, saved[field], num_layers)
        ours = _comparable(field, getattr(config, field), num_layers)
        if theirs != ours:
            shown = [_shown(field, value) for value in (saved[field], getattr(config, field))]
            differences.append(f"{field}: checkpoint {shown[0]!r}, this run {shown[1]!r}")
    if differences:
        raise ValueError(
            f"Checkpoint {checkpoint} was trained with another adapter configuration than this run's peft_config: "
            + "; ".join(differences)
            + ". Resume with the checkpoint's settings (its adapter_config.json), or train from scratch in a new "
            "output_dir."
        )


def _resumed_loss_total(marker: dict, state: TrainerState) -> float:
    """Total training loss of a stage's steps up to its checkpoint (what Trainer's train_loss is a mean of)."""
    recorded = marker.get("stage_train_loss")
    if isinstance(recorded, dict) and int(recorded.get("steps", -1)) == state.global_step:
        return float(recorded["total"])
    # markers from before the total was recorded: rebuild it from the logged losses, each the mean of the steps since
    # the log before it (exact when the checkpoint step was logged, short of the steps after the last log otherwise)
    total, previous = 0.0, 0
    for entry in state.log_history:
        if "loss" in entry and "step" in entry:
            total += float(entry["loss"]) * (int(entry["step"]) - previous)
            previous = int(entry["step"])
    return total
