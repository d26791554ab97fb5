"""peft-heft: HEFT (LoRA, then ReFT interventions) as a PEFT method.

``import peft_heft`` registers ``PeftType.HEFT`` with PEFT, after which ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` handle HEFT adapters.
"""

from .config import HeftConfig
from .interventions import (
    DireftIntervention,
    LoreftIntervention,
    NoreftIntervention,
    register_intervention_type,
)
from .model import HeftModel
from .positions import PositionSpec, compute_locations
from .registration import register_heft

register_heft()

__version__ = "0.1.0.dev0"

__all__ = [
    "DireftIntervention",
    "HeftConfig",
    "HeftModel",
    "LoreftIntervention",
    "NoreftIntervention",
    "PositionSpec",
    "compute_locations",
    "register_heft",
    "register_intervention_type",
]
