"""lm-evaluation-harness on a HEFT adapter: peft-heft's ``heft`` model against a direct scoring on the full prompt.

Trains a quick HEFT adapter on the embedded SmolLM2-135M-Instruct and Rotten Tomatoes (or takes ``--adapter``), writes
a local multiple-choice task over held-out reviews (context: the chat-rendered prompt, which ends in the template's
``"\\n"``; choices: the two answers with the end-of-turn token), and compares, per choice log-likelihood:

- ``heft`` at batch sizes 1 and 8, through ``lm_eval.simple_evaluate``;
- the direct scoring (no lm_eval) with the interventions on the full prompt, the ``"\\n"`` included, tokenized as
  training and ``generate()`` tokenize it (the reference);
- the direct scoring with the interventions on lm_eval's shortened context (the ``"\\n"`` moved into the
  continuation): what the ``heft`` model computed before it placed them by the full prompt;
- lm_eval's ``hf`` model at batch sizes 1 and 8, emulated (the whole row as the prompt, which is what its maskless
  ``model(inps)`` call makes of it): ``hf`` itself is stopped with an error, which is checked too.

Writes benchmarks/results/lm_eval_cpu.{json,md}.

    python benchmarks/lm_eval_check.py [--adapter DIR] [--docs 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

TASK = """task: heft_rt
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
target_delimiter: ""
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="a HEFT adapter folder for the embedded SmolLM2 (trained when omitted)")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per stage of the quick adapter")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_eval_cpu"))
    cli = parser.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import peft_heft.lm_eval  # noqa: F401  (registers the heft model)
    from peft_heft import compute_locations
    from peft_heft.assets import EMBEDDED_MODEL, load_model_and_tokenizer, load_task_dataset
    from peft_heft.assets.model import embedded_model_dir
    from peft_heft.prompt_tokens import PROMPT_LENGTHS_KWARG

    work = Path(tempfile.mkdtemp(prefix="heft-lm-eval-"))
    adapter = Path(cli.adapter) if cli.adapter else None
    if adapter is None:
        from _quick_adapter import train_quick_adapter

        adapter = train_quick_adapter("rotten_tomatoes", work / "adapter", steps=cli.steps)
    _, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL)
    test = load_task_dataset("rotten_tomatoes", max_test=cli.docs)["test"]
    end = tokenizer.eos_token
    rows = []
    for example in test:
        context = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
        choices = [f"Negative{end}", f"Positive{end}"]
        rows.append(
            {"context": context, "choices": choices, "label": ["negative", "positive"].index(example["label"])}
        )
    (work / "tasks").mkdir()
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "tasks" / "rt.yaml").write_text(TASK.format(data=work / "data.jsonl"))
    base = embedded_model_dir()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    spec = model.peft_config["default"].position_spec
    labels = torch.tensor([r["label"] for r in rows])

    class EmulatedHF(HFLM):
        """lm_eval's ``hf`` model as HEFT saw it before refusing it: every row, answer and padding included, is the
        prompt (what a call with no attention mask and no prompt lengths means to HEFT)."""

        def _model_call(self, inps, attn_mask=None, labels=None):
            with torch.no_grad():
                lengths = torch.full((inps.shape[0],), inps.shape[1])
                return self.model(input_ids=inps, **{PROMPT_LENGTHS_KWARG: lengths}).logits

    def run_lm_eval(lm, batch_size):
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=["heft_rt"],
            task_manager=TaskManager(include_path=str(work / "tasks"), include_defaults=False),
            batch_size=batch_size,
            log_samples=True,
        )
        samples = sorted(results["samples"]["heft_rt"], key=lambda s: s["doc_id"])
        scores = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        return scores, round(time.perf_counter() - start, 1)

    @torch.no_grad()
    def direct(full_prompt: bool):
        """Each (context, choice) alone; the tokens lm_eval scores (after the context without its trailing "\n")."""
        start = time.perf_counter()
        scores = []
        for row in rows:
            context = row["context"]
            shortened = len(tokenizer(context.rstrip())["input_ids"])
            prompt = len(tokenizer(context)["input_ids"]) if full_prompt else shortened
            doc = []
            for choice in row["choices"]:
                whole = tokenizer(context + choice)["input_ids"]
                if full_prompt:
                    assert whole[:prompt] == tokenizer(context)["input_ids"]
                ids = torch.tensor([whole])
                prompt_mask = (torch.arange(len(whole)) < prompt).long()[None]
                locations = compute_locations(spec, prompt_mask, 1, len(whole), share_weights=False)
                logits = model(input_ids=ids, intervention_locations=locations).logits[0, :-1]
                logp = torch.log_softmax(logits.double(), -1).gather(1, ids[0, 1:, None])[:, 0]
                doc.append(float(logp[shortened - 1 :].sum()))
            scores.append(doc)
        return scores, round(time.perf_counter() - start, 1)

    runs: dict[str, dict] = {}
    reference, seconds = direct(full_prompt=True)
    runs["direct, full prompt (reference)"] = {"loglikelihoods": reference, "seconds": seconds}
    for batch_size in (1, 8):
        lm = peft_heft.lm_eval.HeftLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
        scores, seconds = run_lm_eval(lm, batch_size)
        runs[f"heft bs{batch_size}"] = {"loglikelihoods": scores, "seconds": seconds}
    scores, seconds = direct(full_prompt=False)
    runs["direct, lm_eval's shortened context (heft before)"] = {"loglikelihoods": scores, "seconds": seconds}
    for batch_size in (1, 8):
        lm = EmulatedHF(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
        scores, seconds = run_lm_eval(lm, batch_size)
        runs[f"hf bs{batch_size} (emulated)"] = {"loglikelihoods": scores, "seconds": seconds}
    try:
        run_lm_eval(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu"), 8)
        hf_outcome = "ran (NOT stopped)"
    except RuntimeError as error:
        hf_outcome = "stopped: " + str(error).split(". ")[0]
    reference_t = torch.tensor(reference, dtype=torch.float64)
    table = []
    for name, run in runs.items():
        got = torch.tensor(run["loglikelihoods"], dtype=torch.float64)
        diff = (got - reference_t).abs()
        run["accuracy"] = float((got.argmax(dim=1) == labels).double().mean())
        run["max_abs_diff_vs_reference"] = float(diff.max())
        run["mean_abs_diff_vs_reference"] = float(diff.mean())
        run["docs_changed_over_1e-3"] = int((diff.max(dim=1).values > 1e-3).sum())
        table.append(
            f"| {name} | {run['accuracy']:.3f} | {run['mean_abs_diff_vs_reference']:.4g} | "
            f"{run['max_abs_diff_vs_reference']:.4g} | {run['docs_changed_over_1e-3']} / {len(rows)} | "
            f"{run['seconds']} |"
        )
    payload = {
        "model": "SmolLM2-135M-Instruct (embedded), HEFT f5+l5, all layers, rank 4",
        "adapter": "given" if cli.adapter else f"quick: {cli.steps} + {cli.steps} steps on 128 reviews",
        "docs": len(rows),
        "torch": torch.__version__,
        "lm_eval": lm_eval.__version__,
        "context_ends_with": rows[0]["context"][-24:],
        "lm_eval_hf_model": hf_outcome,
        "runs": runs,
    }
    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        "# lm-evaluation-harness: `heft` against a direct scoring on the full prompt, one HEFT adapter (CPU)",
        "",
        f"{payload['model']}; adapter: {payload['adapter']}; {len(rows)} held-out Rotten Tomatoes reviews as a "
        "multiple-choice task: context = the chat-rendered prompt (it ends in `<|im_start|>assistant\\n`, and lm_eval "
        "moves that `\\n` into the continuation), choices `Negative<|im_end|>` / `Positive<|im_end|>`. Differences "
        "are per choice log-likelihood, in nats, against the direct scoring with the interventions on the full prompt "
        "(the `\\n` included, as in training and `generate()`). lm_eval "
        f"{payload['lm_eval']}, torch {payload['torch']}.",
        "",
        "| run | accuracy | mean abs diff | max abs diff | docs changed (> 1e-3) | seconds |",
        "|---|---|---|---|---|---|",
        *table,
        "",
        f"lm_eval's own `hf` model on this adapter: {hf_outcome}.",
        "",
        "Written by `python benchmarks/lm_eval_check.py`.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
