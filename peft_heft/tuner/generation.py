"""What ``generate()`` needs beyond a forward: prompt locations pinned for the whole call, and the KV cache's length.

``HeftModel.generate`` computes the prompt's intervention locations once (:func:`generate`) and pins them in a
:class:`GenerationState` held in this call's context (``contextvars``: concurrent calls in other threads do not see
it). Each forward of the call places them with the cache's length (:func:`cache_length`), and once the prompt is done
the decoding steps skip all HEFT work.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import nn
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from ..prompt_tokens import PROMPT_LENGTHS_KWARG, PromptHint
from .positions import locations_by_spec


@dataclass
class GenerationState:
    """Prompt locations pinned by one ``generate()`` call, per position spec, and the last intervened position.

    ``prompt_done`` becomes true once a forward of this call that wrote a KV cache has computed the last intervened
    position: the later forwards of the call (decoding steps) are past the prompt and skip all HEFT work without
    reading the cache (whose length can be a device tensor: reading it would be a host sync per step).
    """

    pinned: dict[tuple, torch.Tensor]
    last_position: int
    prompt_done: bool = False


# Keyed by the owner's id (two HEFT models can generate inside one another's call); read-only, copied on write.
_GENERATION: ContextVar[Mapping[int, GenerationState]] = ContextVar("heft_generation", default=MappingProxyType({}))


def generation_state(owner: int) -> GenerationState | None:
    """The state of the ``generate()`` call of ``owner`` this context is in, if any."""
    return _GENERATION.get().get(owner)


def _start_generation(owner: int, state: GenerationState) -> Token:
    return _GENERATION.set({**_GENERATION.get(), owner: state})


def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The ``transformers.Cache`` among a forward's inputs, whatever keyword carries it (``past_key_values``, ``cache``
    in transformers >= 5.24, ...); ``None`` without one."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


def cache_length(cache: Cache | None) -> int | None:
    """Tokens already in ``cache`` (0 without one), asked the public way (``get_seq_length(layer_idx)``) at its first
    attention layer; ``None`` when the cache cannot say.

    ``get_seq_length()`` asks layer 0. On hybrid models (Qwen3-Next: linear-attention layers, then full attention)
    layer 0 is a linear-attention layer: transformers 5.24 redirected the question to the first attention layer,
    5.25 answers with the linear layer's own count, a 0-dim tensor. An attention layer (``CacheLayerMixin``) of a
    dynamic cache answers with its keys' shape, a Python int (no host sync); a static layer's answer is a tensor,
    converted here (a host sync), as is the count of a cache with no attention layer at all (Mamba), which only
    transformers >= 5.25 keeps (``None`` before). This runs once per planned forward: ``generate()``'s decoding steps
    do not get here (``GenerationState.prompt_done``), so they never read the cache.
    """
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return int(cache.get_seq_length())  # not a list of layers (EncoderDecoderCache...): the cache's own answer
    index = next((i for i, layer in enumerate(layers) if isinstance(layer, CacheLayerMixin)), None)
    if index is not None:
        return int(cache.get_seq_length(index))
    try:
        if not layers or not cache.has_previous_state():
            return 0  # no layers yet, or linear-attention / state-space layers that hold no state yet
        return int(cache.get_seq_length(0))  # such layers only: their own count (transformers >= 5.25)
    except (ValueError, AttributeError):
        return None  # they keep no count (transformers 5.24), or the layers are of a kind not known here


def pinned_locations(pinned: dict[tuple, torch.Tensor], batch: int) -> dict[tuple, torch.Tensor]:
    """The pinned prompt locations for a forward of ``batch`` rows (beam search and ``num_return_sequences`` repeat
    each prompt's rows)."""
    out = {}
    for key, locs in pinned.items():
        if locs.shape[0] != batch:
            if batch % locs.shape[0]:
                raise ValueError(
                    f"generate() ran a batch of {batch} rows for {locs.shape[0]} prompts; cannot map the "
                    "intervention locations onto it."
                )
            locs = locs.repeat_interleave(batch // locs.shape[0], dim=0)  # beam search / num_return_sequences
            pinned[key] = locs  # this call's own state: later steps reuse the expanded tensor
        out[key] = locs
    return out


def infer_attention_mask(model: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The mask transformers' ``generate()`` infers without one: pad tokens are padding unless pad == eos."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    ones = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
    if pad is None or input_ids.dim() != 2 or input_ids.is_floating_point():
        return ones
    pad_ids = torch.as_tensor(pad, device=input_ids.device).reshape(-1)
    eos_ids = torch.as_tensor(eos if eos is not None else [], device=input_ids.device).reshape(-1)
    if bool(torch.isin(eos_ids, pad_ids).any()) or not bool(torch.isin(input_ids, pad_ids).any()):
        return ones
    return (~torch.isin(input_ids, pad_ids)).long()


def generate(owner: int, routes: Mapping[int, list], model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``model.generate(...)`` with the prompt's intervention locations for ``routes`` pinned for the whole call, for
    the hooks of ``owner`` (``id()`` of a tuner's ``LayerHooks``)."""
    explicit = kwargs.pop("intervention_locations", None)
    lengths = kwargs.pop(PROMPT_LENGTHS_KWARG, None)
    if explicit is not None and lengths is not None:
        raise ValueError(f"Pass either intervention_locations or {PROMPT_LENGTHS_KWARG} to generate(), not both.")
    if not routes:
        return cast(Any, model).generate(*args, **kwargs)  # nn.Module typing has no generate
    if args and "input_ids" not in kwargs and isinstance(args[0], torch.Tensor):
        kwargs["input_ids"], args = args[0], args[1:]
    input_ids = kwargs.get("input_ids")
    shaped = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if shaped is None:
        raise ValueError("HEFT generate() needs input_ids or inputs_embeds to place the prompt interventions.")
    if shaped.shape[0] == 0 or shaped.shape[1] == 0:
        raise ValueError(
            f"HEFT generate() got a prompt of shape {tuple(shaped.shape)}: pass at least one row with at least "
            "one token."
        )
    mask = kwargs.get("attention_mask")
    if mask is None and input_ids is not None and explicit is None:
        mask = infer_attention_mask(model, input_ids, kwargs)
        kwargs["attention_mask"] = mask
    batch, prompt_len = int(shaped.shape[0]), int(shaped.shape[1])
    if lengths is not None:  # only the first n real tokens of each row are intervened on
        mask = PromptHint(prompt_lengths=torch.as_tensor(lengths)).prompt_mask(mask, batch, prompt_len, 0)
    pinned = locations_by_spec(routes, batch, prompt_len, mask, explicit, shaped.device)
    last = max(int(locs.max()) for locs in pinned.values())
    token = _start_generation(owner, GenerationState(pinned=pinned, last_position=last))
    try:
        return cast(Any, model).generate(*args, **kwargs)  # nn.Module typing has no generate
    finally:
        _GENERATION.reset(token)
