"""Merge LoRA into the weights, keep the interventions, and serve: same outputs, faster generation.

What it shows:

1. a trained HEFT adapter loaded with `PeftModel.from_pretrained` (inference stage "frozen");
2. `model.merge_adapter()`: LoRA folded into the base weights in place; interventions stay applied; logits unchanged;
3. greedy generation timed before and after merging (the merged model skips the LoRA branch);
4. why `merge_and_unload()` is refused while interventions are applied (they act on hidden states, not weights).

To serve: ship the base model and the adapter folder, and at start-up do what `main` below does
(`PeftModel.from_pretrained`, then `merge_adapter()` in memory); a merged model with interventions cannot be saved as
one checkpoint.

Run: `.venv/bin/python examples/merge_and_serve.py --adapter out/heft-demo` (after `make demo`), or without
`--adapter` to train a small one first (`--fast`: 2 steps per stage).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).parent))
from _quick_adapter import train_quick_adapter  # noqa: E402

from peft_heft.assets import EMBEDDED_MODEL, load_model_and_tokenizer, load_task_dataset  # noqa: E402


def timed_generate(model, batch, new_tokens: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="a saved HEFT adapter folder (default: train one into out/)")
    parser.add_argument("--output_dir", default="out/heft-merge-example")
    parser.add_argument("--fast", action="store_true", help="2 training steps per stage, short generation (tests)")
    cli = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    adapter = cli.adapter or train_quick_adapter("rotten_tomatoes", cli.output_dir, steps=2 if cli.fast else 24)
    new_tokens = 4 if cli.fast else 32

    base, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL)
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer.padding_side = "left"
    rows = load_task_dataset("rotten_tomatoes", max_test=8)["test"]
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    with torch.no_grad():
        before_logits = model(**batch).logits
    before, before_s = timed_generate(model, batch, new_tokens)
    model.merge_adapter()
    with torch.no_grad():
        after_logits = model(**batch).logits
    after, after_s = timed_generate(model, batch, new_tokens)
    max_diff = (before_logits - after_logits).abs().max().item()
    print(f"merged LoRA: max |logit difference| {max_diff:.2e}; same generated tokens: {torch.equal(before, after)}")
    print(f"generate {len(rows)} x {new_tokens} tokens: unmerged {before_s:.2f}s, merged {after_s:.2f}s")
    try:
        model.merge_and_unload()
        refused = ""
    except ValueError as error:
        refused = str(error)
        print(f"merge_and_unload() refused: {refused.split(':')[0]}")
    return {
        "max_logit_diff": max_diff,
        "same_tokens": torch.equal(before, after),
        "refused": refused,
        "unmerged_s": before_s,
        "merged_s": after_s,
    }


if __name__ == "__main__":
    main()
