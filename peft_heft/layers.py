"""Find the decoder layers of any Hugging Face causal LM, and resolve layer specs against them."""

from __future__ import annotations

from torch import nn


def _text_config(model: nn.Module):
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


def model_dimensions(model: nn.Module) -> tuple[int, int]:
    """``(hidden_size, num_decoder_layers)`` of a model."""
    _, layers = find_decoder_layers(model)
    config = _text_config(model)
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    if hidden is None:
        raise ValueError(f"{type(model).__name__} has no config.hidden_size; HEFT cannot size its interventions.")
    return int(hidden), len(layers)


def resolve_layers(spec, num_layers: int) -> list[int]:
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
