"""Pre-flight checks of `StagedSFTTrainer`: refuse, with what to do instead, what would fail late or train wrongly.

Each check runs before TRL or transformers would fail on the same input deep inside (a `KeyError` in `datasets.map`,
a bare `StopIteration`, a `load_state_dict` mismatch), or before a setup that would silently train something else.
"""

from __future__ import annotations

import json
import os
from typing import Any

from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers.training_args import ParallelMode
from transformers.utils import logging
from trl.data_utils import get_dataset_column_names

from ..persistence import check_writable_folder
from ..settings import ADAPTER_SETTINGS
from ..tuner.config import HeftConfig
from ..tuner.model import _find_heft_tuner
from .config import HeftSFTConfig
from .packing import check_packing_args

logger = logging.get_logger(__name__)


def as_heft_args(args, model) -> HeftSFTConfig:
    if isinstance(args, HeftSFTConfig):
        return args
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
        return HeftSFTConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-HEFT")
    raise TypeError(
        f"StagedSFTTrainer needs args=HeftSFTConfig(...), got {type(args).__name__}. HeftSFTConfig takes every "
        "SFTConfig option plus the stage schedule (stage_order, lora_*/reft_* epochs, steps and learning rates)."
    )


def check_supported(args: HeftSFTConfig, model, peft_config, optimizers) -> None:
    check_packing_args(args)
    if args.n_gpu > 1 and args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        raise ValueError(
            f"StagedSFTTrainer sees {args.n_gpu} GPUs in one process, so transformers' Trainer would wrap the model in "
            "torch.nn.DataParallel, which HEFT models cannot run under (its replicas share the original's forward "
            "hooks and interventions). Launch the script with `accelerate launch` or `torchrun --nproc_per_node "
            f"{args.n_gpu}` (DistributedDataParallel, one process per GPU), or make one GPU visible "
            "(CUDA_VISIBLE_DEVICES=0)."
        )
    check_sharding_supported(args)
    if optimizers is not None and any(o is not None for o in optimizers):
        raise ValueError(
            "StagedSFTTrainer builds a fresh optimizer and schedule for each stage over that stage's parameters, so "
            "a pre-built `optimizers=(optimizer, scheduler)` cannot be used. Pass `optimizer_cls_and_kwargs=(cls, "
            "kwargs)` or set `optim` in HeftSFTConfig instead."
        )
    if peft_config is not None and not isinstance(peft_config, HeftConfig):
        raise TypeError(
            f"peft_config must be a HeftConfig for StagedSFTTrainer, got {type(peft_config).__name__}. HeftConfig "
            "takes every LoraConfig option plus the intervention settings."
        )
    if not isinstance(model, str) and is_peft_model(model):
        peft_type = str(getattr(model.peft_config[model.active_adapter], "peft_type", ""))
        if _find_heft_tuner(model) is None:
            raise ValueError(
                f"The model is already wrapped in a PEFT {peft_type.split('.')[-1]} adapter, not HEFT. Pass the base "
                "model with peft_config=HeftConfig(...), or merge_and_unload() the other adapter first."
            )
    elif peft_config is None:
        raise ValueError("StagedSFTTrainer needs peft_config=HeftConfig(...) (or a model already wrapped with HEFT).")


_SHARDING_DETAIL = {
    "FSDP1": "FSDP1 (`FullyShardedDataParallel`) flattens each wrapped unit's parameters into one FlatParameter whose "
    "requires_grad is fixed when the first stage wraps the model, so the next stage cannot switch training from the "
    "LoRA weights to the interventions in it (accelerate does not re-wrap an already wrapped model)",
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def sharding_engine(args: HeftSFTConfig) -> tuple[str, str] | None:
    """FSDP or DeepSpeed, as set in the training arguments or by `accelerate launch`'s config (its env variables)."""
    if args.deepspeed:
        return "DeepSpeed", "args.deepspeed is set"
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed", "ACCELERATE_USE_DEEPSPEED=true, from accelerate's config"
    if args.fsdp or getattr(args, "fsdp_plugin_args", None) is not None:
        return "FSDP", "args.fsdp is set"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP", "ACCELERATE_USE_FSDP=true, from accelerate's config"
    return None


def fsdp_version(args: HeftSFTConfig) -> int:
    """The FSDP version a run would use: transformers' `fsdp_config["version"]` (default 2) when `args.fsdp` is set,
    else accelerate's `fsdp_version` from its launch config (the `FSDP_VERSION` variable, default 1)."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if isinstance(plugin_args, dict) and "fsdp_version" in plugin_args:
        return int(plugin_args["fsdp_version"])
    if args.fsdp and isinstance(args.fsdp_config, dict):
        return int(args.fsdp_config.get("version", 2))
    return int(os.environ.get("FSDP_VERSION", "1") or 1)


def deepspeed_zero_stage(args: HeftSFTConfig) -> int | None:
    """The ZeRO stage of the DeepSpeed plugin the training arguments built (`deepspeed=` or accelerate's config)."""
    stage = getattr(getattr(args, "deepspeed_plugin", None), "zero_stage", None)
    return None if stage is None else int(stage)


def check_sharding_supported(args: HeftSFTConfig) -> None:
    """FSDP2 and DeepSpeed (ZeRO-0 to ZeRO-3) train HEFT's stages; refused: FSDP1 (see `_SHARDING_DETAIL`) and ZeRO-3
    with non-reentrant gradient checkpointing over more than one stage."""
    engine = sharding_engine(args)
    if engine is None:
        return
    if engine[0] == "DeepSpeed":
        checkpointing = args.gradient_checkpointing_kwargs or {}
        if isinstance(checkpointing, str):  # a JSON string, from the command line
            checkpointing = json.loads(checkpointing)
        reentrant = checkpointing.get("use_reentrant") is True
        stages = list(getattr(args, "stage_order", []) or [])
        if deepspeed_zero_stage(args) == 3 and args.gradient_checkpointing and not reentrant and len(stages) > 1:
            raise ValueError(
                f"StagedSFTTrainer does not support DeepSpeed ZeRO-3 with non-reentrant gradient checkpointing over "
                f"more than one stage ({engine[1]}, stage_order={stages}): the second stage builds a second DeepSpeed "
                "engine over the model the first one partitioned, and its first backward fails in the recomputation "
                "(torch.utils.checkpoint.CheckpointError: ZeRO-3 parameters recomputed as empty tensors; "
                "deepspeed 0.19.8). Reentrant checkpointing works: set gradient_checkpointing_kwargs="
                "{'use_reentrant': True}. Or use ZeRO-2, FSDP2, or train without gradient checkpointing."
            )
        return
    version = fsdp_version(args)
    if version == 2:
        return
    raise ValueError(
        f"StagedSFTTrainer does not support FSDP version {version} ({engine[1]}): {_SHARDING_DETAIL['FSDP1']}. Use "
        "FSDP2: `fsdp_version: 2` in accelerate's config (see examples/accelerate/fsdp2.yaml), or "
        "fsdp_config={'version': 2} in the training arguments. DeepSpeed ZeRO-2/ZeRO-3 and DistributedDataParallel "
        "work too."
    )


# ------------------------------------------------------------------ early checks with clear messages
_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "processor_config.json",
    "preprocessor_config.json",
)


def check_processing_class(model, processing_class) -> None:
    """Without a tokenizer, TRL loads one from the model's name or path: refuse when there is none to load from."""
    if processing_class is not None or isinstance(model, str):
        return
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not name:
        raise ValueError(
            f"processing_class is None, and the model ({type(base).__name__}) has no name or path to load its "
            "tokenizer from: it was built from a config, so config._name_or_path is empty. Pass the tokenizer: "
            "StagedSFTTrainer(model, ..., processing_class=tokenizer), e.g. "
            "tokenizer = AutoTokenizer.from_pretrained(<the model's tokenizer id or folder>)."
        )
    if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f)) for f in _TOKENIZER_FILES):
        raise ValueError(
            f"processing_class is None, and the model's folder {name} holds no tokenizer files "
            f"({', '.join(_TOKENIZER_FILES[:3])}, ...) to load one from. Pass processing_class=tokenizer, or save the "
            f"tokenizer into that folder first (tokenizer.save_pretrained({name!r}))."
        )


def check_not_empty(train_dataset, eval_dataset) -> None:
    """An empty dataset fails deep inside TRL (a bare StopIteration): name it instead."""
    if isinstance(train_dataset, Dataset) and len(train_dataset) == 0:
        raise ValueError(
            "train_dataset is empty (0 rows): there is nothing to train on. Check the split you passed and any "
            "filter or select applied to it."
        )
    if isinstance(train_dataset, IterableDataset):
        try:
            next(iter(train_dataset))
        except StopIteration:
            raise ValueError(
                "train_dataset is an empty IterableDataset (it yields no example): there is nothing to train on."
            ) from None
    evals = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
    for key, dataset in evals.items():
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            name = "eval_dataset" if key is None else f"eval_dataset[{key!r}]"
            raise ValueError(
                f"{name} is empty (0 rows). Pass a non-empty split, or eval_dataset=None to skip evaluation."
            )


def check_output_dir(args: HeftSFTConfig) -> None:
    """Checkpoints and the adapter go to output_dir: find out now, not at the first save, that it cannot hold them."""
    if not args.should_save:
        return  # only the saving process writes there
    check_writable_folder(str(args.output_dir), "output_dir", "HeftSFTConfig(output_dir=...)")


_SFT_FORMATS = (
    "'text' (language modeling: the column named by dataset_text_field, now {text_field!r}); "
    "'messages' (conversational language modeling: a list of role/content turns); "
    "'prompt' + 'completion' (prompt-completion, as strings or as role/content lists); "
    "'conversations' (ShareGPT from/value turns, converted to messages); "
    "or tokenized 'input_ids'"
)


def check_dataset_format(dataset, args: HeftSFTConfig, formatting_func, dataset_name: str) -> bool:
    """Refuse, before TRL's KeyError deep in `datasets.map`, a dataset in no SFT format or with None prompts/completions.

    Returns whether the dataset is already tokenized (has `input_ids`).
    """
    try:
        columns = list(get_dataset_column_names(dataset))
    except StopIteration:
        raise ValueError(f"The {dataset_name} dataset is empty: it yields no example.") from None
    if "input_ids" in columns:
        return True
    present = set(columns)
    text_field = args.dataset_text_field
    formats = _SFT_FORMATS.format(text_field=text_field)
    if "prompt" in present and "completion" not in present:
        preference = "chosen" in present and "rejected" in present
        hint = (
            "It looks like preference data (prompt/chosen/rejected), which SFT cannot train on. To fine-tune on the "
            "preferred answers, rename 'chosen' to 'completion' and drop 'rejected': "
            "dataset.rename_column('chosen', 'completion').remove_columns('rejected')."
            if preference
            else "Add a 'completion' column, or rename 'prompt' if it holds the whole text."
        )
        raise ValueError(
            f"The {dataset_name} dataset has a 'prompt' column but no 'completion' column (columns: {columns}); "
            f"TRL's SFT preparation reads 'prompt' only together with 'completion'. {hint} SFT formats: {formats}."
        )
    readable = bool({"prompt", "messages", "conversations", text_field} & present)
    if not readable and formatting_func is None:
        preference_hint = (
            " 'chosen'/'rejected' are preference data, which SFT cannot train on; to fine-tune on the preferred "
            "answers, use 'chosen' as 'messages' (or 'text') and drop 'rejected'."
            if {"chosen", "rejected"} <= present
            else ""
        )
        raise ValueError(
            f"The {dataset_name} dataset has columns {columns}, none of which TRL's SFT preparation reads. "
            f"StagedSFTTrainer takes the formats SFTTrainer takes: {formats}.{preference_hint} Rename your columns "
            "(dataset.rename_column(old, new)), set dataset_text_field, or pass formatting_func= returning each "
            "example's text."
        )
    # the columns TRL tokenizes, in its order: prompt-completion, then messages, then text
    if "prompt" in present:
        used = ["prompt", "completion"]
    elif "messages" in present:
        used = ["messages"]
    elif "conversations" in present:
        used = ["conversations"]
    else:
        used = [text_field] if formatting_func is None else []
    if isinstance(dataset, Dataset):
        check_no_none(dataset, used, dataset_name)
    return False


def check_no_none(dataset: Dataset, columns: list[str], dataset_name: str) -> None:
    """Name the first row whose prompt/completion/text/messages is None (TRL fails on it with an AttributeError)."""
    for column in columns:
        if not dataset.data.column(column).null_count:  # no None in the whole table: nothing to search
            continue
        nulls = dataset.with_format("arrow")[column].is_null().to_pylist()  # the rows of this view (select/filter)
        rows = [i for i, null in enumerate(nulls) if null]
        if not rows:
            continue
        more = f" ({len(rows)} rows in all: {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''})"
        raise ValueError(
            f"Row {rows[0]} of the {dataset_name} dataset has {column}=None{more if len(rows) > 1 else ''}. Every "
            f"row needs a {column!r} value (a string, or a list of turns): drop or fill those rows first, e.g. "
            f"dataset = dataset.filter(lambda row: row[{column!r}] is not None)."
        )


def report_dropped_rows(before: int, after: int, args: HeftSFTConfig, dataset_name: str) -> None:
    """TRL drops rows that truncation leaves without a token to learn: all of them is an error, some a warning."""
    if after == 0:
        raise ValueError(
            f"Every example of the {dataset_name} dataset ({before}) was dropped while preparing it: truncation to "
            f"max_length={args.max_length} (truncation_mode={args.truncation_mode!r}) leaves none of them a "
            "completion token to learn, so each prompt is at least max_length tokens long. Raise max_length above "
            "the prompts' token length, or shorten the prompts."
        )
    logger.warning(
        f"{before - after} of {before} examples of the {dataset_name} dataset were dropped: truncation to "
        f"max_length={args.max_length} left them no completion token to learn (their prompt fills max_length). "
        "Raise max_length to keep them."
    )


def _comparable(field: str, value, num_layers) -> Any:
    value = getattr(value, "value", value)  # enums (task_type) compare by their string
    if isinstance(value, (set, frozenset, tuple, list)):
        value = [_comparable(field, v, None) for v in value]
        if field != "intervention_layers":
            return sorted(value, key=repr)
    if field == "intervention_layers" and isinstance(num_layers, int) and num_layers > 0:
        if value == "all":
            return list(range(num_layers))
        if isinstance(value, int):
            value = [value]
        if isinstance(value, list):
            return [i % num_layers if isinstance(i, int) else i for i in value]
    return value


def _shown(field: str, value) -> Any:
    """A setting as the error message shows it: module lists (saved from sets, in any order) sorted."""
    value = getattr(value, "value", value)
    if isinstance(value, (set, frozenset)) or (isinstance(value, list) and field != "intervention_layers"):
        return sorted(value, key=str)
    return value


def check_same_adapter(checkpoint: str, config, adapter_name: str) -> None:
    """Resuming under another adapter configuration silently mixes two setups (or fails in load_state_dict)."""
    path = os.path.join(checkpoint, "adapter_config.json")
    if not os.path.isfile(path):
        path = os.path.join(checkpoint, adapter_name, "adapter_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    num_layers = getattr(config, "base_model_num_layers", None) or saved.get("base_model_num_layers")
    differences = []
    for field in ADAPTER_SETTINGS:  # every setting that makes it another adapter
        if field not in saved or not hasattr(config, field):
            continue  # an older config without the field
        if field.startswith("base_model_") and None in (saved[field], getattr(config, field)):
            continue  # filled in when the adapter is created: not yet known on a config alone
        theirs = _comparable(field, saved[field], num_layers)
        ours = _comparable(field, getattr(config, field), num_layers)
        if theirs != ours:
            shown = [_shown(field, value) for value in (saved[field], getattr(config, field))]
            differences.append(f"{field}: checkpoint {shown[0]!r}, this run {shown[1]!r}")
    if differences:
        raise ValueError(
            f"Checkpoint {checkpoint} was trained with another adapter configuration than this run's peft_config: "
            + "; ".join(differences)
            + ". Resume with the checkpoint's settings (its adapter_config.json), or train from scratch in a new "
            "output_dir."
        )
