"""HEFT adapters in lm-evaluation-harness: the ``heft`` model, with the interventions on each request's context.

lm-evaluation-harness' own ``hf`` model scores a request by running context + continuation with no attention mask
and nothing that says where the context ends, so a HEFT adapter's ``l<n>`` positions land on the continuation (and,
in batches, on right padding). ``HeftLM`` (registered as ``heft``) is lm_eval's ``HFLM`` with one change: every
forward it makes for ``loglikelihood`` and ``loglikelihood_rolling`` gets the rows' attention mask and their context
lengths (``intervention_prompt_lengths``), so the interventions sit on the context, exactly where `generate()` puts
them on a prompt; ``generate_until`` goes through HEFT's `generate()`, which does that already. Scores do not depend
on the batch size.

Run it like lm_eval's CLI (every lm_eval option works)::

    python -m peft_heft.lm_eval --model heft --model_args pretrained=BASE,peft=ADAPTER --tasks TASK

or from Python: ``import peft_heft.lm_eval`` and ``lm_eval.simple_evaluate(model="heft", model_args=...)``, or pass
``HeftLM(pretrained=peft_model, tokenizer=tokenizer)`` as the model.
"""

from __future__ import annotations

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

from ..model import _find_heft_tuner
from ..prompt_tokens import PROMPT_LENGTHS_KWARG

Request = tuple[Any, list[int], list[int]]

HF_MODEL_NAMES = ("hf", "hf-auto", "huggingface")


def _row_signature(tokens: Sequence[int]) -> tuple[int, ...]:
    """A row as lm_eval pads it (with 0s on the right), without those trailing 0s."""
    end = len(tokens)
    while end and tokens[end - 1] == 0:
        end -= 1
    return tuple(tokens[:end])


@register_model("heft")
class HeftLM(HFLM):
    """lm_eval's ``HFLM`` for a HEFT adapter: the interventions go on each request's context.

    Takes every ``HFLM`` argument (``pretrained=BASE,peft=ADAPTER``, ``batch_size``, ``device``, ``dtype``, ...);
    ``pretrained`` may also be a HEFT ``PeftModel`` already loaded. Causal LMs only.
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

    # lm_eval's rows: inp = (context + continuation)[-(max_length + 1):][:-1], right-padded with 0s by pad_and_concat
    def _row_of(self, context: list[int], continuation: list[int]) -> tuple[tuple[int, ...], int, int]:
        whole = context + continuation
        start = max(0, len(whole) - (self.max_length + 1))
        inp = whole[start:-1]
        return _row_signature(inp), max(0, len(context) - start), len(inp)

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        """lm_eval's scoring, in passes where no two requests with different contexts share a row.

        Two requests whose rows are the same tokens (up to lm_eval's zero padding) but whose contexts end at
        different places need different interventions; lm_eval would batch them (or reuse one's logits for the
        other) without telling them apart, so they go to separate passes. Real tasks almost always need one pass.
        """
        passes: list[list[int]] = []
        seen: dict[tuple[int, ...], list[int]] = defaultdict(list)  # row -> context lengths, one per pass
        for index, (_, context, continuation) in enumerate(requests):
            signature, context_len, _ = self._row_of(context, continuation)
            lengths = seen[signature]
            slot = lengths.index(context_len) if context_len in lengths else len(lengths)
            if slot == len(lengths):
                lengths.append(context_len)
            while len(passes) <= slot:
                passes.append([])
            passes[slot].append(index)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for indices in passes:
            subset = [requests[i] for i in indices]
            rows: dict[tuple[int, ...], tuple[int, int]] = {}
            for _, context, continuation in subset:
                signature, context_len, length = self._row_of(context, continuation)
                known = rows.get(signature)
                rows[signature] = (context_len, max(length, known[1]) if known else length)
            self._heft_rows = rows
            try:
                scores = super()._loglikelihood_tokens(subset, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._heft_rows = None
            for i, score in zip(indices, scores, strict=True):
                results[i] = score
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows = self._heft_rows
        if rows is None:  # not a scoring call (e.g. lm_eval probing the batch size): the whole input is the prompt
            return super()._model_call(inps, attn_mask, labels)
        context_lens, lengths = [], []
        for tokens in inps.tolist():
            found = rows.get(_row_signature(tokens))
            if found is None:
                raise RuntimeError(
                    "peft_heft.lm_eval got a row it did not prepare: this lm_eval release builds its log-likelihood "
                    "batches differently from the one peft-heft supports. Please report it with your lm_eval version."
                )
            context_lens.append(found[0])
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
            kwargs = {PROMPT_LENGTHS_KWARG: torch.tensor(context_lens, device=inps.device)}
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
