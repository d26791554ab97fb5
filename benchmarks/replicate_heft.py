"""HEFT's claim at small scale: a short HEFT schedule (3+3 epochs) against LoRA-only and ReFT-only trained 20 epochs.

Run by hand from the repository root (after `make assets`)::

    python benchmarks/replicate_heft.py            # 3 methods x 2 seeds x 2 tasks, about 1 h on 2 CPU cores
    python benchmarks/replicate_heft.py --methods heft_long --seeds 0   # adds HEFT 20+20 (seed 0), about 30 min
    python benchmarks/replicate_heft.py --quick    # 2 tasks x 1 seed x a few steps: a smoke run into out/

Model: the embedded SmolLM2-135M-Instruct. Tasks: StrategyQA (yes/no questions, the closest to the paper's BoolQ)
and Rotten Tomatoes (positive/negative), fixed splits from `peft_heft.assets` (first `--train_size` rows of train,
first `--eval_size` rows of test). One prompt template and one evaluation for every method: the chat template with
the task's instruction, greedy generation of 4 tokens, first answer word matched (pyreft's BoolQ evaluation).

Methods (epochs = passes over the same training subset; the paper's 3 and 20 epochs kept as they are):

| method | stages | epochs | paper |
| --- | --- | --- | --- |
| zero-shot | - | 0 | - |
| lora_long | lora | 20 | LoRA-only 20 epochs |
| reft_long | reft | 20 | ReFT-only 20 epochs |
| heft_short | lora then reft | 3 + 3 | HEFT 3+3 epochs |
| heft_long | lora then reft | 20 + 20 | (optional, `--methods ... heft_long`) |

Every run is resumable: results are written after each run into the JSON and skipped when found again, so an
interrupted run goes on where it stopped. `--report` rewrites the markdown table and the plot from the JSON alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

with contextlib.redirect_stdout(io.StringIO()):
    from peft_heft import HeftCallback, HeftConfig, HeftSFTConfig, StagedSFTTrainer  # noqa: E402
    from peft_heft.assets import EMBEDDED_MODEL, TASKS, load_model_and_tokenizer, load_task_dataset  # noqa: E402
    from peft_heft.evaluation import evaluate_generation_accuracy  # noqa: E402

METHODS = {
    "lora_long": (["lora"], "long"),
    "reft_long": (["reft"], "long"),
    "heft_short": (["lora", "reft"], "short"),
    "heft_long": (["lora", "reft"], "long"),
}
LABELS = {
    "zero_shot": "zero-shot",
    "lora_long": "LoRA-only 20 ep",
    "reft_long": "ReFT-only 20 ep",
    "heft_short": "HEFT 3+3 ep",
    "heft_long": "HEFT 20+20 ep",
    "heft_short@lora": "HEFT 3+3, after LoRA stage",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StageAccuracy(HeftCallback):
    def __init__(self, evaluate):
        self.evaluate, self.results = evaluate, {}

    def on_stage_end(self, args, state, control, stage=None, model=None, **kwargs):
        self.results[stage] = self.evaluate(model)


def peft_config(args) -> HeftConfig:
    return HeftConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        intervention_layers="all",
        intervention_rank=args.reft_rank,
        intervention_positions=args.positions,
    )


def run_one(args, task: str, method: str, seed: int, data, work: Path) -> dict:
    stages, length = METHODS[method]
    epochs = args.short_epochs if length == "short" else args.long_epochs
    choices = list(TASKS[task].choices)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    eval_seconds = []

    def evaluate(m) -> dict:
        start = time.perf_counter()
        result = evaluate_generation_accuracy(
            m, tokenizer, data["test"], choices=choices, max_new_tokens=4, batch_size=32
        )
        eval_seconds.append(time.perf_counter() - start)
        return {"accuracy": result["accuracy"], "correct": result["correct"], "total": result["total"]}

    train_args = HeftSFTConfig(
        output_dir=str(work / f"{task}-{method}-{seed}"),
        stage_order=stages,
        lora_num_train_epochs=epochs,
        reft_num_train_epochs=epochs,
        lora_max_steps=args.max_steps or -1,
        reft_max_steps=args.max_steps or -1,
        lora_learning_rate=args.lora_lr,
        reft_learning_rate=args.reft_lr,
        merge_lora_before_reft=True,
        per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        max_length=256,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    stage_accuracy = StageAccuracy(evaluate)
    trainer = StagedSFTTrainer(
        model=model,
        args=train_args,
        train_dataset=data["train"],
        processing_class=tokenizer,
        peft_config=peft_config(args),
        callbacks=[stage_accuracy],
    )
    start = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - start
    train_seconds = sum(output.metrics.get(f"{s}_train_runtime", 0.0) for s in stages)
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "stages": stages,
        "epochs_per_stage": epochs,
        "steps": {s: output.metrics.get(f"{s}_train_steps") for s in stages},
        "train_loss": {s: output.metrics.get(f"{s}_train_loss") for s in stages},
        "accuracy": stage_accuracy.results[stages[-1]]["accuracy"],
        "stage_accuracy": stage_accuracy.results,
        "train_seconds": train_seconds,
        "stage_seconds": {s: output.metrics.get(f"{s}_train_runtime") for s in stages},
        "eval_seconds": eval_seconds,
        "wall_seconds": wall,
    }


def zero_shot(args, task: str, data) -> dict:
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    start = time.perf_counter()
    result = evaluate_generation_accuracy(
        model, tokenizer, data["test"], choices=list(TASKS[task].choices), max_new_tokens=4, batch_size=32
    )
    return {
        "task": task,
        "method": "zero_shot",
        "accuracy": result["accuracy"],
        "correct": result["correct"],
        "total": result["total"],
        "train_seconds": 0.0,
        "eval_seconds": [time.perf_counter() - start],
    }


# ------------------------------------------------------------------------------------------------------------ report
def summarize(results: dict) -> list[dict]:
    rows = []
    tasks = sorted({r["task"] for r in results["runs"].values()})
    for task in tasks:
        runs = [r for r in results["runs"].values() if r["task"] == task]
        groups: dict[str, list[dict]] = {}
        for r in runs:
            groups.setdefault(r["method"], []).append(r)
            if r["method"] == "heft_short" and "lora" in r.get("stage_accuracy", {}):
                groups.setdefault("heft_short@lora", []).append(
                    {
                        **r,
                        "accuracy": r["stage_accuracy"]["lora"]["accuracy"],
                        "train_seconds": r["stage_seconds"]["lora"],
                    }
                )
        for method in ["zero_shot", "lora_long", "reft_long", "heft_short@lora", "heft_short", "heft_long"]:
            group = groups.get(method)
            if not group:
                continue
            acc = [g["accuracy"] for g in group]
            secs = [g["train_seconds"] for g in group]
            rows.append(
                {
                    "task": task,
                    "method": method,
                    "label": LABELS[method],
                    "n": len(group),
                    "seeds": sorted(g.get("seed", 0) for g in group),
                    "accuracy_mean": statistics.mean(acc),
                    "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "train_seconds_mean": statistics.mean(secs),
                    "eval_total": group[0].get("total")
                    or group[0].get("stage_accuracy", {}).get(group[0].get("stages", ["lora"])[-1], {}).get("total"),
                }
            )
    return rows


def markdown(results: dict, rows: list[dict]) -> str:
    s = results["setup"]
    lines = [
        "# HEFT replication at small scale (SmolLM2-135M-Instruct, CPU)",
        "",
        f"{results.get('date_utc', '')} · {s['device']} · torch {s['torch']} · commit `{s.get('commit', '')[:10]}`",
        "",
        f"Model {s['model']} (embedded Q4_1 GGUF, dequantized to fp32). Training subset: first {s['train_size']} "
        f"training rows of each task; held-out: first {s['eval_size']} test rows (fixed splits of peft_heft.assets). "
        f"Batch {s['batch_size']}, linear schedule, 10% warmup; LoRA r={s['lora_r']} on q_proj/v_proj, lr "
        f"{s['lora_lr']}; LoReFT rank {s['reft_rank']} on all 30 layers, positions {s['positions']}, lr {s['reft_lr']}; "
        f"HEFT merges LoRA before its ReFT stage. Short = {s['short_epochs']} epochs per stage, long = "
        f"{s['long_epochs']} (the paper's 3 and 20). Seeds {s['seeds']}. Accuracy: greedy generation, first answer "
        "word matched; mean ± sample std over seeds. Train time: the stages' `train_runtime` (evaluation excluded).",
        "",
        "<!-- --8<-- [start:results] -->",
        "| task | method | accuracy (mean ± std) | seeds | train time (s, mean) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['label']} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {r['n']} | "
            f"{r['train_seconds_mean']:.0f} |"
        )
    lines += ["", "Does the paper's ordering hold here? (computed from the rows above)", ""]
    for task in sorted({r["task"] for r in rows}):
        by = {r["method"]: r for r in rows if r["task"] == task}
        short = by.get("heft_short")
        if not short:
            continue
        for other in ("lora_long", "reft_long"):
            if other in by:
                delta = short["accuracy_mean"] - by[other]["accuracy_mean"]
                time_ratio = short["train_seconds_mean"] / max(by[other]["train_seconds_mean"], 1e-9)
                verdict = "beats" if delta > 0 else "does not beat"
                lines.append(
                    f"- {task}: HEFT 3+3 {verdict} {LABELS[other]} ({delta:+.3f} accuracy) at "
                    f"{time_ratio:.2f}x its training time."
                )
        if "majority" in by:
            best = max((r for r in by.values() if r["method"] != "majority"), key=lambda r: r["accuracy_mean"])
            if best["accuracy_mean"] <= by["majority"]["accuracy_mean"] + 0.02:
                lines.append(
                    f"- {task}: no method is more than 0.02 above the majority class "
                    f"({by['majority']['accuracy_mean']:.3f}): the model does not learn this task here."
                )
    lines += ["<!-- --8<-- [end:results] -->", "", "![accuracy vs train time](replication.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    markers = {
        "zero_shot": "x",
        "lora_long": "s",
        "reft_long": "^",
        "heft_short": "o",
        "heft_long": "D",
        "heft_short@lora": ".",
    }
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in [r for r in rows if r["task"] == task]:
            if r["method"] == "majority":
                ax.axhline(r["accuracy_mean"], color="gray", linestyle="--", linewidth=1, label=r["label"])
                continue
            ax.errorbar(
                r["train_seconds_mean"] / 60,
                r["accuracy_mean"],
                yerr=r["accuracy_std"],
                fmt=markers[r["method"]],
                markersize=8,
                capsize=3,
                label=f"{r['label']} (n={r['n']})",
            )
        ax.set_title(task)
        ax.set_xlabel("training wall time (min, 2 CPU cores)")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("HEFT vs single-method PEFT, SmolLM2-135M-Instruct (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(results: dict, json_path: Path) -> None:
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, json_path)


def majority_rows(results: dict) -> list[dict]:
    """The accuracy of always answering the held-out split's most frequent label (no model involved)."""
    from collections import Counter

    rows = []
    for task in sorted({r["task"] for r in results["runs"].values()}):
        labels = load_task_dataset(task, max_train=1, max_test=results["setup"]["eval_size"])["test"]["label"]
        label, count = Counter(labels).most_common(1)[0]
        rows.append(
            {
                "task": task,
                "method": "majority",
                "label": f"majority class ('{label}')",
                "n": 1,
                "seeds": [],
                "accuracy_mean": count / len(labels),
                "accuracy_std": 0.0,
                "train_seconds_mean": 0.0,
                "eval_total": len(labels),
            }
        )
    return rows


def report(results: dict, out_dir: Path, stem: str) -> None:
    majority = {r["task"]: r for r in majority_rows(results)}
    rows = []
    for row in summarize(results):
        if row["method"] == "zero_shot" and row["task"] in majority:
            rows.append(majority.pop(row["task"]))
        rows.append(row)
    results["summary"] = rows
    write(results, out_dir / f"{stem}.json")
    (out_dir / f"{stem}.md").write_text(markdown(results, rows).replace("replication.png", f"{stem}.png"))
    plot(rows, out_dir / f"{stem}.png")
    print(markdown(results, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--tasks", nargs="+", default=["strategyqa", "rotten_tomatoes"], choices=sorted(TASKS))
    parser.add_argument(
        "--methods", nargs="+", default=["lora_long", "reft_long", "heft_short"], choices=list(METHODS)
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train_size", type=int, default=48)
    parser.add_argument("--eval_size", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--short_epochs", type=float, default=3)
    parser.add_argument("--long_epochs", type=float, default=20)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_lr", type=float, default=1e-3)
    parser.add_argument("--reft_rank", type=int, default=4)
    parser.add_argument("--reft_lr", type=float, default=4e-3)
    parser.add_argument("--positions", default="f5+l5")
    parser.add_argument("--max_steps", type=int, default=None, help="cap every stage (smoke runs)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--stem", default="replication")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "replication")
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 16 train / 16 eval, 2 steps per stage, into out/"
    )
    parser.add_argument("--report", action="store_true", help="only rewrite the table and plot from the JSON")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.train_size, args.eval_size, args.max_steps = [0], 16, 16, 2
        args.out, args.stem = REPO / "out", "replication_quick"
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.stem}.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {"runs": {}}
    if not args.report:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        setup = {k: v for k, v in vars(args).items() if k not in ("out", "work", "report", "quick", "stem")}
        setup.update(
            torch=torch.__version__,
            commit=commit,
            device="cuda"
            if torch.cuda.is_available()
            else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        )
        old = results.get("setup")
        keys = (
            "model",
            "train_size",
            "eval_size",
            "batch_size",
            "short_epochs",
            "long_epochs",
            "lora_r",
            "lora_lr",
            "reft_rank",
            "reft_lr",
            "positions",
            "max_steps",
        )
        if old and any(old.get(k) != setup[k] for k in keys):
            raise SystemExit(f"{json_path} holds runs with other settings; use --stem NAME for a new result set.")
        results["setup"] = {
            **(old or {}),
            **setup,
            "seeds": sorted(set((old or {}).get("seeds", [])) | set(args.seeds)),
        }
        results["date_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        for task in args.tasks:  # a task whose data is missing stops the run now, not hours in, with how to get it
            try:
                load_task_dataset(task, max_train=1, max_test=1)
            except FileNotFoundError as error:
                raise SystemExit(f"--tasks {task}: {error}") from error
        started = time.perf_counter()
        for task in args.tasks:
            data = load_task_dataset(task, max_train=args.train_size, max_test=args.eval_size)
            key = f"{task}/zero_shot"
            if key not in results["runs"]:
                results["runs"][key] = zero_shot(args, task, data)
                write(results, json_path)
                log(f"{key}: {results['runs'][key]['accuracy']:.3f}")
            for seed in args.seeds:
                for method in args.methods:
                    key = f"{task}/{method}/{seed}"
                    if key in results["runs"]:
                        continue
                    log(f"{key} ...")
                    results["runs"][key] = run_one(args, task, method, seed, data, args.work)
                    write(results, json_path)
                    r = results["runs"][key]
                    log(
                        f"{key}: accuracy {r['accuracy']:.3f} (stages {r['stage_accuracy']}), train "
                        f"{r['train_seconds']:.0f}s, total {(time.perf_counter() - started) / 60:.1f} min"
                    )
    report(results, args.out, args.stem)


if __name__ == "__main__":
    main()
