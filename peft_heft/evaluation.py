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

from .prompt_tokens import PROMPT_LENGTHS_KWARG
from .tuner.model import _find_heft_tuner


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


def check_accuracy_rows(rows, tokenizer, choices: Sequence[str] | None = None) -> tuple[list[Any], list[str]]:
    """The prompts and normalized reference answers of evaluation rows; an empty set, a row without a prompt and an
    answer, or an answer outside `choices` is an error."""
    rows = list(rows)
    if not rows:
        raise ValueError("The evaluation dataset is empty.")
    prompts, raw_references = zip(*(split_prompt_and_answer(row) for row in rows), strict=True)
    references = [normalize_reference(r, tokenizer.eos_token) for r in raw_references]
    if choices:
        unknown = sorted({r for r in references if r not in {c.strip().lower() for c in choices}})
        if unknown:
            raise ValueError(f"Reference answers {unknown[:5]} are not among choices {list(choices)}.")
    return list(prompts), references


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
    prompts, references = check_accuracy_rows(rows, tokenizer, choices)
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


@torch.no_grad()
def score_continuations(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Log-likelihood of each ``continuation`` after its ``context``, one row at a time, interventions on the context.

    The context is tokenized alone (with the special tokens the tokenizer adds, as for `generate_answers`) and the
    continuation is the rest of ``context + continuation``'s tokens (as lm-evaluation-harness splits them); a HEFT
    model intervenes on the context tokens only, as `generate()` does on a prompt. No batching and no padding: a
    reference for batched scorers.

    Example:
    ```python
    >>> score_continuations(model, tokenizer, [("Is the sky blue? Answer:", " yes"), ("Is the sky blue? Answer:", " no")])
    [-0.41, -1.32]
    ```
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    try:
        for context, continuation in pairs:
            context_ids = tokenizer(text=context)["input_ids"]
            whole = tokenizer(text=context + continuation)["input_ids"]
            if not context_ids or whole[: len(context_ids)] != context_ids or len(whole) == len(context_ids):
                raise ValueError(
                    f"Context {context!r} does not tokenize as a non-empty prefix of context + continuation "
                    f"{context + continuation!r}; the continuation cannot be scored on its own tokens."
                )
            ids = torch.tensor([whole], device=device)
            hint = {PROMPT_LENGTHS_KWARG: [len(context_ids)]} if _find_heft_tuner(model) is not None else {}
            logits = model(input_ids=ids, **hint).logits[0, :-1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            targets = ids[0, 1:]
            picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)[len(context_ids) - 1 :]
            scores.append(float(picked.sum()))
    finally:
        model.train(was_training)
    return scores


def evaluate_choice_accuracy(
    model, tokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]], labels: Sequence[int]
) -> dict[str, Any]:
    """Multiple-choice accuracy: the choice with the highest log-likelihood after its context (lm_eval's ``acc``).

    Args:
        contexts (`list[str]`): one context per question.
        choices (`list[list[str]]`): the candidate continuations of each question (include the leading space).
        labels (`list[int]`): the index of the right choice of each question.

    Returns:
        `dict` with `accuracy`, `correct`, `total`, the per-question `predictions` and the `scores` of every choice.
    """
    if not (len(contexts) == len(choices) == len(labels)) or not contexts:
        raise ValueError("contexts, choices and labels must be non-empty and of the same length.")
    scores = [
        score_continuations(model, tokenizer, [(c, option) for option in opts])
        for c, opts in zip(contexts, choices, strict=True)
    ]
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(int(p == y) for p, y in zip(predictions, labels, strict=True))
    return {
        "accuracy": correct / len(contexts),
        "correct": correct,
        "total": len(contexts),
        "predictions": predictions,
        "scores": scores,
    }
