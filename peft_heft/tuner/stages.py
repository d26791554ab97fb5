"""The training stage of each HEFT adapter: the one record of it, and what follows from it.

A stage belongs to an adapter, not to the tuner: :class:`AdapterStages` records each adapter's :class:`Stage`, and
everything else is derived from that record when asked: the tuner's ``stage`` (its first active adapter's), whether
interventions are applied (by any active adapter), which parameters train (:func:`apply_requires_grad`) and which
interventions run (the routes built in :mod:`peft_heft.tuner.layer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from peft.tuners.lora import LoraModel
from torch import nn

from ..settings import STAGES

if TYPE_CHECKING:
    from peft.config import PeftConfig


class Stage(NamedTuple):
    """A stage and whether it applies the adapter's interventions (``set_stage(..., apply_interventions=...)``)."""

    name: str
    apply_interventions: bool

    @property
    def trains_lora(self) -> bool:
        return self.name in ("lora", "joint")

    @property
    def trains_interventions(self) -> bool:
        return self.name in ("reft", "joint")

    @classmethod
    def parse(cls, name: str, apply_interventions: bool | None = None) -> Stage:
        """The stage ``name``, applying interventions in every stage but ``lora`` unless told otherwise."""
        if name not in STAGES:
            raise ValueError(f"Unknown HEFT stage {name!r}; use one of {STAGES}.")
        return cls(name, name != "lora" if apply_interventions is None else bool(apply_interventions))


FROZEN = Stage("frozen", True)
LORA = Stage("lora", False)


def default_stage(config: PeftConfig | None) -> Stage:
    """The stage of an adapter never set: ``frozen`` if loaded for inference, else ``lora``."""
    return FROZEN if config is not None and config.inference_mode else LORA


class AdapterStages:
    """Each adapter's recorded :class:`Stage`; an adapter without a record is in its :func:`default_stage`.

    ``interventions_enabled`` is false while PEFT's adapter layers are disabled (``disable_adapter()``): then no
    adapter's interventions apply, whatever its stage.
    """

    def __init__(self) -> None:
        self._records: dict[str, Stage] = {}
        self.interventions_enabled = True

    def of(self, adapter: str, config: PeftConfig | None) -> Stage:
        record = self._records.get(adapter)
        return record if record is not None else default_stage(config)

    def record(self, adapters: Iterable[str], stage: Stage) -> None:
        for adapter in adapters:
            self._records[adapter] = stage

    def record_missing(self, adapters: Iterable[str], stage: Stage) -> None:
        """Record ``stage`` for those of ``adapters`` that have no record yet (a new adapter was injected: the active
        ones keep theirs)."""
        for adapter in adapters:
            self._records.setdefault(adapter, stage)

    def forget(self, adapter: str) -> None:
        self._records.pop(adapter, None)

    def active(self, tuner: LoraModel) -> list[Stage]:
        """The stages of the tuner's active adapters, in activation order."""
        return [self.of(a, tuner.peft_config[a]) for a in tuner.active_adapters if a in tuner.peft_config]

    def apply_requires_grad(self, tuner: LoraModel, interventions: nn.ModuleDict) -> None:
        """``requires_grad`` of every adapter from its stage: only active adapters train, in their own stage."""
        active = set(tuner.active_adapters)
        for adapter, config in tuner.peft_config.items():
            stage = self.of(adapter, config) if adapter in active else FROZEN
            LoraModel.set_requires_grad(tuner, adapter, requires_grad=stage.trains_lora)
            if adapter in interventions:
                interventions[adapter].requires_grad_(stage.trains_interventions)


def check_trainable(tuner: LoraModel, stage: Stage) -> None:
    """A stage that trains needs active adapters that were not loaded for inference."""
    if stage.name in ("lora", "reft", "joint"):
        for adapter in tuner.active_adapters:
            if tuner.peft_config[adapter].inference_mode:
                raise ValueError(
                    f"Adapter {adapter!r} was loaded for inference; load it with is_trainable=True to train "
                    f"stage {stage.name!r}."
                )
