"""peft-heft: HEFT (LoRA, then ReFT interventions) as a PEFT method.

``import peft_heft`` registers ``PeftType.HEFT`` with PEFT, after which ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` handle HEFT adapters.
"""

from .registration import register_heft
from .settings import SettingsMismatchError
from .tuner.config import HeftConfig
from .tuner.interventions import (
    DireftIntervention,
    LoreftIntervention,
    NoreftIntervention,
    register_intervention_type,
)
from .tuner.model import HeftModel
from .tuner.positions import PositionSpec, compute_locations

register_heft()

__version__ = "0.1.0.dev0"

# The trainer pulls in TRL; import it on first use so `import peft` (which autoloads peft_heft) stays light. This is
# the one list of the trainer's public names: `peft_heft.trainer.__all__` is this tuple.
_TRAINER_EXPORTS = (
    "DataCollatorForHeft",
    "FineStageSearchSpace",
    "GenerationAccuracyCallback",
    "HeftCallback",
    "HeftDPOConfig",
    "HeftDPOTrainer",
    "HeftSFTConfig",
    "StageProgressCallback",
    "StagedSFTTrainer",
    "run_fine_stage_search",
)


def __getattr__(name: str):
    if name in _TRAINER_EXPORTS:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'peft_heft' has no attribute {name!r}")


__all__ = [
    *_TRAINER_EXPORTS,
    "DireftIntervention",
    "HeftConfig",
    "HeftModel",
    "LoreftIntervention",
    "NoreftIntervention",
    "PositionSpec",
    "SettingsMismatchError",
    "compute_locations",
    "register_heft",
    "register_intervention_type",
]
