"""Collation for HEFT SFT: TRL's batches plus the intervention locations of each row's prompt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..prompt_tokens import prompt_mask_from_lengths
from ..tuner.positions import PositionSpec, compute_locations
from .packing import PROMPT_MASK_COLUMN, packed_locations, sequences_of

PROMPT_LENGTH_COLUMN = "heft_prompt_length"
_HEFT_COLUMNS = (PROMPT_LENGTH_COLUMN, PROMPT_MASK_COLUMN)


def _starts(lengths: list[int]) -> list[int]:
    return [sum(lengths[:i]) for i in range(len(lengths))]


@dataclass
class DataCollatorForHeft:
    """Wrap a collator (TRL's ``DataCollatorForLanguageModeling`` by default) and add ``intervention_locations``.

    Each example may carry ``heft_prompt_length``: the number of tokens of its prompt (the part before the completion,
    as prepared by [`StagedSFTTrainer`]). Interventions are placed on those tokens with the adapter's position spec,
    exactly as `generate()` places them on a prompt; without the column, on all real tokens of the row.

    Args:
        collator (`Callable`):
            The collator producing `input_ids`, `attention_mask` and `labels`.
        position_spec (`PositionSpec` or `str`):
            The adapter's `intervention_positions`, e.g. `"f7+l7"`.
        share_weights (`bool`):
            The adapter's `share_intervention_weights` (decides the number of location groups).
        padding_side (`str`, *optional*, defaults to `"right"`):
            `"left"` moves each row's padding to the left after collation (TRL's collator pads on the right).

    Called on a list of examples, it returns the wrapped collator's batch plus `intervention_locations`, a
    `LongTensor` `(batch, groups, n)` with `-1` for unused slots. A padding-free batch (one flattened row with
    `position_ids` and no `attention_mask`, TRL's `padding_free=True` or `packing=True`) gets the locations of every
    sequence in the row, each on its own prompt (packed examples carry `seq_lengths` and `heft_prompt_mask`).

    Example:
    ```python
    >>> from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    >>> collator = DataCollatorForHeft(DataCollatorForLanguageModeling(pad_token_id=0), "f2+l2", share_weights=False)
    >>> batch = collator([{"input_ids": [1, 5, 6, 7, 8], "heft_prompt_length": 4}])
    >>> batch["intervention_locations"].tolist()
    [[[0, 1], [2, 3]]]
    ```
    """

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    position_spec: PositionSpec | str
    share_weights: bool = False
    padding_side: str = "right"

    def __post_init__(self):
        if isinstance(self.position_spec, str):
            self.position_spec = PositionSpec.parse(self.position_spec)
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}.")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompt_lengths = [example.get(PROMPT_LENGTH_COLUMN) for example in examples]
        lengths, packed_prompts = sequences_of(examples, PROMPT_LENGTH_COLUMN)
        examples = [{k: v for k, v in example.items() if k not in _HEFT_COLUMNS} for example in examples]
        batch = self.collator(examples)
        if "attention_mask" not in batch:
            return self._padding_free(batch, lengths, packed_prompts)
        mask = batch["attention_mask"]
        if self.padding_side == "left":
            batch = _move_padding_left(batch, mask)
            mask = batch["attention_mask"]
        batch["intervention_locations"] = self.locations(mask, prompt_lengths)
        return batch

    def _padding_free(self, batch: dict[str, Any], lengths: list[int], prompts: list[int]) -> dict[str, Any]:
        """A flattened row (TRL's padding-free collation): each sequence's prompt, found from the examples."""
        position_ids = batch.get("position_ids")
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[0] != 1:
            raise ValueError(
                "HEFT places interventions on each row's prompt: the wrapped collator returned neither an "
                "attention_mask nor the one flattened row of position_ids of a padding-free batch "
                f"(keys: {sorted(batch)}). Return an attention_mask, or use TRL's DataCollatorForLanguageModeling."
            )
        starts = (position_ids[0] == 0).nonzero().flatten().tolist()
        if sum(lengths) > position_ids.shape[1] or not set(_starts(lengths)) <= set(starts):
            raise ValueError(
                f"The padding-free batch's position_ids restart at columns {starts[:8]}, but its examples hold "
                f"sequences of {lengths[:8]} tokens: the row does not concatenate the examples in order. Use TRL's "
                "DataCollatorForLanguageModeling(padding_free=True)."
            )
        if self.padding_side == "left":
            raise ValueError("padding_side='left' has no meaning for a padding-free batch (it has no padding).")
        spec = self.position_spec
        assert isinstance(spec, PositionSpec)  # parsed in __post_init__
        batch["intervention_locations"] = packed_locations(spec, self.share_weights, lengths, prompts)
        return batch

    def locations(self, attention_mask: torch.Tensor, prompt_lengths: list[int | None]) -> torch.Tensor:
        """``(batch, groups, n)`` locations on the first ``prompt_length`` real tokens of each row."""
        real = attention_mask.bool()
        limits = torch.tensor([int(n) if n is not None else int(real[i].sum()) for i, n in enumerate(prompt_lengths)])
        prompt_mask = prompt_mask_from_lengths(real, limits)
        batch, seq_len = attention_mask.shape
        spec = self.position_spec
        assert isinstance(spec, PositionSpec)  # parsed in __post_init__
        return compute_locations(spec, prompt_mask.long(), batch, seq_len, self.share_weights)


def _move_padding_left(batch: dict[str, Any], mask: torch.Tensor) -> dict[str, Any]:
    """Roll each right-padded row so its padding comes first (input_ids, attention_mask, labels, position_ids)."""
    seq_len = mask.shape[1]
    shifts = seq_len - mask.sum(dim=1)
    index = (torch.arange(seq_len).unsqueeze(0) - shifts.unsqueeze(1)) % seq_len
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == mask.shape:
            out[key] = value.gather(1, index)
    return out
