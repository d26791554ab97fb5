"""What `StagedSFTTrainer` reports about its stages: their metrics, the combined output, the model card."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from transformers.trainer_utils import TrainOutput

from ..modelcard import replace_quick_start, update_model_card
from .mixin_base import SFTTrainerBase

if TYPE_CHECKING:
    from .config import HeftSFTConfig


class StageReportMixin(SFTTrainerBase):
    """Each finished stage's metrics and log history, and what is made of them (mixed in before `SFTTrainer`)."""

    if TYPE_CHECKING:  # attributes StagedSFTTrainer sets
        args: HeftSFTConfig  # type: ignore[assignment]  # HEFT's trainer holds a HeftSFTConfig
        model: Any
        _stage_name: str | None

        @property
        def _output_dir(self) -> str: ...

    _completed_stages: dict[str, dict[str, float]]
    stage_log_history: list[dict[str, Any]]
    search_record: dict[str, Any] | None

    @property
    def completed_stages(self) -> dict[str, dict[str, float]]:
        """Each finished stage's metrics (`train_loss`, `train_steps`, `eval_*`, ...), by stage name (a copy)."""
        return {stage: dict(metrics) for stage, metrics in self._completed_stages.items()}

    def record_stages(self, completed_stages: Mapping[str, Mapping[str, float]], log_history: list[dict]) -> None:
        """Set what the trainer reports as already trained: each stage's metrics and the log history so far (what a
        checkpoint or a saved coarse stage restores; the model card and `combined_output` read them)."""
        self._completed_stages = {stage: dict(metrics) for stage, metrics in completed_stages.items()}
        self.stage_log_history = list(log_history)

    def combined_output(self, stages: list[str] | None = None, runtime: float = 0.0) -> TrainOutput:
        """One `TrainOutput` over the completed `stages` (all of `args.stage_order` by default): each stage's metrics
        prefixed with its name, `train_steps` summed, `train_loss` their step-weighted mean, `total_wall_time`."""
        stages = list(self.args.stage_order) if stages is None else list(stages)
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
        self.write_heft_card(
            self._output_dir,
            model_id=model_id,
            dataset_name=dataset_name,
            tags=[tags] if isinstance(tags, str) else list(tags or []),
        )

    def write_heft_card(
        self,
        folder: str,
        *,
        model_id: str | None = None,
        dataset_name: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        """Add the HEFT section to ``folder/README.md``: both stages' settings, their schedule, the metrics, the
        loading code naming ``model_id`` (``save_model`` calls it on every save; PEFT's own card has no HEFT section).
        """
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
            folder,
            config,
            model_id=model_id,
            training=training,
            dataset_name=dataset_name,
            metrics=self._card_metrics(),
            tags=tags or [],
            search=self.search_record,
        )

    def _card_metrics(self) -> dict:
        metrics = {}
        for stage, values in self._completed_stages.items():
            for key, value in values.items():
                if isinstance(value, (int, float)) and ("loss" in key or key.startswith("eval_")):
                    metrics[f"{stage}_{key}"] = value
        return metrics
