"""Preference tuning after SFT: `HeftDPOTrainer` trains a HEFT adapter's interventions with DPO, offline.

What it shows (the embedded SmolLM2-135M-Instruct and Rotten Tomatoes reviews, nothing downloaded):

1. a short `StagedSFTTrainer` run (LoRA, then ReFT), saved and loaded back with
   `PeftModel.from_pretrained(base, folder, is_trainable=True)`, the usual start of DPO (or `--sft_adapter DIR` to
   start from an adapter you trained);
2. a preference set built from the reviews: prompt = the review and the task's instruction, chosen = the right label
   word, rejected = the wrong one;
3. `HeftDPOTrainer` (TRL's `DPOTrainer`) training the interventions (`heft_stage="reft"`, LoRA frozen but applied),
   with the starting adapter as the reference; the interventions sit on the prompt of both sequences;
4. on held-out reviews, before and after DPO: the preference accuracy (log p(chosen) > log p(rejected)) and the
   classification accuracy of greedy generation; then the saved adapter reloaded, with the same numbers.

Run: `.venv/bin/python examples/dpo_rotten_tomatoes.py` (a few minutes on 2 CPU cores; a GPU is used when present).
`--fast` runs a few steps on a few reviews (used by the tests).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import torch
from peft import PeftModel

from peft_heft import HeftConfig, HeftDPOConfig, HeftDPOTrainer, HeftSFTConfig, StagedSFTTrainer
from peft_heft.assets import EMBEDDED_MODEL, TASKS, load_model_and_tokenizer, load_task_dataset
from peft_heft.evaluation import evaluate_generation_accuracy

TASK = "rotten_tomatoes"


def preference_set(dataset):
    """Prompt = the review with the instruction (a user message), chosen = the right label word, rejected = the other."""
    choices = TASKS[TASK].choices

    def pair(example):
        wrong = choices[1] if example["label"] == choices[0] else choices[0]
        return {
            "prompt": example["prompt"],
            "chosen": [{"role": "assistant", "content": example["label"].capitalize()}],
            "rejected": [{"role": "assistant", "content": wrong.capitalize()}],
        }

    return dataset.map(pair, remove_columns=dataset.column_names)


@torch.no_grad()
def answer_logps(model, tokenizer, pairs, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and the rejected answer, interventions on each review's prompt."""
    device = next(model.parameters()).device
    rows = []
    for example in pairs:
        prompt = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
        for answer in (example["chosen"], example["rejected"]):
            full = tokenizer.apply_chat_template(example["prompt"] + answer, tokenize=True)
            full = list(full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full)
            rows.append((full, len(prompt)))
    scores = []
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (row, _) in enumerate(chunk):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        lengths = torch.tensor([n for _, n in chunk])
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), intervention_prompt_lengths=lengths
        ).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        answer = (torch.arange(1, width).unsqueeze(0) >= lengths.unsqueeze(1)) & mask[:, 1:].bool()
        scores.append((logps.cpu() * answer).sum(dim=1))
    flat = torch.cat(scores)
    return flat[0::2], flat[1::2]


def measure(model, tokenizer, pairs, held_out, label: str) -> dict[str, float]:
    start = time.perf_counter()
    chosen, rejected = answer_logps(model, tokenizer, pairs)
    wins = int((chosen > rejected).sum())
    result = evaluate_generation_accuracy(
        model, tokenizer, held_out, choices=TASKS[TASK].choices, max_new_tokens=4, batch_size=16
    )
    print(
        f"[{label}] preference accuracy {wins / len(pairs):.3f} ({wins}/{len(pairs)}), classification accuracy "
        f"{result['accuracy']:.3f} ({result['correct']}/{result['total']}), mean margin "
        f"{float((chosen - rejected).mean()):.3f} nats ({time.perf_counter() - start:.0f}s)",
        flush=True,
    )
    return {"preference_accuracy": wins / len(pairs), "classification_accuracy": result["accuracy"]}


def sft_adapter(cli, data, device_kwargs) -> str:
    """A short LoRA-then-ReFT run with StagedSFTTrainer; returns the adapter folder."""
    folder = str(Path(cli.output_dir) / "sft")
    model, tokenizer = load_model_and_tokenizer(cli.model, **device_kwargs)
    args = HeftSFTConfig(
        output_dir=folder,
        lora_max_steps=2 if cli.fast else 16,
        reft_max_steps=2 if cli.fast else 16,
        lora_learning_rate=5e-4,
        reft_learning_rate=2e-3,
        per_device_train_batch_size=8,
        logging_steps=8,
        save_strategy="no",
        report_to="none",
        max_length=256,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        gradient_checkpointing=False,
        seed=0,
    )
    peft_config = HeftConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        intervention_layers="all",
        intervention_rank=4,
        intervention_positions="f5+l5",
    )
    trainer = StagedSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
    )
    output = trainer.train()
    trainer.save_model()
    print(
        f"SFT: LoRA {output.metrics['lora_train_steps']} + ReFT {output.metrics['reft_train_steps']} steps, "
        f"adapter saved to {folder}",
        flush=True,
    )
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help=f"hub id or local folder (default: {EMBEDDED_MODEL})")
    parser.add_argument("--sft_adapter", help="start from this HEFT adapter folder instead of a short SFT run")
    parser.add_argument("--train_size", type=int, default=128, help="reviews for SFT and for the preference set")
    parser.add_argument("--eval_size", type=int, default=64, help="held-out reviews")
    parser.add_argument("--dpo_steps", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="DPO learning rate of the interventions")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--output_dir", default="out/heft-dpo-example")
    parser.add_argument("--fast", action="store_true", help="16 reviews, 3 DPO steps, 8 held out (used by the tests)")
    cli = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if cli.fast:
        cli.train_size, cli.eval_size, cli.dpo_steps = 16, 8, 3
    wall = time.perf_counter()
    cuda = torch.cuda.is_available()
    device_kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32}

    data = load_task_dataset(TASK, max_train=2 * cli.train_size, max_test=cli.eval_size)
    sft_rows = data["train"].select(range(cli.train_size))
    dpo_rows = preference_set(data["train"].select(range(cli.train_size, 2 * cli.train_size)))
    held_out_pairs = preference_set(data["test"])
    print(
        f"{cli.model} on {TASK}: {len(sft_rows)} SFT reviews, {len(dpo_rows)} preference pairs, "
        f"{len(data['test'])} held-out reviews",
        flush=True,
    )

    folder = cli.sft_adapter or sft_adapter(cli, sft_rows, device_kwargs)
    base, tokenizer = load_model_and_tokenizer(cli.model, **device_kwargs)
    model = PeftModel.from_pretrained(base, folder, is_trainable=True).to("cuda" if cuda else "cpu")
    results = {"before DPO": measure(model, tokenizer, held_out_pairs, data["test"], "before DPO")}

    dpo_dir = str(Path(cli.output_dir) / "dpo")
    args = HeftDPOConfig(
        output_dir=dpo_dir,
        heft_stage="reft",  # the interventions; LoRA stays as SFT left it (frozen, applied)
        max_steps=cli.dpo_steps,
        learning_rate=cli.learning_rate,
        beta=cli.beta,
        per_device_train_batch_size=4,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_length=256,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        seed=0,
    )
    trainer = HeftDPOTrainer(model, args=args, train_dataset=dpo_rows, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(
        f"DPO loss first {losses[0]:.4f} -> last {losses[-1]:.4f} ({len(losses)} steps of "
        f"{args.per_device_train_batch_size} pairs, {time.perf_counter() - start:.0f}s; log 2 = {math.log(2):.4f} "
        "at the start, since the reference is the starting adapter)",
        flush=True,
    )
    trainer.save_model()
    results["after DPO"] = measure(model, tokenizer, held_out_pairs, data["test"], "after DPO")

    fresh, _ = load_model_and_tokenizer(cli.model, **device_kwargs)
    reloaded = PeftModel.from_pretrained(fresh, dpo_dir).to(model.device)
    chosen, rejected = answer_logps(reloaded, tokenizer, held_out_pairs)
    wins = int((chosen > rejected).sum())
    print(f"reloaded adapter: preference accuracy {wins / len(held_out_pairs):.3f} ({wins}/{len(held_out_pairs)})")
    print(f"DPO adapter saved to {dpo_dir} (starting adapter: {folder}); wall time {time.perf_counter() - wall:.0f}s")
    results["losses"] = {"first": losses[0], "last": losses[-1]}
    return results


if __name__ == "__main__":
    main()
