"""The hot path: gather hidden states at the intervened positions, intervene, scatter the change back.

:class:`HeftModel` registers one forward pre-hook on the wrapped transformers model, which turns the
call's ``attention_mask`` (or the given ``intervention_locations``) into a :class:`ForwardPlan` once per
forward, and one forward hook per intervened decoder layer, which applies the plan. Everything that
can be computed once per forward is computed in the plan, so the per-layer hook is a gather, the
intervention itself, and one ``scatter_add``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Located:
    """Positions of one position spec in the current forward, relative to the tokens it computes."""

    index: torch.Tensor  # (B, K, d) gather/scatter index (an expanded view), K = groups * n
    keep: torch.Tensor  # (B, K, 1) bool: slot holds a real position inside this forward's tokens
    split: list[int]  # slot count of each group


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
    padding and clipped slots are never written.
    """
    base = hidden.gather(1, located.index)
    if len(interventions) == 1:
        new = interventions[0](base)
    else:
        new = torch.cat(
            [m(part) for m, part in zip(interventions, base.split(located.split, dim=1), strict=True)], dim=1
        )
    delta = (new - base) * located.keep
    return hidden.scatter_add(1, located.index, delta)
