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
