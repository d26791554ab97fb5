"""Keep a bitsandbytes 4-bit base trainable on CPU: bitsandbytes 0.50 repacks its weights for inference, one way.

On a CPU with AVX512-BF16, `bitsandbytes.nn.Linear4bit.forward` converts its weight into a CPU inference layout the
first time it runs in eval mode on an input that does not require grad (any `torch.no_grad()` evaluation or
`generate()`), and from then on `bnb.matmul_4bit` runs the inference kernel (`gemv_4bit`) for every call, training
ones included. That kernel passes no gradient back to its input: every LoRA whose path to the loss crosses a
quantized linear layer (all of them, through `o_proj` and the MLP) silently gets no gradient, and its outputs are
computed in bfloat16. Converting back (bitsandbytes does it in `state_dict()`) is lossy in bitsandbytes 0.50: on the
embedded SmolLM2 the loss of a sentence goes from 3.67 to 15.1. Plain PEFT LoRA with TRL's `SFTTrainer` is affected
the same way (`evaluate()` before or during training is enough).

So a HEFT model turns the conversion off on every `Linear4bit` of its base when it is built (the module's own
`support_avx512bf16_for_cpu` switch, which its forward checks): evaluation, generation and training then all use the
dequantizing path (slower on CPU than the inference kernel, and the same numbers in training and after reloading).
A HEFT adapter on a base that was already converted is refused: it could not train, and loading an adapter makes
PEFT read the model's `state_dict()`, which converts the weights back lossily.
"""

from __future__ import annotations

import sys

import torch

_SWITCH = "support_avx512bf16_for_cpu"


def keep_4bit_weights_trainable(model: torch.nn.Module) -> None:
    """Turn off bitsandbytes' one-way CPU inference repacking on every 4-bit layer of `model`.

    Raises:
        `ValueError`: a layer was repacked already. Training through it gets no gradient, and loading an adapter
            converts it back (PEFT reads the model's `state_dict()`), which bitsandbytes 0.50 does lossily.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # a model with 4-bit layers has imported it; importing it here would only cost time
        return
    Linear4bit = bnb.nn.Linear4bit
    repacked = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        if getattr(module, _SWITCH, False):
            setattr(module, _SWITCH, False)
        if _is_repacked(module):
            repacked.append(name)
    if repacked:
        raise ValueError(
            f"{len(repacked)} bitsandbytes 4-bit layers of the base model (e.g. {repacked[0]}) were repacked by "
            "bitsandbytes for its CPU inference kernel, which happens on the first evaluation or generate() in eval "
            "mode without gradients. Through that kernel training gets no gradient, and bitsandbytes 0.50 converts "
            "the weights back lossily (as it does when an adapter is loaded). Load the quantized base again and build "
            "the HEFT model (get_peft_model, or PeftModel.from_pretrained) before evaluating or generating with it; "
            "a HEFT model keeps its base on the exact kernel from then on."
        )


def _is_repacked(module: torch.nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))
