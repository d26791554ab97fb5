"""The fine-stage (ReFT) search space of :func:`peft_heft.trainer.search.run_fine_stage_search`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..tuner.config import MAX_INTERVENTION_POSITIONS, HeftConfig
from ..tuner.interventions import INTERVENTION_TYPES
from ..tuner.placement import resolve_layers


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
    """The fine-stage (ReFT) settings that :func:`~peft_heft.trainer.search.run_fine_stage_search` searches over.

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
        metadata={
            "help": "Choices of intervention_type; None means every registered type (peft_heft.tuner.interventions)."
        },
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
