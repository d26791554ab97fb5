"""HEFT's hooks on the decoder layers: which interventions run where in this call, and the hot path that runs them.

:class:`LayerHooks` (one per tuner) installs:

* a forward pre-hook on the wrapped transformers model, which takes ``intervention_locations`` (or the prompt hint)
  out of the call before transformers sees it;
* a forward pre-hook on the backbone, which turns the call's ``attention_mask`` (or the given locations, or the
  locations pinned by ``generate()``) into a :class:`ForwardPlan` once per forward;
* one forward hook per intervened decoder layer, which applies the plan: a gather, the interventions, one
  ``scatter_add`` (:func:`intervene`). Everything that can be computed once per forward is in the plan.

Routes say which interventions run on which layer with which position spec: the tuner's (rebuilt on state changes),
or, in a call with PEFT's ``adapter_names=`` (mixed batch), that call's, each adapter's interventions restricted to
its rows (:class:`RowSubset`).

The call's inputs, plan and per-row routes are scoped to the call (``contextvars``), never to the tuner: keeping them
on the tuner made two threads generating at once clear each other's state, and a backbone call that skipped the
causal-LM hook reused the previous call's plan. Each value is a mapping keyed by the owner's ``id`` (two HEFT models
can run inside one another's call); every thread has its own context. The plan is left in place after a forward, so
a decoder layer called on its own afterwards is checked against it (and refused) rather than silently skipped.
Gradient checkpointing never re-runs these hooks: transformers (>= 5.25) checkpoints a layer's ``forward``, not its
``__call__`` (tests/test_gradient_checkpointing.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..prompt_tokens import PROMPT_LENGTHS_KWARG, PromptHint, refuse_lm_eval_call, warn_once
from .generation import cache_length, find_cache, generation_state, pinned_locations
from .placement import find_backbone, find_decoder_layers, intervention_key, resolve_layers
from .positions import locations_by_spec
from .stages import AdapterStages

if TYPE_CHECKING:
    from .config import HeftConfig

# Per layer: (position spec key, interventions per position group) for each adapter whose interventions run there.
Routes = dict[int, list[tuple[tuple, list[nn.Module]]]]

UNSET: Any = object()  # "this call set nothing", as opposed to "this call has no plan" (None)
_NOTHING: Mapping[int, Any] = MappingProxyType({})  # read-only: every update makes a new dict (copy on write)
_EXPLICIT: ContextVar[Mapping[int, Any]] = ContextVar("heft_explicit_locations", default=_NOTHING)
_PLANS: ContextVar[Mapping[int, Any]] = ContextVar("heft_plans", default=_NOTHING)
_ROW_ROUTES: ContextVar[Mapping[int, Any]] = ContextVar("heft_row_routes", default=_NOTHING)


def _set(var: ContextVar[Mapping[int, Any]], owner: int, value: Any) -> Any:
    updated = dict(var.get())
    if value is UNSET:
        updated.pop(owner, None)
    else:
        updated[owner] = value
    return var.set(updated)


# ---------------------------------------------------------------------------------------------------- the hot path
@dataclass
class Located:
    """Positions of one position spec in the current forward, relative to the tokens it computes."""

    index: torch.Tensor  # (B, K, d) gather/scatter index (an expanded view), K = groups * n
    keep: torch.Tensor  # (B, K, 1) bool: slot holds a real position inside this forward's tokens
    split: list[int]  # slot count of each group
    # copies on other devices (a device map splitting the layers over devices), made on first use in this forward
    moved: dict[torch.device, Located] = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> Located:
        """These positions with their tensors on ``device`` (``self`` when they are there already)."""
        if self.index.device == device:
            return self
        copy = self.moved.get(device)
        if copy is None:
            copy = Located(index=self.index.to(device), keep=self.keep.to(device), split=self.split)
            self.moved[device] = copy
        return copy


@dataclass
class ForwardPlan:
    """What the layer hooks do in one forward: per layer, a list of (positions, interventions per group)."""

    batch: int = 0
    seq_len: int = 0  # the shape the plan was made for: a layer seeing another shape is not part of this forward
    routes: dict[int, list[tuple[Located, list[nn.Module]]]] = field(default_factory=dict)


def locate(locations: torch.Tensor, offset: int, seq_len: int, hidden_size: int) -> Located | None:
    """Map absolute token positions ``(B, G, n)`` to slots of a forward computing ``[offset, offset + seq_len)``.

    Returns ``None`` when no location falls inside this forward (e.g. decoding steps after the prompt).
    """
    batch, groups, width = locations.shape
    local = locations.reshape(batch, groups * width) - offset
    keep = (locations.reshape(batch, groups * width) >= 0) & (local >= 0) & (local < seq_len)
    if offset > 0 and not bool(keep.any()):
        return None
    index = local.clamp(0, seq_len - 1).unsqueeze(-1).expand(batch, groups * width, hidden_size)
    return Located(index=index, keep=keep.unsqueeze(-1), split=[width] * groups)


def intervene(hidden: torch.Tensor, located: Located, interventions: list[nn.Module]) -> torch.Tensor:
    """Apply interventions (one per position group) to ``hidden`` ``(B, T, d)`` at the located positions.

    Out of place: the change is added with ``scatter_add``; slots without a position add zero, so
    padding and clipped slots are never written. Positions built on another device (the first layer's, under a
    device map) are copied to ``hidden``'s device once per forward. Interventions in another dtype than ``hidden``
    (float32 ones on a bf16/fp16 or quantized base, as PEFT keeps LoRA) get the gathered states in their dtype, and
    their change is cast back to ``hidden``'s dtype, as PEFT's LoRA layers cast their output.
    """
    located = located.on(hidden.device)
    base = hidden.gather(1, located.index)
    if len(interventions) == 1:
        delta = _change(interventions[0], base)
    else:
        parts = base.split(located.split, dim=1)
        delta = torch.cat([_change(m, part) for m, part in zip(interventions, parts, strict=True)], dim=1)
    return hidden.scatter_add(1, located.index, delta * located.keep)


def _change(intervention: nn.Module, base: torch.Tensor) -> torch.Tensor:
    """``intervention(base) - base``, computed in the intervention's dtype and returned in ``base``'s."""
    weight = next(intervention.parameters(), None)
    if weight is None or weight.dtype == base.dtype or not weight.is_floating_point():
        return intervention(base) - base
    inner = base.to(weight.dtype)
    return (intervention(inner) - inner).to(base.dtype)


# --------------------------------------------------------------------------------------------------------- routing
class RowSubset(nn.Module):
    """One adapter's intervention restricted to its rows of a mixed batch (``adapter_names=``): other rows unchanged."""

    def __init__(self, intervention: nn.Module, adapter: str, rows: list[bool]) -> None:
        super().__init__()
        self.intervention = intervention
        self.adapter = adapter
        self.rows = rows

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        if base.shape[0] != len(self.rows):
            raise ValueError(
                f"adapter_names has {len(self.rows)} name(s), but the batch has {base.shape[0]} row(s); pass one "
                "adapter name per row (generate() with num_return_sequences > 1 repeats rows: repeat the names too)."
            )
        selected = torch.tensor(self.rows, device=base.device).view(-1, *([1] * (base.dim() - 1)))
        return torch.where(selected, self.intervention(base), base)


def adapter_routes(
    stages: AdapterStages,
    configs: Mapping[str, Any],
    interventions: nn.ModuleDict,
    num_layers: int,
    adapters: Iterable[str],
    rows: dict[str, list[bool]] | None = None,
) -> Routes:
    """Routes of ``adapters`` (each adapter's interventions only if its stage applies them); with ``rows``, each
    adapter's interventions are restricted to its rows of the batch."""
    routes: Routes = {}
    if not stages.interventions_enabled:
        return routes
    for adapter in adapters:
        if adapter not in interventions or not stages.of(adapter, configs.get(adapter)).apply_interventions:
            continue
        config = cast("HeftConfig", configs[adapter])
        groups = config.num_position_groups
        key = (config.position_spec, config.share_intervention_weights)
        for layer in resolve_layers(config.intervention_layers, num_layers):
            mods: list[nn.Module] = [
                cast(nn.ModuleDict, interventions[adapter])[intervention_key(layer, g, groups)] for g in range(groups)
            ]
            if rows is not None:
                mods = [RowSubset(m, adapter, rows[adapter]) for m in mods]
            routes.setdefault(layer, []).append((key, mods))
    return routes


def refuse_unlocated_packed_row(kwargs: Mapping[str, Any]) -> None:
    """A padding-free / packed row (``position_ids`` restarting, no mask) holds several sequences: without explicit
    locations HEFT would take the whole row for one prompt. Checked only on calls with no mask and no locations."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if isinstance(cu_seq_lens, torch.Tensor):
        packed = cu_seq_lens.numel() > 2
    elif isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[1] > 1:
        packed = bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any())
    else:
        return
    if packed:
        raise ValueError(
            "This HEFT forward gets a packed row (position_ids restart inside it, no attention_mask): several "
            "sequences, each with its own prompt, but no intervention_locations, so HEFT would treat the row as one "
            "prompt. Pass intervention_locations for the flattened row (peft_heft.DataCollatorForHeft computes them "
            "for TRL's padding-free and packed batches; StagedSFTTrainer uses it), or pass unpacked rows with an "
            "attention_mask."
        )


def refuse_data_parallel_replica(module: nn.Module) -> None:
    """``torch.nn.DataParallel`` runs replicas of the model (``module._is_replica``, set by ``nn.Module``'s replication
    for DataParallel): their hooks would run the original's interventions, on the first device, for every replica."""
    if getattr(module, "_is_replica", False):
        raise RuntimeError(
            "HEFT models cannot run under torch.nn.DataParallel: its replicas share the original model's forward "
            "hooks, so every replica would apply the interventions of the original (on the first GPU), not its own "
            "copy. Use DistributedDataParallel instead: launch the script with `accelerate launch` or `torchrun "
            "--nproc_per_node <gpus>` (the Trainer and StagedSFTTrainer then use DDP), or run on one GPU "
            "(CUDA_VISIBLE_DEVICES=0)."
        )


# ----------------------------------------------------------------------------------------------------------- hooks
class LayerHooks:
    """One tuner's hooks: installed on the model, routed by the tuner, planned once per forward."""

    def __init__(self) -> None:
        self.hidden_size = 0
        self._layer_handles: dict[int, Any] = {}
        self._call_handles: list[Any] = []  # the causal-LM wrapper's and the backbone's hooks, set together
        self._shared_routes: Routes = {}

    @property
    def routes(self) -> Routes:
        """The routes of this call: per-row routes of a call with ``adapter_names=``, else the tuner's."""
        per_call = _ROW_ROUTES.get().get(id(self))
        return self._shared_routes if per_call is None else per_call

    @routes.setter
    def routes(self, routes: Routes) -> None:
        self._shared_routes = routes

    @contextmanager
    def row_routes(self, routes: Routes) -> Iterator[None]:
        """Use ``routes`` for this call only (``contextvars``): other calls and threads keep the tuner's."""
        token = _set(_ROW_ROUTES, id(self), routes)
        try:
            yield
        finally:
            _ROW_ROUTES.reset(token)

    # -------------------------------------------------------------- installation
    def install(self, model: nn.Module, wanted: set[int], hidden_size: int) -> None:
        """Hook exactly the decoder layers in ``wanted``, and the call hooks while there is any."""
        self.hidden_size = hidden_size
        _, decoder_layers = find_decoder_layers(model)
        for layer in sorted(wanted - set(self._layer_handles)):
            # functools.partial of a bound method: survives copy.deepcopy pointing at the copy, unlike a closure
            self._layer_handles[layer] = decoder_layers[layer].register_forward_hook(
                functools.partial(self.layer_output_hook, layer)
            )
        for layer in set(self._layer_handles) - wanted:
            self._layer_handles.pop(layer).remove()
        if wanted and not self._call_handles:
            # The wrapper takes `intervention_locations` out of the call (transformers does not know them); the plan
            # is made where the decoder layers' inputs are known, on the backbone that holds them, so that a call of
            # the backbone alone (a task head, a user) is planned too.
            self._call_handles = [
                model.register_forward_pre_hook(self.take_explicit_locations_hook, with_kwargs=True),
                model.register_forward_hook(self.clear_explicit_locations_hook, always_call=True),
                find_backbone(model).register_forward_pre_hook(self.plan_forward_hook, with_kwargs=True),
            ]
        elif not wanted and self._call_handles:
            self._remove_call_handles()

    def _remove_call_handles(self) -> None:
        for handle in self._call_handles:
            handle.remove()
        self._call_handles = []

    def remove(self) -> None:
        for handle in self._layer_handles.values():
            handle.remove()
        self._layer_handles.clear()
        self._remove_call_handles()
        self._set_plan(UNSET)

    # -------------------------------------------------------------- this call's plan
    def _set_plan(self, plan: Any) -> None:
        owner = id(self)
        if _PLANS.get().get(owner, UNSET) is not plan:
            _set(_PLANS, owner, plan)

    def take_explicit_locations_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook on the wrapped model: take ``intervention_locations`` out of this call's inputs."""
        explicit = kwargs.pop("intervention_locations", None)
        lengths = kwargs.pop(PROMPT_LENGTHS_KWARG, None)
        if explicit is not None and lengths is not None:
            raise ValueError(
                f"Pass either intervention_locations or {PROMPT_LENGTHS_KWARG} to a HEFT model call, not both: the "
                "locations already say where the interventions go."
            )
        if explicit is None:
            labels = kwargs.get("labels")
            if lengths is not None:
                explicit = PromptHint(prompt_lengths=torch.as_tensor(lengths))
            elif isinstance(labels, torch.Tensor) and labels.dim() == 2:
                explicit = PromptHint(labels=labels)
        self._set_explicit(explicit if explicit is not None else UNSET)
        return args, kwargs

    def clear_explicit_locations_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._set_explicit(UNSET)

    def _set_explicit(self, locations: Any) -> None:
        """Locations given to this forward call (``UNSET`` clears them once the call returns)."""
        if locations is UNSET and id(self) not in _EXPLICIT.get():
            return
        _set(_EXPLICIT, id(self), locations)

    def plan_forward_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook on the backbone: compute where the decoder layers intervene in this call."""
        owner = id(self)
        routes = self.routes
        if not routes:
            self._set_plan(None)
            return args, kwargs
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shaped = input_ids if input_ids is not None else embeds
        if shaped is None:
            self._set_plan(None)
            return args, kwargs
        batch, seq_len = int(shaped.shape[0]), int(shaped.shape[1])
        if batch == 0 or seq_len == 0:
            raise ValueError(
                f"The HEFT model got an input of shape {tuple(shaped.shape)}: {'no rows' if batch == 0 else 'no tokens'}"
                ". Pass at least one row with at least one token (check the tokenizer output or the data collator)."
            )
        generation = generation_state(owner)
        if generation is not None and generation.prompt_done:
            self._set_plan(None)  # a decoding step past the prompt: nothing to intervene on, no work
            return args, kwargs
        mask = kwargs.get("attention_mask")
        cache = find_cache(args, kwargs)
        offset = cache_length(cache)
        if offset is None:
            raise ValueError(
                f"HEFT cannot tell how many tokens the {type(cache).__name__} passed to this forward already holds: it "
                "has no attention layer, and its linear-attention or state-space layers keep no token count in "
                "this transformers release (transformers >= 5.25 counts them), so the interventions cannot be "
                "placed in a forward that continues from it. generate() works (its prompt is computed from an empty "
                "cache); outside generate(), pass the whole sequence in one forward, or upgrade transformers."
            )
        if generation is not None and cache is not None and offset + seq_len > generation.last_position:
            generation.prompt_done = True  # this cached forward computes the last intervened position
        if generation is not None and offset > generation.last_position:
            self._set_plan(None)  # a decoding step past the prompt: nothing to intervene on, no work
            return args, kwargs
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            if tuple(mask.shape) != (batch, offset + seq_len):
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)}, but the input has {batch} row(s) of {seq_len} "
                    f"token(s) after {offset} cached one(s), so it must have shape {(batch, offset + seq_len)} "
                    "(one column per cached and new token). Pass the mask of the whole sequence."
                )
        elif mask is not None:
            mask = None  # a 4D or block mask: padding is not readable from it (generate() pins the prompt's)
        if generation is not None:
            absolute = pinned_locations(generation.pinned, batch)
        else:
            explicit = _EXPLICIT.get().get(owner)
            if mask is None and (explicit is None or isinstance(explicit, PromptHint)):
                refuse_unlocated_packed_row(kwargs)
            if isinstance(explicit, PromptHint):
                mask = explicit.prompt_mask(mask, batch, offset + seq_len, offset)  # the prompt's tokens only
                explicit = None
            elif explicit is None:
                refuse_lm_eval_call()  # lm_eval's `hf` model: context + continuation, no prompt boundary
            if explicit is None and mask is None and batch > 1:
                warn_once(
                    "batch-without-mask",
                    f"A HEFT model got {batch} rows without an attention_mask: every token counts as real, so "
                    "intervention positions counted from the end of a padded row land on padding. Pass the "
                    "attention_mask (or intervention_locations) with batched calls.",
                )
            absolute = locations_by_spec(routes, batch, offset + seq_len, mask, explicit, shaped.device)
        located = {key: locate(locs, offset, seq_len, self.hidden_size) for key, locs in absolute.items()}
        plan = ForwardPlan(batch=batch, seq_len=seq_len)
        for layer, entries in routes.items():
            kept = [(loc, mods) for key, mods in entries if (loc := located[key]) is not None]
            if kept:
                plan.routes[layer] = kept
        self._set_plan(plan if plan.routes else None)
        return args, kwargs

    # -------------------------------------------------------------- the decoder layers' hook
    def layer_output_hook(self, layer: int, module: nn.Module, args: tuple, output: Any) -> Any:
        plan = _PLANS.get().get(id(self))  # UNSET is never stored: missing and None both mean "no intervention"
        if plan is None:
            return None
        entries = plan.routes.get(layer)
        if entries is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[0] != plan.batch or hidden.shape[1] != plan.seq_len:
            raise RuntimeError(
                f"HEFT decoder layer {layer} got hidden states of shape {tuple(hidden.shape)}, but this model's last "
                f"forward planned interventions for {plan.batch} row(s) of {plan.seq_len} token(s). Decoder layers "
                "called on their own are not intervened correctly: call the model (or its backbone) instead."
            )
        for located, mods in entries:
            hidden = intervene(hidden, located, mods)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
