"""HEFT adapters in lm-evaluation-harness: the ``heft`` model, with the interventions on each request's prompt.

HEFT intervenes on prompt tokens: ``StagedSFTTrainer`` trains the interventions on the tokens of each example's
prompt and `generate()` puts them on the tokens of the prompt it is given. lm-evaluation-harness' own ``hf`` model
scores a request by running context + continuation with no attention mask and nothing that says where the context
ends, so a HEFT adapter's ``l<n>`` positions would land on the continuation (and, in batches, on right padding).
peft-heft stops that: a HEFT forward called from lm_eval's code without an attention mask, prompt lengths or
locations raises an error that says to use ``--model heft`` (see :func:`peft_heft.prompt_tokens.refuse_lm_eval_call`).

``HeftLM`` (registered as ``heft``) is lm_eval's ``HFLM`` with one change: every forward it makes for
``loglikelihood`` and ``loglikelihood_rolling`` gets the rows' attention mask and their prompt lengths
(``intervention_prompt_lengths``). The prompt of a request is its context string as lm_eval received it, **before**
lm_eval moves the context's trailing whitespace (a chat template's ``"\\n"``, a trailing space) into the continuation:
its tokens are counted the way ``StagedSFTTrainer`` counts a prompt's (the tokens the context alone shares with
context + continuation), so the interventions sit where training and `generate()` (and lm_eval's own
``generate_until``, which tokenizes the whole context) put them. lm_eval still scores the tokens it always scores
(the moved whitespace included). ``generate_until`` goes through HEFT's `generate()`. Scores do not depend on the
batch size.

Run it like lm_eval's CLI (every lm_eval option works)::

    python -m peft_heft.lm_eval --model heft --model_args pretrained=BASE,peft=ADAPTER --tasks TASK

or from Python: ``import peft_heft.lm_eval`` and ``lm_eval.simple_evaluate(model="heft", model_args=...)``, or pass
``HeftLM(pretrained=peft_model, tokenizer=tokenizer)`` as the model.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "peft_heft.lm_eval needs lm-evaluation-harness: pip install 'peft-heft[lm-eval]' (or pip install lm_eval)."
    ) from error

import peft_heft  # noqa: F401  (registers the HEFT PEFT type before lm_eval loads an adapter)

from ..prompt_tokens import PROMPT_LENGTHS_KWARG
from ..tuner.model import _find_heft_tuner

Request = tuple[Any, list[int], list[int]]

HF_MODEL_NAMES = ("hf", "hf-auto", "huggingface")


def _row_signature(tokens: Sequence[int]) -> tuple[int, ...]:
    """A row as lm_eval pads it (with 0s on the right), without those trailing 0s."""
    end = len(tokens)
    while end and tokens[end - 1] == 0:
        end -= 1
    return tuple(tokens[:end])


def _common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """Leading tokens the two sequences share (TRL's and ``StagedSFTTrainer``'s prompt length of an example)."""
    n = 0
    for a, b in zip(ids, other, strict=False):
        if a != b:
            break
        n += 1
    return n


@register_model("heft")
class HeftLM(HFLM):
    """lm_eval's ``HFLM`` for a HEFT adapter: the interventions go on each request's prompt.

    Takes every ``HFLM`` argument (``pretrained=BASE,peft=ADAPTER``, ``batch_size``, ``device``, ``dtype``, ...);
    ``pretrained`` may also be a HEFT ``PeftModel`` already loaded. Causal LMs only.

    The prompt of a ``loglikelihood`` request is its context string as the task wrote it, trailing whitespace
    included (lm_eval moves that whitespace into the continuation before tokenizing): the tokens that
    ``tok_encode(context)`` shares with lm_eval's tokens of context + continuation, exactly as ``StagedSFTTrainer``
    counts the prompt of a prompt/completion example. ``loglikelihood_rolling`` windows are token-level: their
    context part is the prompt.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.backend != "causal":
            raise ValueError("The heft lm_eval model scores causal LMs only (HEFT adapts decoder-only models).")
        if _find_heft_tuner(self.model) is None:
            raise ValueError(
                "The heft lm_eval model needs a HEFT adapter: pass model_args peft=ADAPTER (a folder or hub id saved "
                "by peft-heft), or a HEFT PeftModel as `pretrained`. For a model without one, use --model hf."
            )
        self._heft_rows: dict[tuple[int, ...], tuple[int, int]] | None = None
        self._heft_prompt_ids: dict[str, list[int]] = {}
        self._heft_warned_merge = False

    def heft_prompt_length(self, request: Request) -> int:
        """How many of the request's tokens (``context_enc + continuation_enc``) are its prompt.

        ``request`` is what lm_eval hands to ``_loglikelihood_tokens``: ``((context, continuation), context_enc,
        continuation_enc)`` for ``loglikelihood`` (the strings as the task wrote them, before lm_eval moved the
        context's trailing whitespace into the continuation), ``(None, context_enc, continuation_enc)`` for a
        ``loglikelihood_rolling`` window.
        """
        strings, context_enc, continuation_enc = request
        if not isinstance(strings, tuple) or not strings or not isinstance(strings[0], str) or not strings[0]:
            return len(context_enc)  # a rolling window, or an empty context (lm_eval's prefix token is the prompt)
        context = strings[0]
        prompt = self._heft_prompt_ids.get(context)
        if prompt is None:
            prompt = self._heft_prompt_ids[context] = list(self.tok_encode(context))  # as generate_until encodes it
        whole = list(context_enc) + list(continuation_enc)
        length = _common_prefix_length(prompt, whole)
        if length < len(prompt) and not self._heft_warned_merge:
            self._heft_warned_merge = True
            warnings.warn(
                f"The context {context[-40:]!r} (its last characters) does not tokenize as a prefix of context + "
                f"continuation: its last {len(prompt) - length} token(s) merge with the continuation's first. The "
                f"interventions go on the {length} tokens both share, as StagedSFTTrainer counts such a prompt in "
                "training; generate() on the context alone would intervene on its own last token(s). Ending contexts "
                "without trailing spaces (and starting the continuations with them) avoids the difference.",
                UserWarning,
                stacklevel=2,
            )
        if length >= len(whole):
            raise ValueError(
                f"The continuation {strings[1]!r} after the context {context[-40:]!r} (its last characters) adds no "
                "token of its own: lm_eval would score only the whitespace it moved from the end of the context, "
                "which is part of the prompt HEFT intervenes on. Give the request a non-empty continuation."
            )
        return length

    # lm_eval's rows: inp = (context + continuation)[-(max_length + 1):][:-1], right-padded with 0s by pad_and_concat
    def _row_of(self, request: Request) -> tuple[tuple[int, ...], int, int]:
        _, context, continuation = request
        whole = list(context) + list(continuation)
        start = max(0, len(whole) - (self.max_length + 1))
        inp = whole[start:-1]
        return _row_signature(inp), max(0, self.heft_prompt_length(request) - start), len(inp)

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        """lm_eval's scoring, in passes where no two requests with different prompts share a row.

        Two requests whose rows are the same tokens (up to lm_eval's zero padding) but whose prompts end at
        different places need different interventions; lm_eval would batch them (or reuse one's logits for the
        other) without telling them apart, so they go to separate passes. Real tasks almost always need one pass.
        """
        passes: list[list[int]] = []
        seen: dict[tuple[int, ...], list[int]] = defaultdict(list)  # row -> prompt lengths, one per pass
        rows_of = [self._row_of(request) for request in requests]
        for index, (signature, prompt_len, _) in enumerate(rows_of):
            lengths = seen[signature]
            slot = lengths.index(prompt_len) if prompt_len in lengths else len(lengths)
            if slot == len(lengths):
                lengths.append(prompt_len)
            while len(passes) <= slot:
                passes.append([])
            passes[slot].append(index)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for indices in passes:
            subset = [requests[i] for i in indices]
            rows: dict[tuple[int, ...], tuple[int, int]] = {}
            for i in indices:
                signature, prompt_len, length = rows_of[i]
                known = rows.get(signature)
                rows[signature] = (prompt_len, max(length, known[1]) if known else length)
            self._heft_rows = rows
            try:
                scores = super()._loglikelihood_tokens(subset, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._heft_rows = None
            for i, score in zip(indices, scores, strict=True):
                results[i] = score
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _detect_batch_size(self, requests=None, pos: int = 0):
        """lm_eval's batch-size probe (``batch_size=auto``), run on rows of its own: the whole row is the prompt."""
        rows, self._heft_rows = self._heft_rows, None
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._heft_rows = rows

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows = self._heft_rows
        if rows is None:
            # not a scoring call (lm_eval probing the batch size with rows of its own): the whole row is the prompt
            prompt_lens = [inps.shape[1]] * inps.shape[0]
            mask = torch.ones_like(inps)
        else:
            prompt_lens, lengths = [], []
            for tokens in inps.tolist():
                found = rows.get(_row_signature(tokens))
                if found is None:
                    raise RuntimeError(
                        "peft_heft.lm_eval got a row it did not prepare: this lm_eval release builds its log-likelihood "
                        "batches differently from the one peft-heft supports. Please report it with your lm_eval "
                        "version."
                    )
                prompt_lens.append(found[0])
                lengths.append(found[1])
            positions = torch.arange(inps.shape[1], device=inps.device).unsqueeze(0)
            mask = (positions < torch.tensor(lengths, device=inps.device).unsqueeze(1)).long()
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            kwargs = {PROMPT_LENGTHS_KWARG: torch.tensor(prompt_lens, device=inps.device)}
            return self.model(input_ids=inps, attention_mask=mask, **kwargs).logits


def _model_and_args(argv: Sequence[str]) -> tuple[str | None, str]:
    model, model_args = None, ""
    for i, arg in enumerate(argv):
        for flag in ("--model", "--model_args"):
            value = None
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value is not None:
                if flag == "--model":
                    model = value
                else:
                    model_args = value
    return model, model_args


def check_cli_arguments(argv: Sequence[str]) -> None:
    """Refuse ``--model hf`` with a HEFT adapter: lm_eval's ``hf`` model puts the interventions on the answers."""
    model, model_args = _model_and_args(argv)
    if model not in HF_MODEL_NAMES:
        return
    peft_path = next((part.split("=", 1)[1] for part in model_args.split(",") if part.startswith("peft=")), None)
    if peft_path is None:
        return
    from peft import PeftConfig

    try:
        peft_type = str(PeftConfig.from_pretrained(peft_path).peft_type)
    except Exception:  # noqa: BLE001 - let lm_eval report a path it cannot load, as it would without us
        return
    if peft_type.rsplit(".", 1)[-1] == "HEFT":
        raise SystemExit(
            f"{peft_path} is a HEFT adapter: run it with --model heft (same model_args). lm_eval's --model {model} "
            "scores context + answer with no mask and no context length, so the interventions would land on the "
            "answers and on padding."
        )
