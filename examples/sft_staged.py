"""HEFT with TRL: `StagedSFTTrainer` runs the LoRA stage then the ReFT stage, then we evaluate and reload.

What it shows, offline (nothing is downloaded):

1. a prompt-completion dataset (the synthetic review -> pos/neg task of `plain_pytorch.py`) as a `datasets.Dataset`;
2. `HeftSFTConfig` (every `SFTConfig` option + per-stage epochs and learning rates) and `StagedSFTTrainer`, a drop-in
   for `trl.SFTTrainer` that takes a `HeftConfig`;
3. a `HeftCallback` that measures generation accuracy (greedy `generate`, answer match) at each stage end;
4. `trainer.save_model()` and reloading the adapter with `PeftModel.from_pretrained`, with the same accuracy.

Run: `.venv/bin/python examples/sft_staged.py` (about a minute on 2 CPU cores; `--fast` for a few steps).
The model is a tiny random Llama, so the point is the workflow; `examples/demo.py` (`make demo`) uses SmolLM2 and
real data.
"""

from __future__ import annotations

import argparse
import random
import sys
import warnings
from pathlib import Path

from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaForCausalLM, set_seed

sys.path.insert(0, str(Path(__file__).parent))
from plain_pytorch import make_example, make_tokenizer, tiny_llama_config  # noqa: E402  (the task and tokenizer of plain_pytorch.py)

from peft_heft import HeftCallback, HeftConfig, HeftSFTConfig, StagedSFTTrainer  # noqa: E402
from peft_heft.evaluation import evaluate_generation_accuracy  # noqa: E402

CHOICES = ["pos", "neg"]


class StageAccuracy(HeftCallback):
    """Generation accuracy on the held-out split at the end of each stage."""

    def __init__(self, tokenizer, dataset):
        self.tokenizer, self.dataset, self.results = tokenizer, dataset, {}

    def on_stage_end(self, args, state, control, stage=None, model=None, **kwargs):
        result = evaluate_generation_accuracy(model, self.tokenizer, self.dataset, choices=CHOICES, max_new_tokens=2)
        self.results[f"after {stage}"] = result["accuracy"]
        print(f"[stage {stage}] generation accuracy {result['accuracy']:.3f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="out/heft-sft-example")
    parser.add_argument("--fast", action="store_true", help="a few steps per stage (used by the tests)")
    cli = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    tok = make_tokenizer()
    rng = random.Random(0)
    rows = [make_example(rng) for _ in range(1200)]
    data = Dataset.from_list([{"prompt": p, "completion": " " + a} for p, a in rows])
    train, held_out = data.select(range(1000)), data.select(range(1000, 1200))

    base_dir = Path(cli.output_dir) / "tiny-base"
    config = tiny_llama_config(tok)
    set_seed(0)
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    args = HeftSFTConfig(
        output_dir=cli.output_dir,
        lora_num_train_epochs=3,
        reft_num_train_epochs=3,  # the paper's 3 + 3
        lora_max_steps=4 if cli.fast else None,
        reft_max_steps=4 if cli.fast else None,
        lora_learning_rate=1e-2,
        reft_learning_rate=1e-2,
        per_device_train_batch_size=32,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        max_length=64,
    )
    peft_config = HeftConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        intervention_layers="all",
        intervention_rank=4,
        intervention_positions="f3+l3",
    )
    held_out_eval = held_out.select(range(40)) if cli.fast else held_out
    stage_accuracy = StageAccuracy(tok, held_out_eval)
    trainer = StagedSFTTrainer(
        model=str(base_dir),
        args=args,
        train_dataset=train,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[stage_accuracy],
    )
    zero_shot = evaluate_generation_accuracy(trainer.model, tok, held_out_eval, choices=CHOICES, max_new_tokens=2)
    print(f"[zero-shot] generation accuracy {zero_shot['accuracy']:.3f}")
    output = trainer.train()
    trainer.save_model()
    print(
        f"LoRA stage: {output.metrics['lora_train_steps']} steps, {output.metrics['lora_train_runtime']:.1f}s; "
        f"ReFT stage: {output.metrics['reft_train_steps']} steps, {output.metrics['reft_train_runtime']:.1f}s"
    )

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), cli.output_dir)
    again = evaluate_generation_accuracy(reloaded, tok, held_out_eval, choices=CHOICES, max_new_tokens=2)
    print(
        f"adapter saved to {cli.output_dir}; reloaded with PeftModel.from_pretrained: accuracy {again['accuracy']:.3f}"
    )
    return {"zero-shot": zero_shot["accuracy"], **stage_accuracy.results, "reloaded": again["accuracy"]}


if __name__ == "__main__":
    main()
