"""Search HEFT's fine (ReFT) stage with Optuna from one coarse (LoRA) stage: `run_fine_stage_search`.

What it shows, offline (nothing is downloaded):

1. the coarse LoRA stage is trained once; each trial restores its weights in place and trains only the ReFT stage
   with the trial's layers, positions, rank, intervention type and learning rate;
2. every evaluation is reported to Optuna's pruner (here `MedianPruner`), so weak trials stop early;
3. the study is saved as `<output_dir>/search/study.json` and `study.png`, resumable from the sqlite storage;
4. the best trial's adapter is saved with `trainer.save_model()` and reloads with `PeftModel.from_pretrained`, with
   the eval loss the search reported.

Run: `.venv/bin/python examples/search_fine_stage.py` (a few minutes on 2 CPU cores; `--fast` for 3 short trials).
Needs `pip install optuna`. The model is a tiny random Llama (the task of `plain_pytorch.py`): the point is the
workflow.
"""

from __future__ import annotations

import argparse
import random
import sys
import warnings
from pathlib import Path

import optuna
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaForCausalLM, set_seed

sys.path.insert(0, str(Path(__file__).parent))
from plain_pytorch import make_example, make_tokenizer, tiny_llama_config  # noqa: E402  (the task and tokenizer of plain_pytorch.py)

from peft_heft import (  # noqa: E402
    FineStageSearchSpace,
    HeftConfig,
    HeftSFTConfig,
    StagedSFTTrainer,
    run_fine_stage_search,
)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="out/heft-search-example")
    parser.add_argument("--trials", type=int, default=None, help="trials of this run (default 12, 3 with --fast)")
    parser.add_argument("--fast", action="store_true", help="3 short trials (used by the tests)")
    cli = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    trials = cli.trials or (3 if cli.fast else 12)

    tok = make_tokenizer()
    rng = random.Random(0)
    rows = [make_example(rng) for _ in range(1200)]
    data = Dataset.from_list([{"prompt": p, "completion": " " + a} for p, a in rows])
    train, held_out = data.select(range(1000)), data.select(range(1000, 1200))
    if cli.fast:
        train, held_out = train.select(range(128)), held_out.select(range(32))

    base_dir = Path(cli.output_dir) / "tiny-base"
    set_seed(0)
    LlamaForCausalLM(tiny_llama_config(tok)).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    args = HeftSFTConfig(
        output_dir=cli.output_dir,
        lora_num_train_epochs=1 if cli.fast else 3,
        lora_learning_rate=1e-2,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        eval_strategy="steps",
        eval_steps=2 if cli.fast else 10,  # each evaluation is a report to the pruner
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=64,
        disable_tqdm=True,
    )
    peft_config = HeftConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    trainer = StagedSFTTrainer(
        model=str(base_dir),
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tok,
        peft_config=peft_config,
    )
    space = FineStageSearchSpace(
        layers=["all", "top_half", [0]],
        positions=[1, 3],
        ranks=[1, 4],
        learning_rate=(1e-3, 3e-2),
        epochs=[1] if cli.fast else [1, 2, 3],
    )
    storage = f"sqlite:///{Path(cli.output_dir).resolve() / 'search.db'}"
    study = run_fine_stage_search(
        trainer, trials, space, storage=storage, pruner=optuna.pruners.MedianPruner(n_startup_trials=2)
    )
    for trial in study.trials:
        value = f"{trial.value:.4f}" if trial.value is not None else "-"
        print(f"[trial {trial.number}] {trial.state.name.lower():9s} eval_loss {value} {trial.params}")
    print(f"[best] trial {study.best_trial.number} eval_loss {study.best_value:.6f} {study.best_params}")
    trainer.save_model()

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), cli.output_dir)
    evaluator = StagedSFTTrainer(
        model=reloaded, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tok
    )
    again = evaluator.evaluate()["eval_loss"]
    print(f"adapter saved to {cli.output_dir}; reloaded with PeftModel.from_pretrained: eval_loss {again:.6f}")
    return {"best_value": study.best_value, "reloaded_eval_loss": again}


if __name__ == "__main__":
    main()
