"""``heft-sft``: train a HEFT adapter with StagedSFTTrainer from the command line, like ``trl sft``.

Examples:
```bash
heft-sft --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --dataset_name data/train.jsonl \
    --output_dir out --lora_num_train_epochs 3 --reft_num_train_epochs 3 \
    --lora_target_modules q_proj v_proj --intervention_layers 2 4 6 --intervention_positions f7+l7
heft-sft --model_name_or_path embedded:smollm2-135m-instruct --dataset_name embedded:debates \
    --output_dir out --eval_accuracy --answer_choices democratic,republican   # offline: embedded model and data (peft_heft.assets)
heft-sft --config heft.yaml          # any option in YAML; flags override it
```

Precision: without --bf16, --fp16 or --use_cpu (on the command line or in the YAML), bf16 is on where the hardware
supports it (a bf16-capable GPU) and off elsewhere, so a machine without a GPU trains in float32 with no extra flags.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, ScriptArguments, TrlParser

from .assets.model import EMBEDDED_MODEL, EMBEDDED_PREFIX, resolve_model_name_or_path
from .trainer.config import HeftSFTConfig
from .tuner.config import HeftConfig

logger = logging.getLogger(__name__)

_INTERVENTION_FIELDS = [
    f
    for f in dataclasses.fields(HeftConfig)
    if f.name.startswith("intervention_") or f.name == "share_intervention_weights"
]


def _cli_field(f: dataclasses.Field) -> tuple:
    """The HeftConfig field as a CLI option: same name, default and help; layers are given as text."""
    if f.name == "intervention_layers":
        return (
            f.name,
            list[str],  # nargs="+": `--intervention_layers 1 3` as well as `--intervention_layers '1,3'`
            field(
                default_factory=lambda: ["all"],
                metadata={
                    "help": f.metadata["help"] + " On the command line: 'all', one index, or several as "
                    "'1 3', '1,3' or '[1, 3]' (negatives count from the end, e.g. -1)."
                },
            ),
        )
    return f.name, f.type, field(default=f.default, metadata=dict(f.metadata))


# Built from HeftConfig's fields so the two cannot drift; Any because type checkers cannot see a dynamic dataclass.
HeftInterventionArguments: Any = dataclasses.make_dataclass(
    "HeftInterventionArguments",
    [_cli_field(f) for f in _INTERVENTION_FIELDS],
    namespace={"__doc__": "HeftConfig's intervention options (LoRA options come from TRL's ModelConfig)."},
)


@dataclass
class HeftScriptArguments(ScriptArguments):
    """TRL's script arguments, plus local-file loading, an eval split and generation accuracy."""

    eval_split_size: float = field(
        default=0.0,
        metadata={"help": "When the dataset has no test split, hold out this fraction (or count, if >= 1) of train."},
    )
    eval_accuracy: bool = field(
        default=False,
        metadata={
            "help": "Report generation accuracy (answer match) on the eval split after training, and as "
            "eval_accuracy at every evaluation (eval_strategy, and each trial of --search, whose metric it becomes)."
        },
    )
    answer_choices: str | None = field(
        default=None, metadata={"help": "Comma-separated possible answers for --eval_accuracy, e.g. 'yes,no'."}
    )
    answer_trigger: str | None = field(
        default=None, metadata={"help": "Read the generated answer only after this string (e.g. 'Answer:')."}
    )
    max_new_tokens: int = field(default=8, metadata={"help": "Generation budget per prompt for --eval_accuracy."})
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N rows of the evaluation split (loss and accuracy)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N rows of the train split only (quick runs)."}
    )
    search: int = field(
        default=0,
        metadata={
            "help": "Search the ReFT stage with N Optuna trials (the default search space) from one LoRA stage, and "
            "save the best trial's adapter; needs an eval split and `pip install optuna`. 0: no search."
        },
    )
    search_storage: str | None = field(
        default=None,
        metadata={"help": "Optuna storage of --search, e.g. sqlite:///search.db: a rerun resumes the study."},
    )
    search_study_name: str | None = field(default=None, metadata={"help": "Optuna study name of --search."})
    search_metric: str | None = field(
        default=None,
        metadata={
            "help": "The evaluation metric --search compares: eval_accuracy with --eval_accuracy, else eval_loss."
        },
    )


_INDEX = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would read "1_3" as 13, and other scripts' digits


# the dataclasses heft-sft parses, in TrlParser's order (its parse results come back in this order)
_ARGUMENT_CLASSES = (HeftScriptArguments, HeftSFTConfig, ModelConfig, HeftInterventionArguments)


def parse_layers(value: Any) -> list[int] | int | str:
    """``--intervention_layers`` as HeftConfig takes it: ``"all"``, one index, or a list of indices.

    Text may be ``all``, ``3``, ``-1``, ``1,3``, ``1 3``, ``1, 3`` or ``[1, 3]``; the words of an unquoted
    ``--intervention_layers 1 3`` arrive as a list of strings and are read the same way. A YAML list of ints is kept.
    Anything else (``1-3``, ``1;3``, ``1.0``, ``1,,3``, ``1 2, 3``) is refused: a guess could train the wrong layers.

    Example:
    ```python
    >>> parse_layers("1 3"), parse_layers("[1, 3]"), parse_layers("-1"), parse_layers(["1", "3"])
    ([1, 3], [1, 3], -1, [1, 3])
    ```
    """
    fix = "use 'all', one index (e.g. 3 or -1) or several: '1 3', '1,3' or '[1, 3]'"
    if isinstance(value, bool):
        raise ValueError(f"--intervention_layers {value!r}: a bool is not a layer index; {fix}.")
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) for v in value):
            return _parse_layer_text(" ".join(value), fix)
        layers = []
        for item in value:  # a YAML list: ints, or strings that are exactly one index
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise ValueError(
                    f"--intervention_layers {list(value)!r}: {item!r} ({type(item).__name__}) is not a layer "
                    f"index; {fix}."
                )
            if isinstance(item, str):
                if not _INDEX.fullmatch(item.strip()):
                    raise ValueError(f"--intervention_layers {list(value)!r}: {item!r} is not one layer index; {fix}.")
                item = int(item.strip())
            layers.append(item)
        if not layers:
            raise ValueError(f"--intervention_layers is an empty list; {fix}.")
        return layers
    if not isinstance(value, str):
        raise ValueError(f"--intervention_layers {value!r} ({type(value).__name__}): {fix}.")
    return _parse_layer_text(value, fix)


def _parse_layer_text(text: str, fix: str) -> list[int] | int | str:
    stripped = shown = text.strip()
    if stripped.lower() == "all":
        return "all"
    bracketed = stripped.startswith("[") and stripped.endswith("]")
    inner = stripped[1:-1] if bracketed else stripped
    if "[" in inner or "]" in inner:
        raise ValueError(f"--intervention_layers {shown!r}: unbalanced or nested brackets; {fix}.")
    if "," in inner:
        parts = [part.strip() for part in inner.split(",")]
        if parts and parts[-1] == "" and len(parts) > 1:
            parts = parts[:-1]  # "[1, 3,]": a trailing comma, as Python and YAML allow
        separator = "commas"
    else:
        parts = inner.split()
        separator = "spaces"
    if not parts or parts == [""]:
        raise ValueError(f"--intervention_layers {shown!r} names no layer; {fix}.")
    for part in parts:
        if not _INDEX.fullmatch(part):
            what = "an empty entry" if not part else f"{part!r}, which is not one layer index"
            if re.fullmatch(r"-?[0-9]+-[0-9]+", part):
                what += " (a range is not expanded: list each layer)"
            where = f" (split on {separator})" if len(parts) > 1 else ""
            raise ValueError(f"--intervention_layers {shown!r}{where} holds {what}; {fix}.")
    layers = [int(part) for part in parts]
    if len(layers) == 1 and not bracketed:
        return layers[0]
    return layers


def build_heft_config(model_args: ModelConfig, heft_args) -> HeftConfig:
    """HeftConfig from TRL's LoRA flags (`--lora_r`, `--lora_target_modules`, ...) and the intervention flags."""
    targets = model_args.lora_target_modules
    if isinstance(targets, str) and targets != "all-linear" and targets.replace("_", "").isalnum():
        targets = [targets]  # TRL's ModelConfig turns one --lora_target_modules value into a (regex) string
    options = {f.name: getattr(heft_args, f.name) for f in _INTERVENTION_FIELDS}
    options["intervention_layers"] = parse_layers(options["intervention_layers"])
    return HeftConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        **options,
    )


_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_sft_dataset(name: str, config: str | None = None, streaming: bool = False):
    """A local json/jsonl/csv/parquet file, an embedded task (``embedded:rotten_tomatoes``, see ``peft_heft.assets``), a
    local dataset folder, or a dataset name on the Hub."""
    from datasets import DatasetDict, load_dataset

    if name.startswith(EMBEDDED_PREFIX):
        from .assets import load_task_dataset

        return load_task_dataset(name[len(EMBEDDED_PREFIX) :])
    if os.path.isfile(name):
        ext = os.path.splitext(name)[1].lower()
        if ext not in _FILE_BUILDERS:
            raise ValueError(f"{name}: unsupported file type {ext!r}; use .json, .jsonl, .csv or .parquet.")
        data = load_dataset(_FILE_BUILDERS[ext], data_files={"train": name}, streaming=streaming)
    else:
        data = load_dataset(name, name=config, streaming=streaming)
    return data if isinstance(data, dict) else DatasetDict({"train": data})


def main(argv: list[str] | None = None) -> int:
    """Console entry point: parse, train, evaluate, save. Returns the exit status (0)."""
    _show_info_logs()
    train_from_args(argv)
    # Under `accelerate launch`, leave the process group before exiting (what Accelerator.end_training does): a
    # process that exits with a gloo group alive can abort in its threads' teardown. A no-op in a single process.
    from accelerate.state import PartialState

    PartialState().destroy_process_group()
    return 0


def _show_info_logs() -> None:
    """Print peft-heft's info messages (which weights were loaded, which precision was chosen) on the console."""
    package_logger = logging.getLogger("peft_heft")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[heft-sft] %(levelname)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False


def build_parser() -> TrlParser:
    """The ``heft-sft`` parser: TRL's script, SFT and model arguments plus HeftConfig's intervention options."""
    parser = TrlParser(
        # transformers annotates these as DataClassType, a NewType no plain dataclass matches
        _ARGUMENT_CLASSES,  # type: ignore[arg-type]
        prog="heft-sft",
        description=(
            "Train a HEFT adapter (LoRA stage, then ReFT stage) with StagedSFTTrainer. Every option below can also be "
            "set in a YAML file given with --config file.yaml; flags override the file. Key options: "
            "--model_name_or_path (a hub id, a local folder, or embedded:smollm2-135m-instruct), "
            "--dataset_name (a .json/.jsonl/.csv/.parquet file or a dataset name), "
            "--output_dir, --stage_order, --lora_num_train_epochs/--reft_num_train_epochs (or *_max_steps), "
            "--lora_learning_rate/--reft_learning_rate, --lora_r/--lora_target_modules, --intervention_layers, "
            "--intervention_positions, --eval_accuracy --answer_choices yes,no. Without --bf16/--fp16/--use_cpu, "
            "bf16 is used where the hardware supports it."
        ),
    )
    return parser


def _option_dests(classes) -> dict[str, str]:
    """``{option string: destination}`` of the parser's dataclass options, spelled the way transformers'
    ``HfArgumentParser`` adds them: ``--name``, ``--name-with-dashes``, metadata aliases, and ``--no_<name>`` for a
    bool defaulting to True (kept here rather than read from argparse's private ``_actions``)."""
    dests = {"--config": "config"}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            options = [f"--{f.name}", f"--{f.name.replace('_', '-')}"]
            aliases = f.metadata.get("aliases", [])
            options += [aliases] if isinstance(aliases, str) else list(aliases)
            if f.default is True:
                options += [f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}"]
            dests.update(dict.fromkeys(options, f.name))
    return dests


def parse_args(argv: list[str] | None = None) -> tuple:
    """``argv`` parsed like ``heft-sft`` does: ``(script_args, training_args, model_args, heft_args)``."""
    args = list(argv) if argv is not None else sys.argv[1:]
    parser = build_parser()
    _default_precision(parser, args)
    return tuple(parser.parse_args_and_config(args=args))


def train_from_args(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` like ``heft-sft`` and run; returns the results written to ``heft_results.json``."""
    script_args, training_args, model_args, heft_args = parse_args(argv)
    return run(script_args, training_args, model_args, heft_args)


_PRECISION_OPTIONS = ("bf16", "fp16", "use_cpu")


def _options_given(parser: TrlParser, args: list[str]) -> set[str]:
    """The destinations ``args`` sets, matched the way argparse matches them (``--use-cpu``, ``--bf16=...``, unique
    prefixes), plus the keys of the ``--config`` YAML file."""
    strings = _option_dests(_ARGUMENT_CLASSES)  # the classes build_parser() builds the parser from
    given = set()
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        if name in strings:
            given.add(strings[name])
        elif parser.allow_abbrev:
            matches = {dest for option, dest in strings.items() if option.startswith(name)}
            if len(matches) == 1:
                given |= matches
    if "--config" in args and args.index("--config") + 1 < len(args):  # found the way TrlParser finds it
        import yaml

        with open(args[args.index("--config") + 1]) as handle:
            config = yaml.safe_load(handle)
        if isinstance(config, dict):
            given |= set(config)
    return given


def _hardware_supports_bf16() -> bool:
    """Where transformers accepts bf16 without --use_cpu: a bf16-capable GPU (or XLA device)."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return bool(is_torch_bf16_gpu_available() or is_torch_xla_available())


def _default_precision(parser: TrlParser, args: list[str]) -> bool | None:
    """Unless --bf16, --fp16 or --use_cpu is given (flag or YAML key), default bf16 to what the hardware supports.

    TRL's SFTConfig defaults to bf16=True, which transformers refuses on a machine without a bf16 GPU unless
    --use_cpu is given; HeftSFTConfig keeps that default (as TRL's Python API does), only the command line adapts.
    Returns the chosen value, or None when the user chose.
    """
    given = _options_given(parser, args) & set(_PRECISION_OPTIONS)
    if given:
        logger.info(f"Precision from your options ({', '.join(sorted(given))}).")
        return None
    bf16 = _hardware_supports_bf16()
    parser.set_defaults(bf16=bf16)
    if bf16:
        logger.info("Precision: bf16 mixed precision (this machine supports it; pass --bf16 false for float32).")
    else:
        logger.info(
            "Precision: float32, bf16 off (no bf16-capable GPU here; none of --bf16/--fp16/--use_cpu was given). "
            "Training runs on the CPU when there is no GPU."
        )
    return bf16


def run(script_args, training_args, model_args, heft_args) -> dict:
    from .evaluation import evaluate_generation_accuracy
    from .trainer.callbacks import GenerationAccuracyCallback
    from .trainer.search import run_fine_stage_search
    from .trainer.staged_sft import StagedSFTTrainer

    if not model_args.model_name_or_path:
        raise ValueError(
            f"--model_name_or_path is required: a hub id or a local model folder (offline, the embedded copy of "
            f"SmolLM2-135M-Instruct: {EMBEDDED_MODEL}; see `python -m peft_heft.assets`)."
        )
    if not script_args.dataset_name:
        raise ValueError("--dataset_name is required: a local .json/.jsonl/.csv/.parquet file or a dataset name.")
    # before the data loads: a missing local folder fails now, and the log says which weights will be trained
    model_path = resolve_model_name_or_path(model_args.model_name_or_path, revision=model_args.model_revision)
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    data = load_sft_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming)
    train = data[script_args.dataset_train_split]
    if script_args.max_train_samples is not None:
        if script_args.max_train_samples < 1:
            raise ValueError(f"--max_train_samples must be >= 1, got {script_args.max_train_samples}.")
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if isinstance(script_args.search, bool) or script_args.search < 0:
        raise ValueError(f"--search takes a number of trials (>= 1, or 0 for no search), got {script_args.search!r}.")
    wants_eval = training_args.eval_strategy != "no" or script_args.eval_accuracy or script_args.search > 0
    evaluation = data.get(script_args.dataset_test_split)
    if evaluation is None and wants_eval:
        if not script_args.eval_split_size:
            raise ValueError(
                f"Evaluation was requested but the dataset has no {script_args.dataset_test_split!r} split; pass "
                "--eval_split_size 0.1 to hold out part of train, or --eval_strategy no."
            )
        size = script_args.eval_split_size
        parts = train.train_test_split(test_size=int(size) if size >= 1 else size, seed=training_args.seed)
        train, evaluation = parts["train"], parts["test"]
    if evaluation is not None and script_args.eval_max_samples is not None:
        evaluation = evaluation.select(range(min(script_args.eval_max_samples, len(evaluation))))

    choices = [c for c in (script_args.answer_choices or "").split(",") if c.strip()] or None
    metric = script_args.search_metric or ("eval_accuracy" if script_args.eval_accuracy else "eval_loss")
    if script_args.search_metric is not None and not script_args.search:
        raise ValueError("--search_metric chooses the metric of --search N; pass --search N or drop it.")
    if metric in ("accuracy", "eval_accuracy") and not script_args.eval_accuracy:
        raise ValueError("--search_metric eval_accuracy needs --eval_accuracy (and --answer_choices for choices).")
    trainer = StagedSFTTrainer(
        model=model_path,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation if wants_eval else None,
        peft_config=build_heft_config(model_args, heft_args),
    )
    if script_args.eval_accuracy:
        # evaluated in every evaluate(): by eval_strategy, at each stage's end and in each search trial
        trainer.add_callback(
            GenerationAccuracyCallback(
                evaluation,
                trainer.processing_class,
                choices=choices,
                trigger=script_args.answer_trigger,
                max_new_tokens=script_args.max_new_tokens,
                batch_size=training_args.per_device_eval_batch_size,
            )
        )
    results: dict[str, Any] = {}
    if script_args.search:
        started = time.time()
        study = run_fine_stage_search(
            trainer,
            script_args.search,
            metric=metric,
            storage=script_args.search_storage,
            study_name=script_args.search_study_name,
        )
        done = [t for t in study.trials if t.value is not None and t.state.name == "COMPLETE"]
        results["search"] = {
            "metric": metric if metric.startswith("eval_") else f"eval_{metric}",
            "trials": len(study.trials),
            "best_trial": study.best_trial.number if done else None,
            "best_value": study.best_value if done else None,
            "best_params": study.best_trial.params if done else None,
        }
        results["search"]["study_json"] = os.path.join(training_args.output_dir, "search", "study.json")
        results["train"] = trainer.combined_output(["lora", "reft"], time.time() - started).metrics
    else:
        output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        results["train"] = output.metrics
    trainer.save_model(training_args.output_dir)
    if script_args.eval_accuracy:
        accuracy = evaluate_generation_accuracy(
            trainer.model,
            trainer.processing_class,
            evaluation,
            choices=choices,
            trigger=script_args.answer_trigger,
            max_new_tokens=script_args.max_new_tokens,
            max_samples=script_args.eval_max_samples,
        )
        results["generation_accuracy"] = {k: accuracy[k] for k in ("accuracy", "correct", "total")}
        trainer.accelerator.print(
            f"Generation accuracy: {accuracy['accuracy']:.4f} ({accuracy['correct']}/{accuracy['total']})"
        )
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "heft_results.json"), "w") as handle:
            json.dump(results, handle, indent=2, default=float)
    trainer.accelerator.print(f"HEFT adapter saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return results


if __name__ == "__main__":
    sys.exit(main())
