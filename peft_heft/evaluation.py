"""Generation-based accuracy for classification-style SFT, like pyreft's BoolQ evaluation.

The model generates greedily from each prompt; the answer is read from the generated text (after a trigger string
when one is given) and compared with the reference completion. With `choices` (e.g. `["yes", "no"]`) the prediction is
the choice that appears first in the generated text, as pyreft does for BoolQ's true/false.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch


def extract_answer(text: str, choices: Sequence[str] | None = None, trigger: str | None = None) -> str:
    """The answer in a generated ``text``: the first of ``choices`` found (after ``trigger``), else the first line.

    Args:
        text (`str`): the generated text.
        choices (`list[str]`, *optional*): the possible answers; matched as whole words, case-insensitively.
        trigger (`str`, *optional*): read only what follows this string, when present.

    Returns:
        `str`: the lower-cased answer (`""` when no choice is found).

    Example:
    ```python
    >>> extract_answer("The answer is: Yes, because...", choices=["yes", "no"], trigger="answer is:")
    'yes'
    ```
    """
    if trigger:
        at = text.lower().find(trigger.lower())
        if at >= 0:
            text = text[at + len(trigger) :]
    text = text.strip().lower()
    if choices:
        best, best_at = "", len(text) + 1
        for choice in choices:
            match = re.search(rf"(?<!\w){re.escape(choice.strip().lower())}(?!\w)", text)
            if match and match.start() < best_at:
                best, best_at = choice.strip().lower(), match.start()
        return best
    return text.splitlines()[0].strip() if text else ""


def normalize_reference(reference: Any, eos_token: str | None = None) -> str:
    """The reference answer of a completion: text of the last message for conversational data, without EOS."""
    if isinstance(reference, list):
        reference = reference[-1]["content"] if reference else ""
    reference = str(reference)
    if eos_token:
        reference = reference.replace(eos_token, "")
    return reference.strip().lower()


def split_prompt_and_answer(example: dict[str, Any]) -> tuple[Any, Any]:
    """The prompt to generate from and the reference answer of a prompt-completion or `messages` example."""
    if "prompt" in example and "completion" in example:
        return example["prompt"], example["completion"]
    messages = example.get("messages")
    if isinstance(messages, list) and messages and messages[-1].get("role") == "assistant":
        return messages[:-1], messages[-1]["content"]
    raise ValueError(
        "Generation accuracy needs prompt-completion examples ('prompt' and 'completion') or conversational "
        f"'messages' ending with an assistant answer; got columns {sorted(example)}."
    )


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(text=prompt)["input_ids"]
    return tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)[
        "input_ids"
    ]


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: Sequence[Any], max_new_tokens: int = 8, batch_size: int = 16
) -> list[str]:
    """Greedy generations (new text only) for ``prompts`` (strings or message lists), in left-padded batches.

    Args:
        model (`torch.nn.Module`): a causal LM; a HEFT `PeftModel` intervenes on each prompt's positions.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer, with a pad token.
        prompts (`list`): plain strings, or conversations (lists of `{"role", "content"}` messages) rendered with
            the chat template and a generation prompt.
        max_new_tokens (`int`): generation budget per prompt.
        batch_size (`int`): prompts per `generate` call.

    Returns:
        `list[str]`: the decoded new text of each prompt, special tokens removed.

    Example:
    ```python
    >>> generate_answers(model, tokenizer, [[{"role": "user", "content": "Is the sky blue?"}]], max_new_tokens=4)
    ['Yes']
    ```

    Prompts are tokenized the way TRL's SFT preparation tokenizes them, so a HEFT model intervenes on the same prompt
    tokens at evaluation as in training.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos_token) first.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [_prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, width - len(row) :] = torch.tensor(row)
                mask[i, width - len(row) :] = 1
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            outputs.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def evaluate_generation_accuracy(
    model,
    tokenizer,
    dataset,
    *,
    choices: Sequence[str] | None = None,
    trigger: str | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Accuracy of greedy generations against the reference completions of ``dataset``.

    Args:
        model (`torch.nn.Module`): a causal LM (a HEFT `PeftModel` intervenes on the prompt positions during
            `generate`).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (with a pad token).
        dataset (`datasets.Dataset` or a list of dicts): rows with `prompt`/`completion` (plain or conversational) or `messages` ending in the answer.
        choices (`list[str]`, *optional*): the possible answers, e.g. `["yes", "no"]`.
        trigger (`str`, *optional*): read the answer only after this string in the generation.
        max_new_tokens (`int`): generation budget per prompt.
        batch_size (`int`): prompts per `generate` call.
        max_samples (`int`, *optional*): evaluate only the first `max_samples` rows.

    Returns:
        `dict` with `accuracy`, `correct`, `total` and the per-row `predictions` and `references`.

    Example:
    ```python
    >>> result = evaluate_generation_accuracy(model, tokenizer, test_set, choices=["yes", "no"])
    >>> result["accuracy"]
    ```
    """
    rows = list(dataset) if max_samples is None else [dataset[i] for i in range(min(max_samples, len(dataset)))]
    if not rows:
        raise ValueError("The evaluation dataset is empty.")
    prompts, raw_references = zip(*(split_prompt_and_answer(row) for row in rows), strict=True)
    references = [normalize_reference(r, tokenizer.eos_token) for r in raw_references]
    if choices:
        unknown = sorted({r for r in references if r not in {c.strip().lower() for c in choices}})
        if unknown:
            raise ValueError(f"Reference answers {unknown[:5]} are not among choices {list(choices)}.")
    generations = generate_answers(model, tokenizer, list(prompts), max_new_tokens, batch_size)
    predictions = [extract_answer(g, choices, trigger) for g in generations]
    if not choices:
        correct_flags = [p.startswith(r) and r != "" for p, r in zip(predictions, references, strict=True)]
    else:
        correct_flags = [p == r for p, r in zip(predictions, references, strict=True)]
    correct = sum(correct_flags)
    return {
        "accuracy": correct / len(rows),
        "correct": correct,
        "total": len(rows),
        "predictions": predictions,
        "references": references,
        "generations": generations,
    }
