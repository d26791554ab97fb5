"""Which tokens of a forward call are the prompt, when the caller passes no ``intervention_locations``.

HEFT intervenes on prompt tokens: `generate()` on the prompt it is given, `StagedSFTTrainer` on each example's prompt.
Any other caller of ``forward`` gets, in this order:

1. ``intervention_locations=``: used as given.
2. ``intervention_prompt_lengths=`` (one int per row): the first ``n`` real tokens of each row are its prompt.
3. ``labels=`` of shape ``(batch, seq_len)`` (TRL's SFT and DPO trainers, a plain ``Trainer``): the real tokens before
   the first supervised label (label != -100) are the prompt. A row supervised from its first real token has no
   visible prompt: the whole row is used and a warning says so (once per process). A row with no supervised label is
   all prompt.
4. Nothing: every real token of the row (``attention_mask``) is the prompt, as in a `generate()` prefill. Without an
   ``attention_mask`` every token counts as real; a batch of several rows without one gets a warning (once), since
   padding cannot be told apart. A call with none of 1.-3. made by lm-evaluation-harness' code (its ``hf`` model
   scores context + continuation this way) is refused: :func:`refuse_lm_eval_call`.

The position spec (``f<n>+l<n>``, ...) is then applied to the prompt tokens of each row.

Outside lm_eval, a call with none of 1.-3. cannot be told apart from a call on a prompt (a `generate()` prefill, a
user's ``model(input_ids)``): any other scorer that runs prompt + answer that way gets interventions on the answer
too, without an error. Scorers pass ``intervention_prompt_lengths=``.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

PROMPT_LENGTHS_KWARG = "intervention_prompt_lengths"
IGNORE_INDEX = -100
_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A ``UserWarning`` the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


def _lm_eval_frame():
    """The innermost frame of lm-evaluation-harness' code (a module ``lm_eval`` or ``lm_eval.*``) on this thread's
    stack, or ``None``."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__")
        if isinstance(module, str) and (module == "lm_eval" or module.startswith("lm_eval.")):
            return frame
        frame = frame.f_back
    return None


def refuse_lm_eval_call() -> None:
    """Raise when lm-evaluation-harness runs a HEFT forward that says nothing about where the prompt ends.

    Called for a HEFT forward with interventions to apply, no ``intervention_locations``, no
    ``intervention_prompt_lengths``, no ``labels`` and outside `generate()`. lm_eval's ``hf`` model (also
    ``hf-auto``/``huggingface`` and subclasses) scores log-likelihoods exactly so: ``model(inps)`` on context +
    continuation, right-padded, no mask. HEFT would take every row, answer and padding included, as the prompt: on a
    trained adapter that is nats off, and different at every batch size, batch size 1 included. A call like that from
    lm_eval's code (a module ``lm_eval.*`` on the call stack) cannot be right, so it stops here; peft-heft's own
    ``heft`` model passes prompt lengths and never gets here. Any other caller is left alone: ``model(input_ids)`` on
    a prompt is a correct call (it is what a `generate()` prefill is), and peft-heft cannot tell it from a call on
    prompt + answer.
    """
    frame = _lm_eval_frame()
    if frame is None:
        return
    caller = f"{frame.f_globals.get('__name__')}.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}"
    raise RuntimeError(
        f"lm-evaluation-harness called a HEFT model without saying where each row's prompt ends (from {caller}, with "
        f"no {PROMPT_LENGTHS_KWARG}, intervention_locations or labels). lm_eval's `hf` model (--model hf "
        "--model_args pretrained=BASE,peft=HEFT_ADAPTER) calls it this way: it scores context + continuation as one "
        "right-padded row with no attention mask, so HEFT's interventions would land on the continuation being scored "
        "and on padding, and the log-likelihoods would be wrong at every batch size. Evaluate HEFT adapters with "
        "peft-heft's `heft` model, same model_args: `python -m peft_heft.lm_eval --model heft --model_args "
        'pretrained=BASE,peft=ADAPTER ...` (or `import peft_heft.lm_eval` and `simple_evaluate(model="heft", ...)`). '
        f"A custom lm_eval model passes {PROMPT_LENGTHS_KWARG}= (each row's prompt token count) with each call."
    )


def prompt_mask_from_lengths(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """``(batch, seq_len)`` bool mask of the first ``prompt_lengths[i]`` real tokens of each row."""
    real = attention_mask.bool()
    rank = real.long().cumsum(dim=1)  # 1-based index of each real token within its row
    return real & (rank <= prompt_lengths.to(rank.device, rank.dtype).unsqueeze(1))


def checked_prompt_lengths(value, batch: int) -> torch.Tensor:
    """``intervention_prompt_lengths`` as a ``(batch,)`` LongTensor, or a ``ValueError``/``TypeError`` naming the fix."""
    lengths = torch.as_tensor(value)
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"{PROMPT_LENGTHS_KWARG} must hold integer token counts, got dtype {lengths.dtype}.")
    if lengths.dim() == 0:
        lengths = lengths.expand(batch)
    if tuple(lengths.shape) != (batch,):
        raise ValueError(
            f"{PROMPT_LENGTHS_KWARG} has shape {tuple(lengths.shape)}; pass one prompt length per row, shape ({batch},)."
        )
    if (lengths < 0).any():
        raise ValueError(f"{PROMPT_LENGTHS_KWARG} must be >= 0 (the number of prompt tokens of each row).")
    return lengths.long()


@dataclass(frozen=True)
class PromptHint:
    """What one forward call says about its prompt: explicit prompt lengths, or its labels."""

    prompt_lengths: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def prompt_mask(
        self, attention_mask: torch.Tensor | None, batch: int, total_len: int, cached: int
    ) -> torch.Tensor:
        """The ``(batch, total_len)`` mask of prompt tokens, for a call with ``cached`` tokens already in the cache."""
        if attention_mask is None:
            attention_mask = torch.ones(batch, total_len, dtype=torch.long)
        real = attention_mask.bool()
        if self.prompt_lengths is not None:
            lengths = checked_prompt_lengths(self.prompt_lengths, batch)
            too_long = lengths.to(real.device) > real.sum(dim=1)
            if too_long.any():
                row = int(too_long.nonzero()[0])
                raise ValueError(
                    f"{PROMPT_LENGTHS_KWARG}[{row}] is {int(lengths[row])}, but row {row} has only "
                    f"{int(real[row].sum())} real token(s); a prompt length counts real (unpadded) tokens of the row."
                )
            return prompt_mask_from_lengths(real, lengths)
        labels = self.labels
        assert labels is not None
        if cached or tuple(labels.shape) != (batch, total_len):
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} cannot tell HEFT where the prompt is in a call of {batch} row(s) "
                f"of {total_len} token(s) ({cached} of them cached). Pass {PROMPT_LENGTHS_KWARG}= (one count per row) "
                "or intervention_locations= with this call."
            )
        labels = labels.to(real.device)
        supervised = (labels != IGNORE_INDEX) & real
        has_label = supervised.any(dim=1)
        first = torch.where(has_label, supervised.long().argmax(dim=1), labels.shape[1])
        before = torch.arange(labels.shape[1], device=real.device).unsqueeze(0) < first.unsqueeze(1)
        mask = real & before
        no_prompt = has_label & ~mask.any(dim=1)
        if no_prompt.any():
            warn_once(
                "labels-without-prompt",
                "HEFT got labels supervised from the first token of a row (no leading -100 labels), so it cannot see "
                "the prompt: interventions are placed over the whole row, answer included. Mask the prompt's labels "
                f"with -100, or pass {PROMPT_LENGTHS_KWARG}= or intervention_locations= with the call.",
            )
            mask = torch.where(no_prompt.unsqueeze(1), real, mask)
        return mask
