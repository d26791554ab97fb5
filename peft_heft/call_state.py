"""Per-call state of a HEFT forward or ``generate()``, scoped to the call (``contextvars``), never to the tuner.

One forward of a HEFT model needs three things the layers' hooks cannot see in their own arguments: the explicit
``intervention_locations`` given to the model's ``forward`` (popped before transformers sees them), the prompt
locations pinned by ``generate()`` for all its steps, and the plan computed once per forward from those. Keeping them
on the tuner made two threads generating at once clear each other's pinned locations, and a backbone call that
skipped the causal-LM hook reused the previous call's plan.

Each value is a mapping keyed by the tuner's ``id`` (two HEFT models can run inside one another's call) held in a
:class:`contextvars.ContextVar`: every thread has its own context, and ``generate()`` resets what it set when it
returns (as does a call with PEFT's ``adapter_names=`` its per-row routes). The plan is deliberately left in place
after a forward: gradient checkpointing re-runs the decoder layers during ``backward()`` (in the same thread on CPU),
and they must see the plan of the forward they recompute.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

UNSET: Any = object()  # "this call set nothing", as opposed to "this call has no plan" (None)


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


_NOTHING: Mapping[int, Any] = MappingProxyType({})  # read-only: every update makes a new dict (copy on write)
_GENERATION: ContextVar[Mapping[int, GenerationState]] = ContextVar("heft_generation", default=_NOTHING)
_EXPLICIT: ContextVar[Mapping[int, Any]] = ContextVar("heft_explicit_locations", default=_NOTHING)
_PLANS: ContextVar[Mapping[int, Any]] = ContextVar("heft_plans", default=_NOTHING)


def _with(var: ContextVar[Mapping[int, Any]], owner: int, value: Any) -> Token:
    updated = dict(var.get())
    if value is UNSET:
        updated.pop(owner, None)
    else:
        updated[owner] = value
    return var.set(updated)


def start_generation(owner: int, state: GenerationState) -> Token:
    return _with(_GENERATION, owner, state)


def end_generation(token: Token) -> None:
    _GENERATION.reset(token)


def generation_state(owner: int) -> GenerationState | None:
    return _GENERATION.get().get(owner)


def set_explicit_locations(owner: int, locations: Any) -> None:
    """Locations given to this forward call (``UNSET`` clears them once the call returns)."""
    if locations is UNSET and owner not in _EXPLICIT.get():
        return
    _with(_EXPLICIT, owner, locations)


def explicit_locations(owner: int) -> Any:
    return _EXPLICIT.get().get(owner)


def set_plan(owner: int, plan: Any) -> None:
    current = _PLANS.get()
    if current.get(owner, UNSET) is plan:
        return
    _with(_PLANS, owner, plan)


def current_plan(owner: int) -> Any:
    """The plan of this context's latest forward of ``owner``, ``None`` for "no intervention", or ``UNSET``."""
    return _PLANS.get().get(owner, UNSET)


_ROW_ROUTES: ContextVar[Mapping[int, Any]] = ContextVar("heft_row_routes", default=_NOTHING)


def start_row_routes(owner: int, routes: Any) -> Token:
    """Per-row intervention routes of one call with PEFT's ``adapter_names=`` (mixed batch), until it returns."""
    return _with(_ROW_ROUTES, owner, routes)


def end_row_routes(token: Token) -> None:
    _ROW_ROUTES.reset(token)


def row_routes(owner: int) -> Any:
    """This call's per-row routes of ``owner``, or ``None`` (the tuner's own routes apply)."""
    return _ROW_ROUTES.get().get(owner)
