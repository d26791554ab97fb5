"""Where the prompt ends in each prepared SFT example, so interventions go on the prompt tokens.

At inference, `generate()` intervenes on the tokens of the prompt it is given. Training must intervene on the same
tokens: for prompt-completion data the tokens of `prompt` (rendered with the generation prompt for conversational
data, as TRL does), for `messages` data everything before the last assistant turn, and for plain text the whole
sequence. The count is taken after TRL's own tokenization and truncation, so it always matches `input_ids`.
"""

from __future__ import annotations

import json
from typing import Any

from trl.data_utils import common_prefix_length, is_conversational

from .collator import PROMPT_LENGTH_COLUMN

FULL_LENGTH_COLUMN = "heft_full_length"


def _tokenize(tokenizer, content, example: dict[str, Any], chat_template, add_generation_prompt: bool) -> list[int]:
    """Token ids of ``content`` the way TRL's SFT preparation tokenizes it."""
    if isinstance(content, str):
        return tokenizer(text=content)["input_ids"]
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return tokenizer.apply_chat_template(
        content,
        tokenize=True,
        return_dict=True,
        chat_template=chat_template,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        **example.get("chat_template_kwargs", {}),
    )["input_ids"]


def _prompt_and_full(example: dict[str, Any]):
    """The prompt and the whole example as TRL tokenizes them, or ``(None, None)`` for plain language modeling."""
    if "prompt" in example and "completion" in example:
        return example["prompt"], example["prompt"] + example["completion"]
    messages = example.get("messages")
    if isinstance(messages, list) and is_conversational(example):
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or last == 0:
            return None, None
        return messages[:last], messages
    return None, None


def prompt_length_fn(example: dict[str, Any], tokenizer, chat_template, keep_end: bool) -> dict[str, int]:
    """``datasets.map`` function: prompt token count and untruncated length of one prepared example.

    Follows TRL's own order: a `prompt`/`completion` pair wins over `messages`, which wins over text (also when a
    formatting function added a `text` column, TRL tokenizes the prompt-completion or messages columns).
    """
    n_ids = len(example["input_ids"])
    prompt, full = _prompt_and_full(example)
    if prompt is None:
        return {PROMPT_LENGTH_COLUMN: n_ids, FULL_LENGTH_COLUMN: n_ids}
    conversational = not isinstance(prompt, str)
    prompt_ids = _tokenize(tokenizer, prompt, example, chat_template, add_generation_prompt=conversational)
    if keep_end:
        full_ids = _tokenize(tokenizer, full, example, chat_template, add_generation_prompt=False)
        return {PROMPT_LENGTH_COLUMN: common_prefix_length(prompt_ids, full_ids), FULL_LENGTH_COLUMN: len(full_ids)}
    return {PROMPT_LENGTH_COLUMN: common_prefix_length(prompt_ids, example["input_ids"]), FULL_LENGTH_COLUMN: n_ids}


def pretokenized_prompt_length_fn(example: dict[str, Any]) -> dict[str, int]:
    """For datasets that come tokenized: the prompt is a ``heft_prompt_length`` column, else the leading zeros of
    ``completion_mask``, else the leading ``-100`` labels; with none of them, the whole sequence."""
    ids = example["input_ids"]
    labels = example.get("labels")
    if example.get(PROMPT_LENGTH_COLUMN) is not None:
        n = int(example[PROMPT_LENGTH_COLUMN])
    elif example.get("completion_mask") is not None:
        mask = example["completion_mask"]
        n = next((i for i, bit in enumerate(mask) if bit), len(mask))
    elif labels is not None and len(labels) and labels[0] == -100:
        n = next((i for i, label in enumerate(labels) if label != -100), len(labels))
    else:
        n = len(ids)
    return {PROMPT_LENGTH_COLUMN: n, FULL_LENGTH_COLUMN: len(ids)}


def truncate_prompt_length_fn(example: dict[str, Any], keep_end: bool) -> dict[str, int]:
    """Adjust the prompt count for TRL's truncation (``keep_start`` cuts the tail, ``keep_end`` the head)."""
    n_ids = len(example["input_ids"])
    n = int(example[PROMPT_LENGTH_COLUMN])
    if keep_end:
        n -= int(example[FULL_LENGTH_COLUMN]) - n_ids
    return {PROMPT_LENGTH_COLUMN: max(0, min(n, n_ids))}
