"""HEFT training on TRL: the staged SFT trainer, its config, collator and callbacks."""

from .callbacks import HeftCallback, StageProgressCallback
from .collator import DataCollatorForHeft
from .config import HeftSFTConfig
from .staged_sft import StagedSFTTrainer

__all__ = ["DataCollatorForHeft", "HeftCallback", "HeftSFTConfig", "StageProgressCallback", "StagedSFTTrainer"]
