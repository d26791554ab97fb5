"""Several HEFT adapters on one base model: load, switch, compare, disable.

What it shows:

1. two HEFT adapters for two tasks (movie-review sentiment and which party's candidate said a debate statement) on the embedded SmolLM2-135M;
2. `PeftModel.from_pretrained(base, a, adapter_name="sentiment")` + `model.load_adapter(b, adapter_name="party")`;
3. `model.set_adapter(name)`: only the active adapter's LoRA and interventions are applied;
4. `with model.disable_adapter():` the base model's output; `model.delete_adapter(name)`.

Run: `.venv/bin/python examples/multi_adapter.py` (trains two small adapters first; `--fast`: 2 steps per stage), or
pass `--sentiment DIR --party DIR` with adapters you trained.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).parent))
from _quick_adapter import train_quick_adapter  # noqa: E402

from peft_heft.assets import EMBEDDED_MODEL, load_model_and_tokenizer, load_task_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentiment", help="a HEFT adapter trained on rotten_tomatoes (default: train one)")
    parser.add_argument("--party", help="a HEFT adapter trained on debates (default: train one)")
    parser.add_argument("--output_dir", default="out/heft-multi-adapter-example")
    parser.add_argument("--fast", action="store_true", help="2 training steps per stage (used by the tests)")
    cli = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    steps = 2 if cli.fast else 24
    sentiment = cli.sentiment or train_quick_adapter("rotten_tomatoes", Path(cli.output_dir) / "sentiment", steps)
    party = cli.party or train_quick_adapter("debates", Path(cli.output_dir) / "party", steps)

    base, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL)
    model = PeftModel.from_pretrained(base, sentiment, adapter_name="sentiment")
    model.load_adapter(party, adapter_name="party")
    model.eval()
    prompt = load_task_dataset("rotten_tomatoes", max_test=1)["test"][0]["prompt"]
    inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    logits = {}
    with torch.no_grad():
        for name in ("sentiment", "party"):
            model.set_adapter(name)
            logits[name] = model(**inputs).logits[0, -1]
            answer = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1] :]
            print(f"active adapter {model.active_adapter!r}: {tokenizer.decode(answer, skip_special_tokens=True)!r}")
        with model.disable_adapter():
            logits["base"] = model(**inputs).logits[0, -1]
    differ = {
        "sentiment vs party": (logits["sentiment"] - logits["party"]).abs().max().item(),
        "sentiment vs base": (logits["sentiment"] - logits["base"]).abs().max().item(),
    }
    print("max |logit difference| at the last prompt token: " + ", ".join(f"{k} {v:.3f}" for k, v in differ.items()))
    model.delete_adapter("party")
    print(f"after delete_adapter('party'): adapters {sorted(model.peft_config)}")
    return {**differ, "adapters_after_delete": sorted(model.peft_config)}


if __name__ == "__main__":
    main()
