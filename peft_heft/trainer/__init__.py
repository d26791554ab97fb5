"""HEFT training on TRL: the staged SFT trainer, its config, collator and callbacks, and the DPO trainer."""

from .callbacks import GenerationAccuracyCallback, HeftCallback, StageProgressCallback
from .collator import DataCollatorForHeft
from .config import HeftSFTConfig
from .dpo import HeftDPOConfig, HeftDPOTrainer
from .search import FineStageSearchSpace
from .staged_sft import StagedSFTTrainer

__all__ = [
    "DataCollatorForHeft",
    "FineStageSearchSpace",
    "GenerationAccuracyCallback",
    "HeftCallback",
    "HeftDPOConfig",
    "HeftDPOTrainer",
    "HeftSFTConfig",
    "StageProgressCallback",
    "StagedSFTTrainer",
]
