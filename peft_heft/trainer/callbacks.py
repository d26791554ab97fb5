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
    """transformers' progress bar, titled with the running stage (``HEFT 1/2 lora``).

    `StagedSFTTrainer` puts it in place of transformers' `ProgressCallback`.

    Example:
    ```python
    >>> from peft_heft import StageProgressCallback
    >>> trainer = StagedSFTTrainer(..., callbacks=[StageProgressCallback()])  # what the trainer does by default
    ```
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stage_label: str | None = None

    def on_stage_begin(self, args, state, control, stage=None, stage_index=0, num_stages=1, **kwargs):
        self.stage_label = f"HEFT {stage_index + 1}/{num_stages} {stage}"

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if state.is_world_process_zero and self.stage_label and self.training_bar is not None:
            self.training_bar.set_description(self.stage_label)


class GenerationAccuracyCallback(HeftCallback):
    """Adds generation accuracy (greedy answers matched against the references) to every evaluation's metrics.

    On each `evaluate()` (per `eval_strategy`, at each stage's end, and in every trial of
    [`~peft_heft.trainer.run_fine_stage_search`]) it generates an answer for every prompt of `dataset` with
    [`~peft_heft.evaluate_generation_accuracy`] and puts the accuracy into the evaluation's metrics as
    `metric_name`, so `metric_for_best_model="eval_accuracy"`, `run_fine_stage_search(trainer, n, metric="eval_accuracy")` and the
    log history all see it. Pass it at construction (`callbacks=[...]`): it must run before the callbacks that read
    the metric. Every process evaluates the whole dataset.

    Args:
        dataset (`datasets.Dataset` or `list[dict]`): rows with `prompt`/`completion` (plain or conversational) or
            `messages` ending in the answer: the raw evaluation rows, not the tokenized ones.
        processing_class (`PreTrainedTokenizerBase`): the tokenizer.
        choices (`list[str]`, *optional*): the possible answers, e.g. `["yes", "no"]`.
        trigger (`str`, *optional*): read the answer only after this string.
        max_new_tokens (`int`, defaults to 8): generation budget per prompt.
        batch_size (`int`, defaults to 16): prompts per `generate` call.
        metric_name (`str`, defaults to `"eval_accuracy"`): the metric's key.

    Example:
    ```python
    >>> accuracy = GenerationAccuracyCallback(eval_rows, tokenizer, choices=["yes", "no"])
    >>> trainer = StagedSFTTrainer(..., eval_dataset=eval_rows, callbacks=[accuracy])
    >>> study = run_fine_stage_search(trainer, 8, metric="eval_accuracy")
    ```
    """

    def __init__(
        self,
        dataset,
        processing_class,
        *,
        choices=None,
        trigger: str | None = None,
        max_new_tokens: int = 8,
        batch_size: int = 16,
        metric_name: str = "eval_accuracy",
    ) -> None:
        from ..evaluation import check_accuracy_rows

        if not metric_name.startswith("eval_"):
            raise ValueError(
                f"metric_name must start with 'eval_' like the other evaluation metrics, got {metric_name!r}."
            )
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}.")
        check_accuracy_rows(dataset, processing_class, choices)  # a bad row fails now, not at the first evaluation
        self.dataset, self.processing_class = dataset, processing_class
        self.choices, self.trigger = choices, trigger
        self.max_new_tokens, self.batch_size, self.metric_name = max_new_tokens, batch_size, metric_name
        self.last: dict | None = None

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        from ..evaluation import evaluate_generation_accuracy

        if metrics is None or model is None:
            return control
        was_training = model.training
        model.eval()
        try:
            self.last = evaluate_generation_accuracy(
                model,
                self.processing_class,
                self.dataset,
                choices=self.choices,
                trigger=self.trigger,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
            )
        finally:
            model.train(was_training)
        metrics[self.metric_name] = self.last["accuracy"]
        # evaluate() logged its metrics before this event: add the accuracy to that entry of the log history
        for entry in reversed(state.log_history):
            if entry.get("step") == state.global_step and any(k.startswith("eval_") for k in entry):
                entry[self.metric_name] = self.last["accuracy"]
                break
        return control
