"""lm-evaluation-harness on a HEFT adapter: peft-heft's ``heft`` model against lm_eval's own ``hf`` model.

Trains a quick HEFT adapter on the embedded SmolLM2-135M-Instruct and Rotten Tomatoes (or takes ``--adapter``), writes
a local multiple-choice task over held-out reviews (context: the chat-rendered prompt; choices: the two answers with
the end-of-turn token, so each continuation has several tokens), and runs it with ``heft`` and ``hf`` at batch sizes
1 and 8. Reports accuracy and how far each run's log-likelihoods are from ``heft`` at batch size 1 (which equals a
direct scoring with the context's interventions: tests/test_lm_eval.py). Writes benchmarks/results/lm_eval_cpu.{json,md}.

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
    from lm_eval.tasks import TaskManager

    import peft_heft.lm_eval  # noqa: F401  (registers the heft model)
    from peft_heft.assets import EMBEDDED_MODEL, load_model_and_tokenizer, load_task_dataset
    from peft_heft.assets.model import embedded_model_dir

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
    runs = {}
    for model in ("heft", "hf"):
        for batch_size in (1, 8):
            start = time.perf_counter()
            results = lm_eval.simple_evaluate(
                model=model,
                model_args=f"pretrained={base},peft={adapter},dtype=float32",
                tasks=["heft_rt"],
                task_manager=TaskManager(include_path=str(work / "tasks")),
                batch_size=batch_size,
                device="cpu",
                log_samples=True,
            )
            samples = sorted(results["samples"]["heft_rt"], key=lambda s: s["doc_id"])
            runs[f"{model} bs{batch_size}"] = {
                "accuracy": results["results"]["heft_rt"]["acc,none"],
                "seconds": round(time.perf_counter() - start, 1),
                "loglikelihoods": [[float(r[0][0]) for r in s["resps"]] for s in samples],
            }
    reference = torch.tensor(runs["heft bs1"]["loglikelihoods"], dtype=torch.float64)
    table = []
    for name, run in runs.items():
        diff = (torch.tensor(run["loglikelihoods"], dtype=torch.float64) - reference).abs()
        run["max_abs_diff_vs_heft_bs1"] = float(diff.max())
        run["mean_abs_diff_vs_heft_bs1"] = float(diff.mean())
        run["docs_changed_over_1e-3"] = int((diff.max(dim=1).values > 1e-3).sum())
        table.append(
            f"| {name} | {run['accuracy']:.3f} | {run['mean_abs_diff_vs_heft_bs1']:.4g} | "
            f"{run['max_abs_diff_vs_heft_bs1']:.4g} | {run['docs_changed_over_1e-3']} / {len(rows)} | {run['seconds']} |"
        )
    payload = {
        "model": "SmolLM2-135M-Instruct (embedded), HEFT f5+l5, all layers, rank 4",
        "adapter": "given" if cli.adapter else f"quick: {cli.steps} + {cli.steps} steps on 128 reviews",
        "docs": len(rows),
        "torch": torch.__version__,
        "lm_eval": lm_eval.__version__,
        "runs": runs,
    }
    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [
        "# lm-evaluation-harness: `heft` vs lm_eval's `hf` on one HEFT adapter (CPU)",
        "",
        f"{payload['model']}; adapter: {payload['adapter']}; {len(rows)} held-out Rotten Tomatoes reviews as a "
        "multiple-choice task (choices `Negative<|im_end|>` / `Positive<|im_end|>`). Differences are per choice "
        "log-likelihood, in nats, against `heft` at batch size 1.",
        "",
        "| run | accuracy | mean abs diff | max abs diff | docs changed (> 1e-3) | seconds |",
        "|---|---|---|---|---|---|",
        *table,
        "",
        "Written by `python benchmarks/lm_eval_check.py`.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
