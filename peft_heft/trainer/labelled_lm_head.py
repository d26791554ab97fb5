"""Score only the labelled positions in TRL's fused LM head on CPU, as TRL already does on Triton devices.

TRL's `SFTTrainer` and `DPOTrainer` patch the model with `trl.trainer.utils.add_fused_lm_head`: a training forward
called with `fused_lm_head=True` projects the backbone's hidden states through the LM head in vocabulary tiles and
returns each label's log-probability. On CUDA/XPU (Triton) it projects only the positions whose label is not -100;
everywhere else it projects *every* position and masks the result afterwards, because on compiled backends such as
Neuron a varying number of labelled positions would change the tile shapes and recompile on every batch. CPU eager
mode has no such cost, and for SFT on prompt-completion data most positions are prompt (label -100): on the embedded
SmolLM2 the full projection is a large share of a CPU training step (`benchmarks/bench_core.py` measures it).

TRL 1.16 decides this with one call, `compact = _use_triton(hidden_states.device)`, whose name it imports into
`trl.trainer.utils`; the kernel itself decides Triton or PyTorch tiles through its own module's binding, which this
module does not touch. While a HEFT trainer's model runs a fused forward on CPU, that one binding answers "compact"
for CPU devices; before and after the call it is TRL's own function again, so other trainers in the process are
unaffected. Both paths compute each labelled position's log-probability with the same tiles; the losses agree to
float rounding (tested to 1e-6, gradients included).

This leans on a private name, so it is guarded: the switch is used only if `trl.trainer.utils._use_triton` exists
and `add_fused_lm_head` still decides `compact` with it. Otherwise a warning says so once and TRL's own behaviour
runs unchanged (every position scored: slower, same loss). `make test-latest` runs a test that fails when the
guard stops matching, so a TRL release that changes this is noticed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

_DECISION = "compact = _use_triton(hidden_states.device)"
_BINDING = "_use_triton"  # the name TRL decides "labelled positions only" with
_MARK = "_peft_heft_labelled_positions_only"
_lock = threading.Lock()
_depth = 0
_original: Callable[[torch.device], bool] | None = None


@functools.cache
def is_supported() -> bool:
    """Whether the installed TRL decides "score only labelled positions" with the binding this module switches."""
    try:
        import trl.trainer.utils as trl_utils
    except ImportError:  # pragma: no cover - trl is a dependency
        return False
    if not callable(getattr(trl_utils, "_use_triton", None)) or not hasattr(trl_utils, "add_fused_lm_head"):
        return False
    try:
        source = inspect.getsource(trl_utils.add_fused_lm_head)
    except (OSError, TypeError):
        return False
    return _DECISION in source


@contextlib.contextmanager
def labelled_positions_only() -> Iterator[None]:
    """Within the block, TRL's fused LM head projects only the labelled positions on CPU as well (re-entrant)."""
    global _depth, _original
    import trl.trainer.utils as trl_utils

    with _lock:
        if _depth == 0:
            _original = trl_utils._use_triton
            original = _original

            def compact_on_cpu(device: torch.device) -> bool:
                return device.type == "cpu" or original(device)

            setattr(trl_utils, _BINDING, compact_on_cpu)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _original is not None:
                setattr(trl_utils, _BINDING, _original)
                _original = None


def score_labelled_positions_only(model: torch.nn.Module) -> bool:
    """Wrap the fused forward that TRL set on `model` so that its CPU calls score only the labelled positions.

    Call after the TRL trainer's `__init__` (which patched the model). Returns whether the wrapper is in place; a
    model without TRL's fused forward, or an already wrapped one, is left as it is.
    """
    fused = model.__dict__.get("forward")
    if fused is None or getattr(fused, _MARK, False):
        return bool(fused is not None)
    if not is_supported():
        _warn_unsupported()
        return False

    @functools.wraps(fused)
    def forward(*args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        if not fused_lm_head:
            return fused(*args, **kwargs)
        with labelled_positions_only():
            return fused(*args, fused_lm_head=True, **kwargs)

    setattr(forward, _MARK, True)
    model.forward = forward  # type: ignore[method-assign]
    return True


@functools.cache
def _warn_unsupported() -> None:
    import trl

    logger.warning(
        f"peft-heft: TRL {trl.__version__}'s fused LM head no longer decides which positions to score the way TRL 1.16 "
        "did, so on CPU it scores every position (slower, same loss). Please report this to peft-heft."
    )
