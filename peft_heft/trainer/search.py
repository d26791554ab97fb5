"""Search the fine (ReFT) stage of HEFT with Optuna, from one coarse (LoRA) stage trained once.

ReFT's hyperparameter space (which layers, which positions, what rank, which intervention type, what learning rate)
is large. In HEFT every fine-stage candidate starts from the same LoRA-adapted model, so a search over the fine stage
costs trials of the cheap stage only: :func:`run_fine_stage_search` trains the coarse stage once, then
for each trial restores the coarse weights in place (checked bitwise), rebuilds the interventions with the trial's
settings (:meth:`HeftModel.replace_interventions`) and trains the fine stage, reporting each evaluation to Optuna's
pruner. It drives the trainer through its public per-stage API (``train_stage``, ``completed_stages``,
``record_stages``); the search space is in :mod:`.search_space`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from transformers.utils import logging

from ..persistence import write_file_atomic, write_json_atomic
from ..settings import LORA_SETTINGS
from ..tuner.config import HeftConfig
from .callbacks import GenerationAccuracyCallback, HeftCallback
from .collator import DataCollatorForHeft
from .config import derived_arguments
from .search_space import FineStageSearchSpace, layers_from_choice

__all__ = ["FineStageSearchSpace", "layers_from_choice", "run_fine_stage_search"]

SEARCH_DIR = "search"
COARSE_DIR = "coarse"
COARSE_WEIGHTS = "coarse_weights.safetensors"
COARSE_MARKER = "coarse.json"
BEST_WEIGHTS = "best_interventions.safetensors"
BEST_JSON = "best.json"
STUDY_JSON = "study.json"
logger = logging.get_logger(__name__)
STUDY_PLOT = "study.png"
DEFAULT_STUDY_NAME = "heft-fine-stage"
OPTUNA_MISSING = (
    "run_fine_stage_search() needs Optuna: `pip install optuna` (or `pip install peft-heft[search]`), version 5.0.0 or "
    "newer."
)


def import_optuna():
    """The ``optuna`` module, or an ``ImportError`` that says how to install it."""
    try:
        import optuna
    except ImportError as error:
        raise ImportError(OPTUNA_MISSING) from error
    return optuna


class TrialReporter(HeftCallback):
    """Reports each evaluation's metric to an Optuna trial and stops training when the pruner says so."""

    def __init__(self, trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned = False
        self.last_value: float | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        if self.metric not in metrics:
            available = sorted(k for k in metrics if k.startswith("eval_"))
            raise ValueError(
                f"The search metric {self.metric!r} is not computed by evaluate(); it computes {available}. Pass "
                "metric= one of them, or compute_metrics= that returns it."
            )
        self.last_value = float(metrics[self.metric])
        self.trial.report(self.last_value, step=state.global_step)
        if self.trial.should_prune():
            self.pruned = True
            control.should_training_stop = True
        return control


def adapter_weights(model, adapter: str, interventions: bool) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters by name: its interventions, or everything else of it (LoRA, modules_to_save)."""
    marker = f"heft_interventions.{adapter}."
    out = {}
    for name, param in model.named_parameters():
        if interventions == (marker in name) and (marker in name or f".{adapter}." in name):
            out[name] = param
    return out


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: param.detach().to("cpu", copy=True).contiguous() for name, param in params.items()}


@torch.no_grad()
def restore(params: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` into ``params`` in place, then check they are bitwise equal."""
    if set(params) != set(saved):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise ValueError(
            f"The saved coarse-stage weights do not match this adapter: missing {missing[:3]}, unexpected "
            f"{extra[:3]}. They were saved for another LoRA configuration; use another output_dir."
        )
    for name, param in params.items():
        if tuple(param.shape) != tuple(saved[name].shape):
            raise ValueError(
                f"The saved coarse-stage weight {name} has shape {tuple(saved[name].shape)}, the adapter's "
                f"{tuple(param.shape)}: saved for another LoRA configuration; use another output_dir."
            )
        param.copy_(saved[name])
    changed = [name for name, param in params.items() if not torch.equal(param.detach().cpu(), saved[name])]
    if changed:
        raise RuntimeError(f"Restoring the coarse-stage weights did not give them back bitwise: {changed[:3]}.")


def study_record(study, metric: str) -> dict[str, Any]:
    """The study as JSON: every trial's number, parameters, value, state and duration."""
    trials = []
    for trial in study.get_trials(deepcopy=False):
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        trials.append(
            {
                "number": trial.number,
                "params": dict(trial.params),
                "value": trial.value,
                "state": trial.state.name.lower(),
                "duration_s": duration,
                "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
                "settings": trial.user_attrs.get("settings"),
            }
        )
    complete = [t for t in trials if t["state"] == "complete"]
    best = study.best_trial if complete else None
    return {
        "study_name": study.study_name,
        "metric": metric,
        "direction": study.direction.name.lower(),
        "best_trial": best.number if best is not None else None,
        "best_value": best.value if best is not None else None,
        "best_params": dict(best.params) if best is not None else None,
        "trials": trials,
    }


def write_study(study, metric: str, folder: str) -> dict[str, Any]:
    """Write ``study.json`` and ``study.png`` (metric per trial, and parameter importances when computable)."""
    os.makedirs(folder, exist_ok=True)
    record = study_record(study, metric)
    write_json_atomic(os.path.join(folder, STUDY_JSON), record, indent=2)
    _plot(study, record, metric, os.path.join(folder, STUDY_PLOT))
    return record


def _plot(study, record: dict[str, Any], metric: str, path: str) -> None:
    # a Figure with its own Agg canvas: pyplot and matplotlib.use() would change the process's global backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    importances: dict[str, float] = {}
    try:
        import optuna

        if sum(t["state"] == "complete" for t in record["trials"]) >= 2:
            importances = optuna.importance.get_param_importances(study)
    except Exception:  # too few trials, a constant metric, a parameter with one value ...: no importance panel
        importances = {}
    panels = 2 if importances else 1
    figure = Figure(figsize=(6 * panels, 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)
    ax = axes[0][0]
    for state, marker in (("complete", "o"), ("pruned", "x")):
        points = [
            (t["number"], t["value"] if t["value"] is not None else _last(t["intermediate_values"]))
            for t in record["trials"]
            if t["state"] == state
        ]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.scatter([x for x, _ in points], [y for _, y in points], marker=marker, label=state)
    if record["best_trial"] is not None:
        ax.axhline(record["best_value"], linestyle="--", linewidth=1, label=f"best (trial {record['best_trial']})")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("fine-stage search")
    ax.legend()
    if importances:
        ax = axes[0][1]
        names = list(importances)
        ax.barh(names, [importances[name] for name in names])
        ax.invert_yaxis()
        ax.set_xlabel("importance")
        ax.set_title("parameter importances")
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def _last(values: dict[str, float]) -> float | None:
    return list(values.values())[-1] if values else None


def _sync_collator(trainer, config: HeftConfig) -> None:
    """The collator places the interventions: give it the adapter's (new) position spec."""
    collator = trainer.data_collator
    if isinstance(collator, DataCollatorForHeft):
        collator.position_spec = config.position_spec
        collator.share_weights = config.share_intervention_weights


def _coarse_fingerprint(trainer, config: HeftConfig) -> Any:
    """What the coarse stage's weights depend on: the LoRA settings, the LoRA stage's schedule, the seed, the data
    size. A saved coarse stage is reused only under the same fingerprint."""
    args = trainer.args
    adapter = {name: getattr(config, name, None) for name in LORA_SETTINGS}
    for name, value in adapter.items():
        if isinstance(value, (set, frozenset)):
            adapter[name] = sorted(value)
    dataset = trainer.train_dataset
    data = {"train_rows": len(dataset) if hasattr(dataset, "__len__") else None}
    fingerprint = {
        "adapter": adapter,
        "lora_stage": args.stage_options("lora"),
        "stage_order": list(args.stage_order),
        "seed": args.seed,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "data": data,
        "base_model": getattr(config, "base_model_name_or_path", None),
    }
    return json.loads(json.dumps(fingerprint, default=str))  # as it reads back from coarse.json


def _better(value: float, best: float | None, direction: str) -> bool:
    if best is None:
        return True
    return value < best if direction == "minimize" else value > best


def _load_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: str, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, indent=2, default=str)


def _save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save

    write_file_atomic(path, save(tensors))


def _check_search_setup(trainer, n_trials: int, metric: str, direction: str | None) -> tuple[str, str]:
    """Everything that can be refused before any training: ``(metric, direction)``."""
    args = trainer.args
    if args.world_size > 1:
        raise ValueError(
            f"run_fine_stage_search() runs every trial in one process, but this run has {args.world_size} processes "
            "(accelerate launch / torchrun): run the search in one process (python script.py), then train the "
            "chosen settings with several processes if you want."
        )
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int, got {n_trials!r}.")
    if trainer.eval_dataset is None:
        raise ValueError(
            "run_fine_stage_search() compares trials on a held-out metric, but the trainer has no eval_dataset; pass "
            "eval_dataset= (a split that is not trained on) to StagedSFTTrainer."
        )
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be the name of an evaluation metric such as 'eval_loss', got {metric!r}.")
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    accuracy_metrics = {
        c.metric_name for c in trainer.callback_handler.callbacks if isinstance(c, GenerationAccuracyCallback)
    }
    if trainer.compute_metrics is None and not metric.endswith("loss") and metric not in accuracy_metrics:
        hint = (
            " For generation accuracy, pass callbacks=[GenerationAccuracyCallback(eval_rows, tokenizer, choices=...)]."
            if metric.endswith("accuracy")
            else ""
        )
        raise ValueError(
            f"The search metric {metric!r} is not computed: the trainer has no compute_metrics, so evaluate() "
            f"reports only eval_loss{' and ' + ', '.join(sorted(accuracy_metrics)) if accuracy_metrics else ''}. Use "
            f"metric='eval_loss', or pass compute_metrics= returning it.{hint}"
        )
    if direction is None:
        direction = "minimize" if metric.endswith("loss") else "maximize"
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize', 'maximize' or None, got {direction!r}.")
    stages = list(args.stage_order)
    if "lora" not in stages or "reft" not in stages or stages.index("reft") < stages.index("lora"):
        raise ValueError(
            f"run_fine_stage_search() trains the LoRA (coarse) stage once and searches the ReFT (fine) stage after it; "
            f"stage_order={stages} has no 'lora' stage followed by a 'reft' stage."
        )
    if args.merge_lora_before_reft:
        raise ValueError(
            "run_fine_stage_search() restores the coarse LoRA weights before each trial; merge_lora_before_reft=True "
            "folds them into the base weights. Set merge_lora_before_reft=False for the search."
        )
    return metric, direction


def run_fine_stage_search(
    trainer,
    n_trials: int,
    search_space: FineStageSearchSpace | None = None,
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

    The LoRA stage of `args.stage_order` is trained once (skipped when `trainer` already trained it, or loaded from
    `<output_dir>/search/coarse` when an earlier run of the search saved it there). Each of the `n_trials` trials then
    restores the coarse weights in place (checked bitwise; the model is not reloaded), rebuilds the interventions with
    the trial's settings ([`HeftModel.replace_interventions`]), and trains the ReFT stage with the trial's learning rate
    and epochs (`trainer.train_stage("reft", args_overrides=...)`, which saves no checkpoint). Every evaluation (per
    `eval_strategy`, and at the stage's end) reports `metric` to the trial; a trial the pruner stops ends pruned. At the
    end the best trial's settings and intervention weights are put on the model, so `trainer.save_model()` saves it as
    a normal HEFT adapter; `trainer.args` becomes a copy of the arguments with the best trial's ReFT learning rate and
    epochs (for the model card; the arguments you passed are not changed). The study is written to
    `<output_dir>/search/study.json` (every trial's number, parameters, value, state, duration) and `study.png`.
    Stages after the ReFT stage in `stage_order` are not run by the search.

    Args:
        trainer (`StagedSFTTrainer`): the trainer, with an `eval_dataset`.
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
    >>> from peft_heft.trainer.search import FineStageSearchSpace, run_fine_stage_search
    >>> study = run_fine_stage_search(trainer, 20, FineStageSearchSpace(ranks=[1, 4]), storage="sqlite:///s.db")
    >>> trainer.save_model()  # the best trial's adapter
    ```
    """
    from safetensors.torch import load_file
    from transformers.trainer_utils import SaveStrategy

    optuna = import_optuna()
    metric, direction = _check_search_setup(trainer, n_trials, metric, direction)
    args = trainer.args
    heft = trainer.heft_model
    adapter = trainer.model.active_adapter
    base_config = heft.peft_config[adapter]
    num_layers, hidden_size = base_config.base_model_num_layers, base_config.base_model_hidden_size
    space = search_space if search_space is not None else FineStageSearchSpace.default(hidden_size)
    if not isinstance(space, FineStageSearchSpace):
        raise TypeError(f"search_space must be a FineStageSearchSpace or None, got {type(space).__name__}.")
    space.validate(base_config, num_layers, hidden_size)

    folder = os.path.join(output_dir if output_dir is not None else str(args.output_dir), SEARCH_DIR)
    coarse_folder = os.path.join(folder, COARSE_DIR)
    os.makedirs(coarse_folder, exist_ok=True)
    if storage is not None and study_name is None:
        study_name = DEFAULT_STUDY_NAME  # a stored study is found again by its name
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction=direction,
        sampler=sampler if sampler is not None else optuna.samplers.TPESampler(seed=args.seed),
        pruner=pruner,
        load_if_exists=True,
    )
    if sampler is None:
        # seeded for reproducible searches, offset by the trials already run so that a resumed study does not
        # replay the first run's random start-up suggestions
        study.sampler = optuna.samplers.TPESampler(seed=args.seed + len(study.trials))

    # ---- the coarse stage: trained once (in this trainer, or by an earlier run of the search), then frozen
    coarse_params = adapter_weights(trainer.model, adapter, interventions=False)
    marker_path = os.path.join(coarse_folder, COARSE_MARKER)
    marker = _load_json(marker_path)
    fingerprint = _coarse_fingerprint(trainer, base_config)
    recorded = study.user_attrs.get("coarse_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise ValueError(
            f"The study {study.study_name!r} in {storage} was run on a coarse stage trained with other LoRA settings, "
            "schedule, seed or data than this run's, so its trials cannot be compared with new ones. Resume it with "
            "its settings, or pass another study_name (or storage) for a new study."
        )
    study.set_user_attr("coarse_fingerprint", fingerprint)
    coarse_trained = "lora" in trainer.completed_stages
    if marker is not None and marker.get("fingerprint") != fingerprint and not coarse_trained:
        logger.warning(
            f"{coarse_folder} holds a coarse stage trained with other LoRA settings, schedule, seed or data than "
            "this run's: it is trained again and replaced."
        )
        marker = None
    if not coarse_trained and marker is not None:
        restore(coarse_params, load_file(os.path.join(coarse_folder, COARSE_WEIGHTS)))
        trainer.record_stages({"lora": marker["metrics"]}, marker["log_history"])
    else:
        if not coarse_trained:
            trainer.record_stages({}, [])
            trainer.train_stage("lora")
        marker = {
            "fingerprint": fingerprint,
            "metrics": trainer.completed_stages["lora"],
            "log_history": trainer.stage_log_history,
        }
        _save_tensors(snapshot(coarse_params), os.path.join(coarse_folder, COARSE_WEIGHTS))
        _write_json(marker_path, marker)
    coarse_metrics = trainer.completed_stages["lora"]
    coarse_log = list(trainer.stage_log_history)
    if metric not in coarse_metrics:
        available = sorted(k for k in coarse_metrics if k.startswith("eval_"))
        raise ValueError(
            f"The search metric {metric!r} is not computed by evaluate(); it computes {available}. Pass metric= one "
            "of them, or compute_metrics= that returns it."
        )
    coarse = snapshot(coarse_params)

    # ---- the best trial so far: in memory, and on disk for a resumed study
    best_folder = os.path.join(folder, "best", re.sub(r"[^A-Za-z0-9._-]", "_", study.study_name))
    os.makedirs(best_folder, exist_ok=True)
    best = _load_json(os.path.join(best_folder, BEST_JSON))
    if best is not None and best.get("study_name") != study.study_name:
        best = None
    if best is not None:
        best["weights"] = load_file(os.path.join(best_folder, BEST_WEIGHTS))

    def objective(trial) -> float:
        nonlocal best
        restore(coarse_params, coarse)  # in place, and checked bitwise against the snapshot
        settings, schedule = space.suggest(trial, num_layers)
        trial.set_user_attr("settings", settings)
        trial.set_user_attr("schedule", schedule)
        torch.manual_seed(args.seed + trial.number)  # the interventions' initialization
        heft.replace_interventions(adapter, **settings)
        _sync_collator(trainer, heft.peft_config[adapter])
        # trials overwrite no checkpoints, and keep the model they trained
        overrides = {"save_strategy": SaveStrategy.NO, "load_best_model_at_end": False, **_schedule_options(schedule)}
        trainer.record_stages({"lora": coarse_metrics}, coarse_log)
        reporter = TrialReporter(trial, metric)
        trainer.add_callback(reporter)
        try:
            trainer.train_stage("reft", args_overrides=overrides)
        finally:
            trainer.remove_callback(reporter)
        if reporter.pruned:
            raise optuna.TrialPruned(f"pruned at {metric}={reporter.last_value}")
        metrics = trainer.completed_stages["reft"]
        value = float(metrics[metric]) if metric in metrics else reporter.last_value
        if value is None:
            raise ValueError(f"The fine stage of trial {trial.number} reported no {metric!r}.")
        if _better(value, best["value"] if best is not None else None, direction):
            weights = snapshot(adapter_weights(trainer.model, adapter, interventions=True))
            best = {
                "study_name": study.study_name,
                "number": trial.number,
                "value": value,
                "settings": settings,
                "schedule": schedule,
                "metrics": metrics,
                "log_history": trainer.stage_log_history[len(coarse_log) :],
            }
            _save_tensors(weights, os.path.join(best_folder, BEST_WEIGHTS))
            _write_json(os.path.join(best_folder, BEST_JSON), best)
            best["weights"] = weights
        return value

    try:
        study.optimize(objective, n_trials=n_trials)
    finally:
        restore(coarse_params, coarse)

    # ---- the best trial's settings and weights on the model, so that save_model() saves it as a HEFT adapter
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if complete and best is not None and best["number"] == study.best_trial.number:
        heft.replace_interventions(adapter, **best["settings"])
        _sync_collator(trainer, heft.peft_config[adapter])
        params = adapter_weights(trainer.model, adapter, interventions=True)
        restore(params, best["weights"])
        # the model card reports the best trial's schedule: a copy of the arguments carries it
        trainer.args = derived_arguments(trainer.args, **_schedule_options(best["schedule"]))
        trainer.record_stages(
            {"lora": coarse_metrics, "reft": best["metrics"]}, coarse_log + list(best["log_history"])
        )
        trainer.state.log_history = list(trainer.stage_log_history)
        heft.set_stage("reft")
    elif complete:
        logger.warning(
            f"The best trial ({study.best_trial.number}) of study {study.study_name!r} has no saved weights in "
            f"{best_folder}; the model keeps the coarse stage and the last interventions, not the best trial's."
        )
    trainer.search_record = write_study(study, metric, folder)
    return study


def _schedule_options(schedule: dict[str, Any]) -> dict[str, Any]:
    """The ReFT stage's options of a trial's schedule (its epochs replace `reft_max_steps`)."""
    options: dict[str, Any] = {}
    if "learning_rate" in schedule:
        options["reft_learning_rate"] = schedule["learning_rate"]
    if "epochs" in schedule:
        options["reft_num_train_epochs"], options["reft_max_steps"] = float(schedule["epochs"]), None
    return options
