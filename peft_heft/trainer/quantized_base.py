"""Keep a bitsandbytes 4-bit base trainable on CPU: bitsandbytes 0.50 repacks its weights for inference, one way.

On a CPU with AVX512-BF16, `bitsandbytes.nn.Linear4bit.forward` converts its weight into a CPU inference layout the
first time it runs in eval mode on an input that does not require grad (any `torch.no_grad()` evaluation or
`generate()`), and from then on `bnb.matmul_4bit` runs the inference kernel (`gemv_4bit`) for every call, training
ones included. That kernel passes no gradient back to its input: every LoRA or intervention whose path to the loss
crosses a quantized linear layer (all of them, through `o_proj` and the MLP) silently gets no gradient, and its
outputs are computed in bfloat16 (logits ~0.1 off the canonical layout's). bitsandbytes converts back only when it
saves a state dict or moves the weight to CUDA/XPU. Plain PEFT LoRA with TRL's `SFTTrainer` is affected the same way
(`evaluate()` before or during training is enough).

HEFT's trainers therefore turn the conversion off on every `Linear4bit` of the model they train (the module's own
`support_avx512bf16_for_cpu` switch, which its forward checks) and convert back any layer that was already converted
(through `state_dict()`, bitsandbytes' own way back). Evaluation and generation on such a CPU base then use the same
dequantizing path as training: slower than the inference kernel, consistent with the trained numbers.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

_SWITCH = "support_avx512bf16_for_cpu"


def keep_4bit_weights_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes' one-way CPU inference repacking of `model`'s 4-bit weights and undo it where it happened.

    Returns the number of layers converted back. A layer that stays converted is an error (training through it
    would get no gradient).
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0
    restored = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        if getattr(module, _SWITCH, False):
            setattr(module, _SWITCH, False)
        if _is_repacked(module):
            module.state_dict()  # bitsandbytes converts the weight back to its canonical layout before saving it
            if _is_repacked(module):
                raise RuntimeError(
                    f"{name}: bitsandbytes repacked this 4-bit weight for CPU inference and it could not be converted "
                    "back; training through it would get no gradient. Load the quantized base again and build the "
                    "trainer before running any evaluation or generate() on it."
                )
            restored += 1
    if restored:
        logger.info(
            f"Converted {restored} bitsandbytes 4-bit layers back from their CPU inference layout so that training "
            "gets gradients through them."
        )
    return restored


def _is_repacked(module: torch.nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))
