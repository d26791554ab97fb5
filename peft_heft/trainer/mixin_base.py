"""The base class StagedSFTTrainer's mixins are type-checked against (``object`` at run time).

Each mixin (checkpoints, data, reporting) is only ever mixed in before ``trl.SFTTrainer``: typing it against
``SFTTrainer`` lets mypy check its uses of the trainer's attributes without a runtime base.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trl import SFTTrainer as SFTTrainerBase
else:
    SFTTrainerBase = object

__all__ = ["SFTTrainerBase"]
