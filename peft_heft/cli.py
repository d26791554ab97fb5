"""``heft-sft``: train a HEFT adapter with StagedSFTTrainer from the command line, like ``trl sft``.

Examples:
```bash
heft-sft --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --dataset_name data/train.jsonl \
    --output_dir out --lora_num_train_epochs 3 --reft_num_train_epochs 3 \
    --lora_target_modules q_proj v_proj --intervention_layers 2,4,6 --intervention_positions f7+l7
heft-sft --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --dataset_name embedded:strategyqa \
    --output_dir out --eval_accuracy --answer_choices yes,no   # offline: embedded model and data (peft_heft.assets)
heft-sft --config heft.yaml          # any option in YAML; flags override it
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig, ScriptArguments, TrlParser

from .assets.model import resolve_model_name_or_path
from .config import HeftConfig
from .trainer.config import HeftSFTConfig

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
            str,
            field(
                default="all",
                metadata={
                    "help": f.metadata["help"] + " On the command line: "
                    "'all', one index, or a comma list like '2,4,-1'."
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
        metadata={"help": "After training, report generation accuracy (answer match) on the eval split."},
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


def parse_layers(text):
    if isinstance(text, (list, tuple)):  # a YAML list
        return [int(v) for v in text]
    if isinstance(text, int):
        return text
    text = str(text).strip().strip("[]")
    if text.lower() == "all":
        return "all"
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(
            f"--intervention_layers {text!r}: use 'all', one index or a comma list like '2,4,-1'."
        ) from None
    return values[0] if len(values) == 1 else values


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


EMBEDDED_PREFIX = "embedded:"


def load_sft_dataset(name: str, config: str | None = None, streaming: bool = False):
    """A local json/jsonl/csv/parquet file, an embedded task (``embedded:strategyqa``, see ``peft_heft.assets``), a
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
    train_from_args(argv)
    # Under `accelerate launch`, leave the process group before exiting (what Accelerator.end_training does): a
    # process that exits with a gloo group alive can abort in its threads' teardown. A no-op in a single process.
    from accelerate.state import PartialState

    PartialState().destroy_process_group()
    return 0


def train_from_args(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` like ``heft-sft`` and run; returns the results written to ``heft_results.json``."""
    parser = TrlParser(
        # transformers annotates these as DataClassType, a NewType no plain dataclass matches
        (HeftScriptArguments, HeftSFTConfig, ModelConfig, HeftInterventionArguments),  # type: ignore[arg-type]
        prog="heft-sft",
        description=(
            "Train a HEFT adapter (LoRA stage, then ReFT stage) with StagedSFTTrainer. Every option below can also be "
            "set in a YAML file given with --config file.yaml; flags override the file. Key options: "
            "--model_name_or_path, --dataset_name (a .json/.jsonl/.csv/.parquet file or a dataset name), "
            "--output_dir, --stage_order, --lora_num_train_epochs/--reft_num_train_epochs (or *_max_steps), "
            "--lora_learning_rate/--reft_learning_rate, --lora_r/--lora_target_modules, --intervention_layers, "
            "--intervention_positions, --eval_accuracy --answer_choices yes,no."
        ),
    )
    script_args, training_args, model_args, heft_args = parser.parse_args_and_config(
        args=argv if argv is not None else sys.argv[1:]
    )
    return run(script_args, training_args, model_args, heft_args)


def run(script_args, training_args, model_args, heft_args) -> dict:
    from .evaluation import evaluate_generation_accuracy
    from .trainer.staged_sft import StagedSFTTrainer

    if not model_args.model_name_or_path:
        raise ValueError(
            "--model_name_or_path is required: a hub id or a local model folder (offline, the embedded "
            "HuggingFaceTB/SmolLM2-135M-Instruct: see `python -m peft_heft.assets`)."
        )
    if not script_args.dataset_name:
        raise ValueError("--dataset_name is required: a local .json/.jsonl/.csv/.parquet file or a dataset name.")
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
    wants_eval = training_args.eval_strategy != "no" or script_args.eval_accuracy
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

    trainer = StagedSFTTrainer(
        model=resolve_model_name_or_path(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation if wants_eval else None,
        peft_config=build_heft_config(model_args, heft_args),
    )
    output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    results = {"train": output.metrics}
    if script_args.eval_accuracy:
        choices = [c for c in (script_args.answer_choices or "").split(",") if c.strip()] or None
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
