"""Data preparation of `StagedSFTTrainer`: TRL's SFT preparation plus where each example's prompt ends.

The interventions sit on the prompt tokens, so every prepared example carries its prompt length
(`PROMPT_LENGTH_COLUMN`), fitted to the truncation TRL applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from datasets import Dataset
from transformers import ProcessorMixin
from transformers.utils import logging
from trl.data_utils import pack_dataset

from .collator import PROMPT_LENGTH_COLUMN
from .mixin_base import SFTTrainerBase
from .packing import PROMPT_MASK_COLUMN, SEQ_LENGTHS_COLUMN, prompt_mask_fn, sequences_of
from .prompts import (
    FULL_LENGTH_COLUMN,
    pretokenized_prompt_length_fn,
    prompt_length_fn,
    truncate_prompt_length_fn,
)
from .validation import check_dataset_format, report_dropped_rows

logger = logging.get_logger(__name__)


def _tokenizer_of(processing_class):
    """The tokenizer of a processing class, as TRL picks it (a processor's own tokenizer)."""
    return processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class


if TYPE_CHECKING:
    from .config import HeftSFTConfig


class PromptLengthsMixin(SFTTrainerBase):
    """Overrides of `SFTTrainer`'s dataset preparation (mixed in before `SFTTrainer`)."""

    if TYPE_CHECKING:  # attributes StagedSFTTrainer sets
        args: HeftSFTConfig  # type: ignore[assignment]  # HEFT's trainer holds a HeftSFTConfig

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # TRL packs right after tokenizing, which loses where each prompt ends: prepare unpacked (TRL's tokenizing,
        # labels, truncation by truncation_mode, dropping fully masked rows), find the prompts, then pack with TRL's
        # own pack_dataset, a per-token prompt mask travelling with input_ids and labels.
        prepared = self._prepare_unpacked(dataset, processing_class, args, formatting_func, dataset_name)
        if not packing:
            return prepared
        if args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")  # TRL's check, same words
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(prepared, Dataset) else {}
        if isinstance(prepared, Dataset):
            map_kwargs["desc"] = f"Marking prompt tokens of {dataset_name} dataset"
        prepared = prepared.map(prompt_mask_fn, fn_kwargs={"length_column": PROMPT_LENGTH_COLUMN}, **map_kwargs)
        if isinstance(prepared, Dataset):
            map_kwargs["desc"] = f"Packing {dataset_name} dataset"
        prepared = prepared.select_columns(["input_ids", "labels", PROMPT_MASK_COLUMN])
        if args.shuffle_dataset:  # as TRL: shuffled before packing, so that neighbours in a row are not correlated
            prepared = prepared.shuffle(seed=args.seed)
        packed = pack_dataset(prepared, args.max_length, args.packing_strategy, map_kwargs)
        return packed.shuffle(seed=args.seed) if args.shuffle_dataset else packed  # and after, as TRL

    def _prepare_unpacked(self, dataset, processing_class, args, formatting_func, dataset_name):
        packing = False
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
        pretokenized = check_dataset_format(dataset, args, formatting_func, dataset_name)
        if pretokenized:
            dataset = dataset.map(pretokenized_prompt_length_fn, **map_kwargs)
        rows_before = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if rows_before and isinstance(dataset, Dataset) and len(dataset) < rows_before:
            report_dropped_rows(rows_before, len(dataset), args, dataset_name)
        keep_end = args.max_length is not None and args.truncation_mode == "keep_end"
        if not pretokenized:
            if isinstance(dataset, Dataset):
                map_kwargs["desc"] = f"Finding prompt tokens of {dataset_name} dataset"
            dataset = dataset.map(
                prompt_length_fn,
                fn_kwargs={
                    "tokenizer": _tokenizer_of(processing_class),
                    "chat_template": self.chat_template,
                    "keep_end": keep_end,
                },
                **map_kwargs,
            )
        if isinstance(dataset, Dataset):
            map_kwargs["desc"] = f"Fitting prompt lengths of {dataset_name} dataset to truncation"
        return dataset.map(
            truncate_prompt_length_fn,
            fn_kwargs={"keep_end": keep_end},
            remove_columns=[FULL_LENGTH_COLUMN],
            **map_kwargs,
        )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [
            c
            for c in (PROMPT_LENGTH_COLUMN, PROMPT_MASK_COLUMN, SEQ_LENGTHS_COLUMN)
            if c not in self._signature_columns
        ]
        self._signature_columns = [*self._signature_columns, *extra]

    def _check_prompts_fit(self, dataset) -> None:
        if not isinstance(dataset, Dataset) or not len(dataset):
            return
        if PROMPT_LENGTH_COLUMN in dataset.column_names:
            lengths = dataset[PROMPT_LENGTH_COLUMN]
        elif PROMPT_MASK_COLUMN in dataset.column_names and SEQ_LENGTHS_COLUMN in dataset.column_names:
            rows = dataset.select_columns(["input_ids", SEQ_LENGTHS_COLUMN, PROMPT_MASK_COLUMN])
            lengths = sequences_of(list(rows), PROMPT_LENGTH_COLUMN)[1]  # one count per packed sequence
        else:
            return
        empty = sum(1 for n in lengths if n == 0)
        if empty == len(lengths) and any(s != "lora" for s in self.args.stage_order):
            raise ValueError(
                "No training example keeps any prompt token after truncation, so the interventions have no position "
                f"to act on (max_length={self.args.max_length}, truncation_mode={self.args.truncation_mode!r}). "
                "Raise max_length or use truncation_mode='keep_start'."
            )
        if empty:
            logger.warning(
                f"{empty} of {len(lengths)} training examples keep no prompt token after truncation; the "
                "interventions skip them."
            )
