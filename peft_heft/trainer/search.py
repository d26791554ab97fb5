"""Search the fine (ReFT) stage of HEFT with Optuna, from one coarse (LoRA) stage trained once.

ReFT's hyperparameter space (which layers, which positions, what rank, which intervention type, what learning rate)
is large. In HEFT every fine-stage candidate starts from the same LoRA-adapted model, so a search over the fine stage
costs trials of the cheap stage only: :meth:`StagedSFTTrainer.search_fine_stage` trains the coarse stage once, then
for each trial restores the coarse weights in place (checked bitwise), rebuilds the interventions with the trial's
settings (:meth:`HeftModel.replace_interventions`) and trains the fine stage, reporting each evaluation to Optuna's
pruner. This module holds the search space and the pieces of the search that do not need the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils import logging

from ..config import MAX_INTERVENTION_POSITIONS, HeftConfig
from ..interventions import INTERVENTION_TYPES
from ..layers import resolve_layers
from ..model import INTERVENTION_SETTINGS
from .callbacks import HeftCallback

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
    "search_fine_stage() needs Optuna: `pip install optuna` (or `pip install peft-heft[search]`), version 5.0.0 or "
    "newer."
)


def import_optuna():
    """The ``optuna`` module, or an ``ImportError`` that says how to install it."""
    try:
        import optuna
    except ImportError as error:
        raise ImportError(OPTUNA_MISSING) from error
    return optuna


def _layers_choice(choice: Any) -> str:
    """A layer choice as the string Optuna records: ``"all"``, ``"every<k>"``, ``"top_half"`` or ``"i,j,..."``."""
    if isinstance(choice, str):
        return choice.replace(" ", "")
    if isinstance(choice, bool) or not isinstance(choice, (int, list, tuple)):
        raise TypeError(
            f"A layer choice of the search space must be 'all', 'every<k>', 'top_half', an int or a list of ints, got "
            f"{choice!r} of type {type(choice).__name__}."
        )
    values = [choice] if isinstance(choice, int) else list(choice)
    return ",".join(str(v) for v in values)


def layers_from_choice(choice: str, num_layers: int) -> list[int] | str:
    """The ``intervention_layers`` value of a layer choice, for a model with ``num_layers`` decoder layers."""
    if choice == "all":
        return "all"
    if choice == "top_half":
        return list(range(num_layers // 2, num_layers))
    if choice.startswith("every"):
        step = choice[len("every") :]
        if not step.isdigit() or int(step) < 1:
            raise ValueError(f"Layer choice {choice!r}: write 'every<k>' with a positive int k, e.g. 'every2'.")
        return list(range(0, num_layers, int(step)))
    try:
        return [int(part) for part in choice.split(",")]
    except ValueError:
        raise ValueError(
            f"Unknown layer choice {choice!r}; use 'all', 'every<k>' (every k-th layer from 0), 'top_half' or a list "
            "of layer indices such as [1, 3]."
        ) from None


@dataclass
class FineStageSearchSpace:
    """The fine-stage (ReFT) settings that :meth:`StagedSFTTrainer.search_fine_stage` searches over.

    Each field lists the choices of one setting; a field with one choice fixes that setting. The default space is
    :meth:`default` (ranks above the model's hidden size left out); a space you give is checked against the model
    as it is (:meth:`validate`), before any training: an impossible value is an error, not skipped.

    Args:
        layers (`list`): intervention-layer choices: `"all"`, `"every<k>"` (every k-th layer from 0), `"top_half"`,
            or lists of layer indices (negatives count from the end). Optuna records them as strings (`"1,3"`).
        positions (`list[int]`): the values of n tried for `intervention_positions="f<n>+l<n>"`.
        share_weights (`list[bool]`): choices of `share_intervention_weights`.
        ranks (`list[int]`): choices of `intervention_rank`, each at most the model's hidden size.
        intervention_types (`list[str]`, *optional*): choices of `intervention_type`; every registered type when
            `None`.
        learning_rate (`tuple[float, float]`, *optional*): `(low, high)` of the ReFT stage's learning rate, sampled
            log-uniformly; `None` keeps the trainer's `reft_learning_rate`.
        epochs (`list[float]`, *optional*): choices of the ReFT stage's epochs (they replace `reft_max_steps`);
            `None` keeps the trainer's ReFT schedule.

    Example:
        ```py
        >>> space = FineStageSearchSpace(layers=["all", [1]], positions=[1, 2], ranks=[1, 2],
        ...                              learning_rate=(1e-3, 1e-2), epochs=[1, 2])
        ```
    """

    layers: list[Any] = field(
        default_factory=lambda: ["all", "every2", "top_half"],
        metadata={
            "help": "Intervention layers: 'all', 'every<k>' (every k-th from layer 0), 'top_half', or explicit lists "
            "of layer indices (e.g. [1, 3]; negatives count from the end)."
        },
    )
    positions: list[int] = field(
        default_factory=lambda: [1, 3, 5, 7],
        metadata={"help": "Values of n for intervention_positions='f<n>+l<n>'."},
    )
    share_weights: list[bool] = field(
        default_factory=lambda: [False, True],
        metadata={"help": "Choices of share_intervention_weights (one intervention for prefix and suffix, or two)."},
    )
    ranks: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8], metadata={"help": "Choices of intervention_rank (<= hidden size)."}
    )
    intervention_types: list[str] | None = field(
        default=None,
        metadata={"help": "Choices of intervention_type; None means every registered type (peft_heft.interventions)."},
    )
    learning_rate: tuple[float, float] | None = field(
        default=(1e-4, 1e-2),
        metadata={"help": "(low, high) of the fine stage's learning rate, sampled log-uniformly; None keeps args'."},
    )
    epochs: list[float] | None = field(
        default_factory=lambda: [1.0, 2.0, 3.0],
        metadata={"help": "Choices of the fine stage's epochs; None keeps the trainer's reft schedule (steps too)."},
    )

    def __post_init__(self) -> None:
        for name in ("layers", "positions", "share_weights", "ranks"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"FineStageSearchSpace.{name} must be a non-empty list of choices, got {value!r}.")
        self.layers = [_layers_choice(choice) for choice in self.layers]
        if self.intervention_types is None:
            self.intervention_types = sorted(INTERVENTION_TYPES)
        elif not isinstance(self.intervention_types, (list, tuple)) or not self.intervention_types:
            raise ValueError(
                f"FineStageSearchSpace.intervention_types must be a non-empty list or None, got "
                f"{self.intervention_types!r}."
            )
        if self.learning_rate is not None:
            low, high = self.learning_rate
            if not (0 < low <= high and math.isfinite(high)):
                raise ValueError(
                    f"FineStageSearchSpace.learning_rate must be (low, high) with 0 < low <= high, got "
                    f"{self.learning_rate!r}."
                )
            self.learning_rate = (float(low), float(high))
        if self.epochs is not None:
            if not isinstance(self.epochs, (list, tuple)) or not self.epochs:
                raise ValueError(f"FineStageSearchSpace.epochs must be a non-empty list or None, got {self.epochs!r}.")
            for epochs in self.epochs:
                if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
                    raise ValueError(f"FineStageSearchSpace.epochs holds {epochs!r}; each choice must be > 0.")

    @classmethod
    def default(cls, hidden_size: int) -> FineStageSearchSpace:
        """The default space, with the ranks above ``hidden_size`` left out."""
        space = cls()
        space.ranks = [rank for rank in space.ranks if rank <= hidden_size] or [hidden_size]
        return space

    def validate(self, base_config: HeftConfig, num_layers: int, hidden_size: int) -> None:
        """Refuse (``ValueError``/``TypeError``) a choice no trial could use on this model: each setting is checked
        as :class:`HeftConfig` checks it, layers against ``num_layers`` and ranks against ``hidden_size``."""
        for choice in self.layers:
            layers = layers_from_choice(choice, num_layers)
            if not layers:
                raise ValueError(f"Layer choice {choice!r} selects no layer of this {num_layers}-layer model.")
            _check_setting(base_config, "layers", choice, intervention_layers=layers)
            try:
                resolve_layers(layers, num_layers)
            except ValueError as error:
                raise ValueError(f"Search space layer choice {choice!r}: {error}") from None
        for n in self.positions:
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_INTERVENTION_POSITIONS:
                raise ValueError(
                    f"Search space positions hold {n!r}; each is the n of 'f<n>+l<n>', an int in "
                    f"1..{MAX_INTERVENTION_POSITIONS}."
                )
        for share in self.share_weights:
            _check_setting(base_config, "share_weights", share, share_intervention_weights=share)
        for rank in self.ranks:
            _check_setting(base_config, "ranks", rank, intervention_rank=rank)
            if rank > hidden_size:
                raise ValueError(
                    f"Search space rank {rank} is larger than the model's hidden size {hidden_size}; use ranks <= "
                    f"{hidden_size}."
                )
        for name in self.intervention_types or []:
            _check_setting(base_config, "intervention_types", name, intervention_type=name)

    def suggest(self, trial, num_layers: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """A trial's ``(intervention settings, fine-stage schedule)`` from Optuna's suggestions."""
        layers = trial.suggest_categorical("layers", list(self.layers))
        n = trial.suggest_categorical("positions", list(self.positions))
        settings = {
            "intervention_layers": layers_from_choice(layers, num_layers),
            "intervention_positions": f"f{n}+l{n}",
            "share_intervention_weights": trial.suggest_categorical("share_weights", list(self.share_weights)),
            "intervention_rank": trial.suggest_categorical("rank", list(self.ranks)),
            "intervention_type": trial.suggest_categorical("intervention_type", list(self.intervention_types or [])),
        }
        schedule: dict[str, Any] = {}
        if self.learning_rate is not None:
            low, high = self.learning_rate
            schedule["learning_rate"] = (
                trial.suggest_float("learning_rate", low, high, log=True) if low < high else low
            )
        if self.epochs is not None:
            schedule["epochs"] = trial.suggest_categorical("epochs", list(self.epochs))
        return settings, schedule


def _check_setting(base_config: HeftConfig, field_name: str, choice: Any, **setting: Any) -> None:
    try:
        dataclasses.replace(base_config, **setting)
    except (ValueError, TypeError) as error:
        raise type(error)(f"Search space {field_name} choice {choice!r} is refused: {error}") from None


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
    path = os.path.join(folder, STUDY_JSON)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    os.replace(path + ".tmp", path)
    _plot(study, record, metric, os.path.join(folder, STUDY_PLOT))
    return record


def _plot(study, record: dict[str, Any], metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    importances: dict[str, float] = {}
    try:
        import optuna

        if sum(t["state"] == "complete" for t in record["trials"]) >= 2:
            importances = optuna.importance.get_param_importances(study)
    except Exception:  # too few trials, a constant metric, a parameter with one value ...: no importance panel
        importances = {}
    panels = 2 if importances else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
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
    plt.close(figure)


def _last(values: dict[str, float]) -> float | None:
    return list(values.values())[-1] if values else None


def _sync_collator(trainer, config: HeftConfig) -> None:
    """The collator places the interventions: give it the adapter's (new) position spec."""
    from .collator import DataCollatorForHeft

    collator = trainer.data_collator
    if isinstance(collator, DataCollatorForHeft):
        collator.position_spec = config.position_spec
        collator.share_weights = config.share_intervention_weights


def _coarse_fingerprint(trainer, config: HeftConfig) -> Any:
    """What the coarse stage's weights depend on: the LoRA settings, the LoRA stage's schedule, the seed, the data
    size. A saved coarse stage is reused only under the same fingerprint."""
    from .staged_sft import _ADAPTER_FIELDS

    args = trainer.args
    lora_fields = [f for f in _ADAPTER_FIELDS if f not in INTERVENTION_SETTINGS and not f.startswith("base_model_")]
    adapter = {name: getattr(config, name, None) for name in lora_fields}
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
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.replace(path + ".tmp", path)


def _check_search_setup(trainer, n_trials: int, metric: str, direction: str | None) -> tuple[str, str, int, int]:
    """Everything that can be refused before any training: ``(metric, direction, coarse index, fine index)``."""
    args = trainer.args
    if args.world_size > 1:
        raise ValueError(
            f"search_fine_stage() runs every trial in one process, but this run has {args.world_size} processes "
            "(accelerate launch / torchrun): run the search in one process (python script.py), then train the "
            "chosen settings with several processes if you want."
        )
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int, got {n_trials!r}.")
    if trainer.eval_dataset is None:
        raise ValueError(
            "search_fine_stage() compares trials on a held-out metric, but the trainer has no eval_dataset; pass "
            "eval_dataset= (a split that is not trained on) to StagedSFTTrainer."
        )
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"metric must be the name of an evaluation metric such as 'eval_loss', got {metric!r}.")
    metric = metric if metric.startswith("eval_") else f"eval_{metric}"
    from .callbacks import GenerationAccuracyCallback

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
            f"search_fine_stage() trains the LoRA (coarse) stage once and searches the ReFT (fine) stage after it; "
            f"stage_order={stages} has no 'lora' stage followed by a 'reft' stage."
        )
    if args.merge_lora_before_reft:
        raise ValueError(
            "search_fine_stage() restores the coarse LoRA weights before each trial; merge_lora_before_reft=True "
            "folds them into the base weights. Set merge_lora_before_reft=False for the search."
        )
    return metric, direction, stages.index("lora"), stages.index("reft")


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
    """The body of :meth:`StagedSFTTrainer.search_fine_stage` (see there)."""
    from safetensors.torch import load_file, save_file
    from transformers.trainer_utils import SaveStrategy

    optuna = import_optuna()
    metric, direction, coarse_index, fine_index = _check_search_setup(trainer, n_trials, metric, direction)
    args = trainer.args
    heft = trainer._heft
    adapter = trainer.model.active_adapter
    base_config = heft.peft_config[adapter]
    num_layers, hidden_size = heft._num_layers, heft._hidden_size
    space = search_space if search_space is not None else FineStageSearchSpace.default(hidden_size)
    if not isinstance(space, FineStageSearchSpace):
        raise TypeError(f"search_space must be a FineStageSearchSpace or None, got {type(space).__name__}.")
    space.validate(base_config, num_layers, hidden_size)

    folder = os.path.join(output_dir if output_dir is not None else trainer._output_dir, SEARCH_DIR)
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
    if marker is not None and marker.get("fingerprint") != fingerprint and "lora" not in trainer._completed_stages:
        logger.warning(
            f"{coarse_folder} holds a coarse stage trained with other LoRA settings, schedule, seed or data than "
            "this run's: it is trained again and replaced."
        )
        marker = None
    if "lora" not in trainer._completed_stages and marker is not None:
        restore(coarse_params, load_file(os.path.join(coarse_folder, COARSE_WEIGHTS)))
        trainer._completed_stages = {"lora": dict(marker["metrics"])}
        trainer.stage_log_history = list(marker["log_history"])
    else:
        if "lora" not in trainer._completed_stages:
            trainer._completed_stages, trainer.stage_log_history = {}, []
            try:
                trainer._train_stage(coarse_index, "lora", None, None, None)
            finally:
                trainer._stage_index = trainer._stage_name = None
        marker = {
            "fingerprint": fingerprint,
            "metrics": trainer._completed_stages["lora"],
            "log_history": trainer.stage_log_history,
        }
        save_file(snapshot(coarse_params), os.path.join(coarse_folder, COARSE_WEIGHTS))
        _write_json(marker_path, marker)
    coarse_metrics = dict(trainer._completed_stages["lora"])
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

    per_stage = ("reft_learning_rate", "reft_num_train_epochs", "reft_max_steps")
    saved_args = {name: getattr(args, name) for name in (*per_stage, "save_strategy", "load_best_model_at_end")}

    def objective(trial) -> float:
        nonlocal best
        restore(coarse_params, coarse)  # in place, and checked bitwise against the snapshot
        settings, schedule = space.suggest(trial, num_layers)
        trial.set_user_attr("settings", settings)
        trial.set_user_attr("schedule", schedule)
        torch.manual_seed(args.seed + trial.number)  # the interventions' initialization
        heft.replace_interventions(adapter, **settings)
        _sync_collator(trainer, heft.peft_config[adapter])
        for name in per_stage:
            setattr(args, name, saved_args[name])
        if "learning_rate" in schedule:
            args.reft_learning_rate = schedule["learning_rate"]
        if "epochs" in schedule:
            args.reft_num_train_epochs, args.reft_max_steps = float(schedule["epochs"]), None
        trainer._completed_stages = {"lora": dict(coarse_metrics)}
        trainer.stage_log_history = list(coarse_log)
        reporter = TrialReporter(trial, metric)
        trainer.add_callback(reporter)
        try:
            trainer._train_stage(fine_index, "reft", None, None, None)
        finally:
            trainer.remove_callback(reporter)
            trainer._stage_index = trainer._stage_name = None
        if reporter.pruned:
            raise optuna.TrialPruned(f"pruned at {metric}={reporter.last_value}")
        metrics = trainer._completed_stages["reft"]
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
            save_file(weights, os.path.join(best_folder, BEST_WEIGHTS))
            _write_json(os.path.join(best_folder, BEST_JSON), best)
            best["weights"] = weights
        return value

    args.save_strategy, args.load_best_model_at_end = SaveStrategy.NO, False  # trials overwrite no checkpoints
    try:
        study.optimize(objective, n_trials=n_trials)
    finally:
        for name, value in saved_args.items():
            setattr(args, name, value)
        restore(coarse_params, coarse)

    # ---- the best trial's settings and weights on the model, so that save_model() saves it as a HEFT adapter
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if complete and best is not None and best["number"] == study.best_trial.number:
        heft.replace_interventions(adapter, **best["settings"])
        _sync_collator(trainer, heft.peft_config[adapter])
        params = adapter_weights(trainer.model, adapter, interventions=True)
        restore(params, best["weights"])
        if "learning_rate" in best["schedule"]:
            args.reft_learning_rate = best["schedule"]["learning_rate"]
        if "epochs" in best["schedule"]:
            args.reft_num_train_epochs, args.reft_max_steps = float(best["schedule"]["epochs"]), None
        trainer._completed_stages = {"lora": coarse_metrics, "reft": dict(best["metrics"])}
        trainer.stage_log_history = coarse_log + list(best["log_history"])
        trainer.state.log_history = list(trainer.stage_log_history)
        heft.set_stage("reft")
    elif complete:
        logger.warning(
            f"The best trial ({study.best_trial.number}) of study {study.study_name!r} has no saved weights in "
            f"{best_folder}; the model keeps the coarse stage and the last interventions, not the best trial's."
        )
    trainer._search_record = write_study(study, metric, folder)
    return study
