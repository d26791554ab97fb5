"""HEFT training on TRL: the staged SFT trainer, its config, collator and callbacks, the search, the DPO trainer."""

# ruff: noqa: F401  (re-exports: __all__ is peft_heft._TRAINER_EXPORTS, which ruff cannot read statically)
from .. import _TRAINER_EXPORTS
from .callbacks import GenerationAccuracyCallback, HeftCallback, StageProgressCallback
from .collator import DataCollatorForHeft
from .config import HeftSFTConfig
from .dpo import HeftDPOConfig, HeftDPOTrainer
from .search import run_fine_stage_search
from .search_space import FineStageSearchSpace
from .staged_sft import StagedSFTTrainer

# the names peft_heft exports lazily (peft_heft._TRAINER_EXPORTS), spelled once
__all__ = list(_TRAINER_EXPORTS)
