"""Where HEFT's interventions go: the decoder layers of any Hugging Face causal LM, and each layer's dtype and device.

* :func:`find_decoder_layers`, :func:`model_dimensions`, :func:`resolve_layers`: the decoder blocks, found
  structurally (not by model name), and layer specs resolved against them;
* :func:`compute_dtype`, :func:`execution_device`: what an intervention on a layer is built in, also for quantized
  and accelerate-offloaded layers; :func:`build_adapter_interventions` builds one adapter's interventions with them;
* :func:`keep_4bit_weights_trainable`: keep a bitsandbytes 4-bit base trainable on CPU.

About the last one: on a CPU with AVX512-BF16, `bitsandbytes.nn.Linear4bit.forward` (bitsandbytes 0.50) converts its
weight into a CPU inference layout the first time it runs in eval mode on an input that does not require grad (any
`torch.no_grad()` evaluation or `generate()`), and from then on `bnb.matmul_4bit` runs the inference kernel
(`gemv_4bit`) for every call, training ones included. That kernel passes no gradient back to its input: every LoRA
whose path to the loss crosses a quantized linear layer (all of them, through `o_proj` and the MLP) silently gets no
gradient, and its outputs are computed in bfloat16. Converting back (bitsandbytes does it in `state_dict()`) is lossy
in bitsandbytes 0.50: on the embedded SmolLM2 the loss of a sentence goes from 3.67 to 15.1. Plain PEFT LoRA with
TRL's `SFTTrainer` is affected the same way (`evaluate()` before or during training is enough). So a HEFT model turns
the conversion off on every `Linear4bit` of its base when it is built (the module's own `support_avx512bf16_for_cpu`
switch, which its forward checks): evaluation, generation and training then all use the dequantizing path (slower on
CPU than the inference kernel, and the same numbers in training and after reloading). A HEFT adapter on a base that
was already converted is refused: it could not train, and loading an adapter makes PEFT read the model's
`state_dict()`, which converts the weights back lossily.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .interventions import build_intervention

if TYPE_CHECKING:
    from .config import HeftConfig

_SWITCH = "support_avx512bf16_for_cpu"


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks, found structurally (not by model name).

    It is the list whose length is the config's ``num_hidden_layers`` (shallowest first); without a config, the
    longest list of same-class modules. Works for Llama/Mistral/Qwen (``model.layers``), GPT-2 (``transformer.h``),
    GPT-NeoX (``gpt_neox.layers``), OPT, Falcon and others.
    """
    config = _text_config(model)
    expected = getattr(config, "num_hidden_layers", None) if config is not None else None
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    ]
    if expected is not None:
        matching = [c for c in candidates if len(c[1]) == expected]
        if matching:
            return min(matching, key=lambda c: c[0].count("."))
    if not candidates:
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__}: it has no nn.ModuleList of identical "
            "blocks. HEFT interventions need a transformer with a list of decoder layers."
        )
    return max(candidates, key=lambda c: (len(c[1]), -c[0].count(".")))


def find_backbone(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers (``LlamaModel``...): where each forward's inputs are known."""
    name, _ = find_decoder_layers(model)
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def model_dimensions(model: nn.Module) -> tuple[int, int]:
    """``(hidden_size, num_decoder_layers)`` of a model."""
    _, layers = find_decoder_layers(model)
    config = _text_config(model)
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    if hidden is None:
        raise ValueError(f"{type(model).__name__} has no config.hidden_size; HEFT cannot size its interventions.")
    return int(hidden), len(layers)


def resolve_layers(spec: Any, num_layers: int) -> list[int]:
    """Turn ``"all"``, an int or a list of ints (negatives count from the end) into sorted layer indices."""
    if spec == "all":
        return list(range(num_layers))
    indices = [spec] if isinstance(spec, int) else list(spec)
    resolved = []
    for index in indices:
        if not -num_layers <= index < num_layers:
            raise ValueError(
                f"intervention_layers contains {index}, but the model has {num_layers} decoder layers "
                f"(valid: 0..{num_layers - 1} or -{num_layers}..-1)."
            )
        resolved.append(index % num_layers)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"intervention_layers {indices} names the same layer twice (after resolving negatives).")
    return sorted(resolved)


def check_intervention_rank(rank: int, hidden_size: int) -> None:
    if rank > hidden_size:
        raise ValueError(
            f"intervention_rank={rank} is larger than the model's hidden size {hidden_size}; use a rank <= "
            f"{hidden_size}."
        )


def intervention_key(layer: int, group: int, num_groups: int) -> str:
    """The name of one intervention in its adapter's ``ModuleDict`` (and so in the saved state dict)."""
    if num_groups == 1:
        return f"layer{layer}"
    return f"layer{layer}_{('first', 'last')[group]}"


def build_adapter_interventions(
    model: nn.Module,
    config: HeftConfig,
    layers: list[int],
    hidden_size: int,
    prefix: str,
    autocast_adapter_dtype: bool,
) -> nn.ModuleDict:
    """One adapter's interventions, one per layer and position group, each in its layer's compute dtype (float32 on a
    half-precision base with ``autocast_adapter_dtype``, as PEFT keeps LoRA) and on its layer's execution device."""
    _, decoder_layers = find_decoder_layers(model)
    groups = config.num_position_groups
    modules = nn.ModuleDict()
    for layer in layers:
        dtype = compute_dtype(model, decoder_layers[layer], prefix)
        if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # like PEFT's LoRA: train adapters in float32 on half-precision bases
        device = execution_device(model, decoder_layers[layer], prefix)
        for group in range(groups):
            modules[intervention_key(layer, group, groups)] = build_intervention(
                config.intervention_type,
                hidden_size=hidden_size,
                rank=config.intervention_rank,
                dropout=config.intervention_dropout,
                dtype=dtype,
                device=device,
                act_fn=config.intervention_act_fn,
                add_bias=config.intervention_add_bias,
            )
    return modules


def _base_parameters(module: nn.Module, prefix: str) -> Iterator[nn.Parameter]:
    """The module's own base parameters, not adapter weights (those are on "meta" with low_cpu_mem_usage)."""
    return (p for n, p in module.named_parameters() if prefix not in n)


def compute_dtype(model: nn.Module, layer: nn.Module, prefix: str) -> torch.dtype:
    """The dtype the decoder layer computes in, never a quantized weight's.

    A layer's first base weight gives it for a plain model. Under bitsandbytes that weight is the packed uint8 (4-bit)
    or int8 (8-bit) storage: the hidden states then have the input embeddings' dtype (they are the embeddings' output),
    else the config's ``dtype``, else torch's default.
    """
    reference = next(_base_parameters(layer, prefix), None)
    if reference is not None and reference.is_floating_point():
        return reference.dtype
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    config = getattr(model, "config", None)
    for name in ("dtype", "torch_dtype"):
        dtype = getattr(config, name, None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    return torch.get_default_dtype()


def hook_execution_device(module: nn.Module) -> torch.device | None:
    """The ``execution_device`` of an accelerate ``AlignDevicesHook`` on ``module`` (alone or in a SequentialHook).

    accelerate keeps the hook in ``module._hf_hook`` (private, no public getter; see
    tests/test_upstream_private_names.py).
    """
    hook = getattr(module, "_hf_hook", None)
    for candidate in [hook, *getattr(hook, "hooks", ())]:
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            device = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
            if device.type != "meta":
                return device
    return None


def execution_device(model: nn.Module, layer: nn.Module, prefix: str) -> torch.device | None:
    """Where the decoder layer runs: its weights' device, or for weights offloaded by accelerate (on ``meta``, loaded
    for each forward from CPU or disk) the execution device of accelerate's hook on the layer, a submodule of it or
    an ancestor. ``None`` when no device is known (the interventions stay where torch puts them)."""
    reference = next(_base_parameters(layer, prefix), None)
    if reference is not None and reference.device.type != "meta":
        return reference.device
    for module in layer.modules():
        device = hook_execution_device(module)
        if device is not None:
            return device
    # an ancestor's hook (a device map at a coarser level than the layers), the nearest one first
    name = next((n for n, m in model.named_modules() if m is layer), None)
    while name:
        name = name.rpartition(".")[0]
        device = hook_execution_device(model.get_submodule(name))
        if device is not None:
            return device
    return None


def keep_4bit_weights_trainable(model: nn.Module) -> None:
    """Turn off bitsandbytes' one-way CPU inference repacking on every 4-bit layer of `model` (see the module's
    docstring).

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


def _is_repacked(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))
