"""ReFT interventions as pyvene ``TrainableIntervention`` modules, and a registry of types by name.

Every intervention maps hidden states ``h`` of shape ``(..., d)`` to new hidden states of the same
shape. The math is pyreft's (``pyreft.interventions``), with its pitfalls removed:

* parameters are created in the dtype they are asked for (pyreft silently uses bf16 for part of the module);
* the orthonormal ``R`` uses a Householder parametrization without trivialization, so no ``d x d`` buffer
  is kept (pyreft's keeps one: 64 MiB per intervention at d=4096), and ``R`` is computed once per forward;
* dropout is a child module, so ``model.eval()`` switches it off.

Any pyvene ``TrainableIntervention`` class that takes pyreft's keyword arguments (``embed_dim``,
``low_rank_dimension``, ``dropout``, ``dtype``, ``act_fn``, ``add_bias``) can be registered with
:func:`register_intervention_type`, pyreft's own classes included.
"""

from __future__ import annotations

from typing import cast

import torch

# Importing any part of pyvene runs its package __init__, which prints a notice that the optional nnsight backend is
# missing: left as is (redirecting sys.stdout would change process-wide state for every thread).
from pyvene import DistributedRepresentationIntervention, SourcelessIntervention, TrainableIntervention
from torch import nn
from torch.nn.utils.parametrizations import orthogonal
from torch.nn.utils.parametrize import ParametrizationList
from transformers.activations import ACT2FN


class LowRankRotateLayer(nn.Module):
    """``x @ R`` with ``R`` of shape ``(d, r)``, initialised with orthonormal columns (as in pyreft)."""

    def __init__(self, embed_dim: int, rank: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(embed_dim, rank, dtype=dtype))
        nn.init.orthogonal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x.to(self.weight.dtype), self.weight)


def orthonormal_rotation(embed_dim: int, rank: int, dtype: torch.dtype | None) -> nn.Module:
    """A rotate layer whose ``weight`` stays orthonormal during training (Householder, no d x d buffer).

    torch stores the parametrization's ``original`` as a transposed view (stride ``(1, d)``); FSDP2's ``fully_shard``
    and DeepSpeed's engine refuse non-contiguous parameters, so it is stored contiguously (same values).
    """
    layer = orthogonal(
        LowRankRotateLayer(embed_dim, rank, dtype), "weight", orthogonal_map="householder", use_trivialization=False
    )
    steps = cast(ParametrizationList, cast(nn.ModuleDict, layer.parametrizations)["weight"])
    steps.original.data = steps.original.data.contiguous()
    steps.insert(0, _HouseholderInFloat32())  # no weights of its own: the saved keys stay pyreft's
    return layer


class _HouseholderInFloat32(nn.Module):
    """First step of the rotation's parametrization: a half-precision original (DeepSpeed casts the whole model to
    bf16/fp16) goes into the Householder product as float32, since torch has no half-precision kernel for it
    (``"orgqr" not implemented for 'BFloat16'``; cuSOLVER's is float/double/complex). A float32 original passes as is.
    """

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.float() if original.dtype in (torch.bfloat16, torch.float16) else original

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value


class _ReftBase(SourcelessIntervention, TrainableIntervention, DistributedRepresentationIntervention):
    """Shared set-up: pyvene bookkeeping, sizes, activation and dropout."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs, keep_last_dim=True)
        embed_dim = int(kwargs["embed_dim"])
        # pyvene registers these as persistent buffers; they are derived from the config, not weights to save.
        self.register_buffer("embed_dim", torch.tensor(embed_dim), persistent=False)
        self.register_buffer("interchange_dim", torch.tensor(embed_dim), persistent=False)
        self.hidden_size = embed_dim
        self.rank = int(kwargs["low_rank_dimension"])
        self.param_dtype = kwargs.get("dtype") or torch.float32
        self.dropout = nn.Dropout(kwargs.get("dropout") or 0.0)
        self.act_fn = ACT2FN[kwargs.get("act_fn") or "linear"]


class _RotatedSourceBase(_ReftBase):
    """LoReFT's and DiReFT's weights: the orthonormal ``rotate_layer`` (d x r) and the ``learned_source`` ``W, b``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rotate_layer = orthonormal_rotation(self.hidden_size, self.rank, self.param_dtype)
        self.learned_source = nn.Linear(self.hidden_size, self.rank, dtype=self.param_dtype)


class LoreftIntervention(_RotatedSourceBase):
    """LoReFT: ``Φ(h) = h + Rᵀ(W h + b − R h)`` with ``R`` (r × d) having orthonormal rows.

    Numerically the same as ``pyreft.LoreftIntervention`` for the same weights. ``rotate_layer.weight`` is
    pyreft's ``Rᵀ`` (d × r); ``learned_source`` is ``W, b``. Built by `HeftModel` from
    `HeftConfig(intervention_type="loreft")`; usable alone as below.

    Keyword Args:
        embed_dim (`int`): hidden size `d` of the intervened representation.
        low_rank_dimension (`int`): rank `r` of the intervention (`r <= d`).
        dropout (`float`, *optional*, defaults to 0.0): dropout on the output; off in `eval()`.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the parameters.
        act_fn (`str`, *optional*): activation on `W h + b` (an `ACT2FN` key); `None` means linear.

    Example:
    ```python
    >>> import torch
    >>> from peft_heft import LoreftIntervention
    >>> intervention = LoreftIntervention(embed_dim=16, low_rank_dimension=2)
    >>> intervention(torch.randn(3, 5, 16)).shape
    torch.Size([3, 5, 16])
    ```
    """

    def forward(self, base: torch.Tensor, source=None, subspaces=None) -> torch.Tensor:
        rotation = cast(torch.Tensor, self.rotate_layer.weight)  # one Householder product per call
        rotation = rotation.to(self.learned_source.weight.dtype)  # computed in float32 from a half-precision original
        x = base.to(rotation.dtype)
        output = x + torch.matmul(self.act_fn(self.learned_source(x)) - torch.matmul(x, rotation), rotation.T)
        return self.dropout(output.to(base.dtype))


class NoreftIntervention(_ReftBase):
    """NoReFT: ``Φ(h) = h + W₂ᵀ(W₁ h + b − W₂ h)``, LoReFT without the orthonormality constraint.

    `HeftConfig(intervention_type="noreft")`; numerically the same as pyreft's `NoreftIntervention`.

    Keyword Args:
        add_bias (`bool`, *optional*, defaults to `False`): bias of the projection `W₂`; the other keywords are
            `LoreftIntervention`'s.

    Example:
    ```python
    >>> from peft_heft import HeftConfig
    >>> config = HeftConfig(target_modules=["q_proj"], intervention_type="noreft", intervention_add_bias=True)
    ```
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        add_bias = bool(kwargs.get("add_bias", False))
        self.proj_layer = nn.Linear(self.hidden_size, self.rank, bias=add_bias, dtype=self.param_dtype)
        self.learned_source = nn.Linear(self.hidden_size, self.rank, dtype=self.param_dtype)

    def forward(self, base: torch.Tensor, source=None, subspaces=None) -> torch.Tensor:
        x = base.to(self.proj_layer.weight.dtype)
        output = x + torch.matmul(self.act_fn(self.learned_source(x)) - self.proj_layer(x), self.proj_layer.weight)
        return self.dropout(output.to(base.dtype))


class DireftIntervention(_RotatedSourceBase):
    """DiReFT: ``Φ(h) = h + Rᵀ(W h + b)``, LoReFT without subtracting the projection of ``h``.

    `HeftConfig(intervention_type="direft")`; numerically the same as pyreft's `DireftIntervention`.

    Takes `LoreftIntervention`'s keyword arguments.

    Example:
    ```python
    >>> from peft_heft import HeftConfig
    >>> config = HeftConfig(target_modules=["q_proj"], intervention_type="direft", intervention_rank=8)
    ```
    """

    def forward(self, base: torch.Tensor, source=None, subspaces=None) -> torch.Tensor:
        rotation = cast(torch.Tensor, self.rotate_layer.weight)
        rotation = rotation.to(self.learned_source.weight.dtype)  # computed in float32 from a half-precision original
        x = base.to(rotation.dtype)
        output = x + torch.matmul(self.act_fn(self.learned_source(x)), rotation.T)
        return self.dropout(output.to(base.dtype))


INTERVENTION_TYPES: dict[str, type[TrainableIntervention]] = {
    "loreft": LoreftIntervention,
    "noreft": NoreftIntervention,
    "direft": DireftIntervention,
}


def register_intervention_type(name: str, cls: type[TrainableIntervention], *, overwrite: bool = False) -> None:
    """Make ``intervention_type=name`` build ``cls``.

    ``cls`` must be a pyvene ``TrainableIntervention`` whose constructor takes pyreft's keyword arguments
    (``embed_dim``, ``low_rank_dimension``, ``dropout``, ``dtype``, ``act_fn``, ``add_bias``) and whose forward
    maps ``(..., d)`` hidden states to new ``(..., d)`` hidden states. Register before creating or loading a
    config that names it.

    Args:
        name (`str`): the value of `HeftConfig.intervention_type` that selects `cls`.
        cls (`type`): a pyvene `TrainableIntervention` subclass.

    Returns:
        `None`.

    Example:
        ```py
        >>> import pyreft
        >>> from peft_heft import register_intervention_type
        >>> register_intervention_type("pyreft_loreft", pyreft.LoreftIntervention)
        ```
    """
    if not isinstance(cls, type) or not issubclass(cls, TrainableIntervention):
        raise TypeError(
            f"{cls!r} is not a pyvene TrainableIntervention subclass; it cannot be used as a HEFT intervention."
        )
    key = name.lower()
    if key in INTERVENTION_TYPES and INTERVENTION_TYPES[key] is not cls and not overwrite:
        raise ValueError(f"Intervention type {name!r} is already registered; pass overwrite=True to replace it.")
    INTERVENTION_TYPES[key] = cls


def has_no_bias_option(cls: type) -> bool:
    """True for the built-in types that have no bias to add (``add_bias`` only shapes NoReFT's projection ``W₂``).

    A type registered by the user receives ``add_bias`` and decides for itself, so it is never refused here.
    """
    return cls in (LoreftIntervention, DireftIntervention)


def get_intervention_class(name: str) -> type[TrainableIntervention]:
    try:
        return INTERVENTION_TYPES[name.lower()]
    except KeyError:
        raise ValueError(
            f"Unknown intervention_type {name!r}. Known types: {sorted(INTERVENTION_TYPES)}. "
            "Register your own with peft_heft.register_intervention_type(name, cls) before building the config."
        ) from None


def build_intervention(
    intervention_type: str,
    *,
    hidden_size: int,
    rank: int,
    dropout: float,
    dtype: torch.dtype,
    device: torch.device | None,
    act_fn: str | None = None,
    add_bias: bool = False,
) -> TrainableIntervention:
    cls = get_intervention_class(intervention_type)
    module = cls(
        embed_dim=hidden_size,
        low_rank_dimension=rank,
        dropout=dropout,
        dtype=dtype,
        act_fn=act_fn,
        add_bias=add_bias,
    )
    if any(p.is_meta for p in module.parameters()):  # built under init_empty_weights (low_cpu_mem_usage)
        return module.to(dtype=dtype)
    return module.to(device=device, dtype=dtype)
