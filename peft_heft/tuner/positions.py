"""Which token positions an intervention reads and writes.

Position specs follow pyreft's syntax: ``"f<n>"`` (first n tokens), ``"l<n>"`` (last n tokens),
``"f<n>+l<n>"`` (both) and ``"all"`` (every real token). Locations are computed per row from the
real (unpadded) tokens, so left and right padding give the same intervened tokens. Like pyreft,
each side is clipped to ``min(n, len // 2)`` for a row of ``len`` real tokens; unlike pyreft, the
missing slots are marked ``-1`` and never touch a padding token.

Locations are a ``LongTensor`` of shape ``(batch, groups, n)`` with ``-1`` for "no position".
``groups`` is 2 for ``f<n>+l<n>`` without shared weights (the first group holds the prefix
positions, the second the suffix positions, each read by its own intervention) and 1 otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

_SPEC_RE = re.compile(r"^(?:f(?P<f>\d+)\+l(?P<fl>\d+)|f(?P<fo>\d+)|l(?P<lo>\d+))$")


@dataclass(frozen=True)
class PositionSpec:
    """A parsed position spec. ``first``/``last`` are token counts; ``all`` means every real token.

    Args:
        first (`int`): how many of the first prompt tokens are intervened on.
        last (`int`): how many of the last prompt tokens are intervened on.
        all (`bool`): every real prompt token.

    Example:
    ```python
    >>> from peft_heft import PositionSpec
    >>> PositionSpec.parse("f7+l7")
    PositionSpec(first=7, last=7, all=False)
    ```
    """

    first: int = 0
    last: int = 0
    all: bool = False

    @classmethod
    def parse(cls, spec: str) -> PositionSpec:
        """Parse pyreft's syntax: ``"f<n>"``, ``"l<n>"``, ``"f<n>+l<n>"`` or ``"all"``; raises ``ValueError`` else."""
        if not isinstance(spec, str):
            raise TypeError(f"intervention_positions must be a string like 'f7+l7', got {type(spec).__name__}.")
        text = spec.strip().lower().replace(" ", "")
        if text == "all":
            return cls(all=True)
        match = _SPEC_RE.match(text)
        if match is None:
            raise ValueError(
                f"Unknown intervention_positions {spec!r}. Use 'f<n>' (first n tokens), 'l<n>' (last n tokens), "
                "'f<n>+l<n>' (both, e.g. 'f7+l7') or 'all'."
            )
        first = int(match["f"] or match["fo"] or 0)
        last = int(match["fl"] or match["lo"] or 0)
        if first == 0 and last == 0:
            raise ValueError(f"intervention_positions {spec!r} selects no token; use at least one of f<n>, l<n> > 0.")
        return cls(first=first, last=last)

    def num_groups(self, share_weights: bool) -> int:
        """How many separately-weighted interventions each layer gets for this spec."""
        return 2 if (self.first and self.last and not share_weights) else 1


def _real_token_positions(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of real tokens, in order, first in each row; and the count of real tokens per row."""
    mask = attention_mask.bool()
    seq_len = mask.shape[1]
    ar = torch.arange(seq_len, device=mask.device)
    # real tokens sort before padding, each keeping its order
    order = torch.argsort(ar + (~mask).long() * seq_len, dim=1)
    return order, mask.sum(dim=1, keepdim=True)


def compute_locations(
    spec: PositionSpec,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    seq_len: int,
    share_weights: bool,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Intervention locations for each row, from the real tokens of ``attention_mask``.

    Args:
        spec: the parsed position spec.
        attention_mask: ``(batch, seq_len)`` mask of real tokens; ``None`` means all tokens are real.
        batch_size: the input's batch size.
        seq_len: the input's sequence length.
        share_weights: whether prefix and suffix positions share one intervention (one group).

    Returns:
        ``LongTensor`` of shape ``(batch, groups, n)``; ``-1`` marks an unused slot.

    Example:
    ```python
    >>> mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])  # left padded, 5 real tokens
    >>> compute_locations(PositionSpec.parse("f2+l2"), mask, 1, 7, share_weights=False).tolist()
    [[[2, 3], [5, 6]]]
    ```
    """
    if attention_mask is None:
        attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    order, n_real = _real_token_positions(attention_mask)
    if spec.all:
        cols = torch.arange(seq_len, device=order.device).unsqueeze(0)
        return torch.where(cols < n_real, order, -1).unsqueeze(1)

    half = n_real // 2
    first_n = torch.clamp(half, max=spec.first)  # (B, 1)
    last_n = torch.clamp(half, max=spec.last)

    def side(count: int, taken: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        j = torch.arange(count, device=order.device).unsqueeze(0)
        cols = (start + j).clamp(0, seq_len - 1)
        return torch.where(j < taken, order.gather(1, cols), -1)

    # a side never holds more than half the row: slots past that would only be -1 (and "f100000000" would allocate GBs)
    first_slots, last_slots = min(spec.first, seq_len // 2), min(spec.last, seq_len // 2)
    firsts = side(first_slots, first_n, torch.zeros_like(n_real)) if spec.first else None
    lasts = side(last_slots, last_n, n_real - last_n) if spec.last else None
    if firsts is None:
        assert lasts is not None  # parse() refuses a spec with neither side
        return lasts.unsqueeze(1)
    if lasts is None:
        return firsts.unsqueeze(1)
    if share_weights:
        return torch.cat([firsts, lasts], dim=1).unsqueeze(1)
    width = max(first_slots, last_slots)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)  # noqa: E731
    return torch.stack([pad(firsts), pad(lasts)], dim=1)


def normalize_locations(locations, batch_size: int, num_groups: int, device: torch.device) -> torch.Tensor:
    """Check and reshape user-given locations to ``(batch, groups, n)``.

    Accepts a tensor or nested lists of shape ``(batch, groups, n)``, or ``(batch, n)`` when the
    adapter has a single group. ``-1`` marks an unused slot.
    """
    locs = torch.as_tensor(locations, device=device)
    if locs.is_floating_point() or locs.dtype == torch.bool:
        raise TypeError(f"intervention_locations must hold integer token positions, got dtype {locs.dtype}.")
    locs = locs.long()
    if locs.dim() == 2 and num_groups == 1:
        locs = locs.unsqueeze(1)
    if locs.dim() != 3 or locs.shape[0] != batch_size or locs.shape[1] != num_groups:
        raise ValueError(
            f"intervention_locations has shape {tuple(locs.shape)}, expected (batch={batch_size}, "
            f"groups={num_groups}, n)" + (" or (batch, n)" if num_groups == 1 else "") + ". "
            "Groups are 2 for 'f<n>+l<n>' positions without shared weights (prefix group first), else 1."
        )
    if (locs < -1).any():
        raise ValueError("intervention_locations may only contain token positions >= 0, or -1 for an unused slot.")
    return locs


def locations_by_spec(
    routes: Mapping[int, list[tuple[tuple, Any]]],
    batch: int,
    total_len: int,
    mask: torch.Tensor | None,
    explicit: Any,
    device: torch.device,
) -> dict[tuple, torch.Tensor]:
    """Absolute locations ``(B, G, n)`` per ``(spec, share_weights)`` key the routes use, from the mask or the explicit
    locations."""
    if mask is not None and tuple(mask.shape) != (batch, total_len):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}, but the input has {batch} row(s) of {total_len} "
            f"token(s); pass a mask of shape {(batch, total_len)}."
        )
    result = {}
    for entries in routes.values():
        for key, _ in entries:
            if key in result:
                continue
            spec, share = key
            if explicit is not None:
                locs = normalize_locations(explicit, batch, spec.num_groups(share), device)
                check_explicit_locations(locs, total_len)
                result[key] = locs
            else:
                result[key] = compute_locations(spec, mask, batch, total_len, share, device)
    return result


def check_explicit_locations(locs: torch.Tensor, total_len: int) -> None:
    """Explicit locations must name real positions of the sequence, each at most once per row."""
    highest = int(locs.max())
    if highest >= total_len:
        raise ValueError(
            f"intervention_locations contains position {highest}, but the sequence has {total_len} tokens "
            f"(valid: 0..{total_len - 1}, or -1 for an unused slot)."
        )
    flat = locs.reshape(locs.shape[0], -1)
    ordered = flat.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if bool(repeated.any()):
        row = int(repeated.any(dim=1).nonzero()[0, 0])
        position = int(ordered[row, 1:][repeated[row]][0])
        raise ValueError(
            f"intervention_locations names position {position} more than once in row {row}; each position may be "
            "intervened on once (its changes would add up). List each position once, -1 for unused slots."
        )
