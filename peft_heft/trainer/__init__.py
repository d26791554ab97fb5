"""HEFT training on TRL: the staged SFT trainer, its config, collator and callbacks, and the DPO trainer."""

from .callbacks import HeftCallback, StageProgressCallback
from .collator import DataCollatorForHeft
from .config import HeftSFTConfig
from .dpo import HeftDPOConfig, HeftDPOTrainer
from .search import FineStageSearchSpace
from .staged_sft import StagedSFTTrainer

__all__ = [
    "DataCollatorForHeft",
    "FineStageSearchSpace",
    "HeftCallback",
    "HeftDPOConfig",
    "HeftDPOTrainer",
    "HeftSFTConfig",
    "StageProgressCallback",
    "StagedSFTTrainer",
]
