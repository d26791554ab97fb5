"""HEFT against LoRA-only and ReFT-only at a scale that can show something: learning curves on 1,000+ examples.

Run by hand from the repository root (after `make assets`); every run is resumable::

    python benchmarks/replicate_curves.py                 # 2 tasks x 2 seeds x 4 methods (hours on 2 CPU cores)
    python benchmarks/replicate_curves.py --seeds 0       # one seed first
    python benchmarks/replicate_curves.py --report        # rewrite the table, verdicts and plots from the JSON
    python benchmarks/replicate_curves.py --quick         # smoke run: tiny sizes, into out/

Model: the embedded SmolLM2-135M-Instruct (fp32). Tasks: Rotten Tomatoes (positive/negative reviews) and FEVER
(true/false claims), fixed splits of `peft_heft.assets`: the first `--train_size` training rows train, the next
`--val_size` training rows are the validation set the search selects on, and the first `--eval_size` test rows are
the held-out set every curve point is measured on (never used for selection). One prompt template and one evaluation
for every method: the chat template with the task's instruction, greedy generation of 4 tokens, the first answer word
matched.

Methods (one epoch = `train_size / batch_size` optimizer steps; 1,000 rows at batch 8 = 125 steps):

| method | stages | epochs | paper (BoolQ, Llama-2-7B) |
| --- | --- | --- | --- |
| lora | LoRA | `--long_epochs` (2) | LoRA-only, 20 epochs |
| reft | ReFT (LoReFT) | `--long_epochs` (2) | ReFT-only, 20 epochs |
| heft | LoRA, then ReFT on the merged LoRA model | `--short_epochs` (1) + (1) | HEFT, 3 + 3 epochs |
| heft_searched | LoRA once, then `run_fine_stage_search` (`--trials` trials, MedianPruner on validation loss), best kept | (1) + (1) per trial | - |

Every method's held-out accuracy is measured every `--eval_every` optimizer steps and at the end of each stage, and
plotted against its training time so far (evaluation time excluded; for HEFT-searched the whole search counts:
the coarse stage, every trial and the trials' validation passes). Results are written after every run into the JSON
and a finished run is skipped when found again, so an interrupted benchmark goes on where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import io
import json
import os
import shutil
import statistics
import subprocess
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
    from replicate_heft import log, peft_config, write  # noqa: E402  (the earlier replication's shared pieces)

    from peft_heft import HeftCallback, HeftSFTConfig, StagedSFTTrainer  # noqa: E402
    from peft_heft.assets import EMBEDDED_MODEL, TASKS, load_model_and_tokenizer, load_task_dataset  # noqa: E402
    from peft_heft.evaluation import evaluate_generation_accuracy  # noqa: E402

METHODS = {
    "lora": dict(stages=["lora"], label="LoRA-only"),
    "reft": dict(stages=["reft"], label="ReFT-only"),
    "heft": dict(stages=["lora", "reft"], label="HEFT"),
    "heft_searched": dict(stages=["lora", "reft"], label="HEFT-searched"),
}
DEFAULT_OUT, DEFAULT_STEM = REPO / "benchmarks" / "results", "replication_curves"
SETTINGS = (
    "model",
    "train_size",
    "val_size",
    "eval_size",
    "batch_size",
    "short_epochs",
    "long_epochs",
    "eval_every",
    "lora_r",
    "lora_lr",
    "reft_rank",
    "reft_lr",
    "positions",
    "trials",
    "max_steps",
    "threads",
)


class Clock:
    """Training time so far, evaluation excluded: this process's CPU time (the benchmark runs one compute thread, so
    this is its running time, unaffected by other load on the machine or by a pause) and the wall time."""

    def __init__(self) -> None:
        self.t0: tuple[float, float] | None = None
        self.excluded = [0.0, 0.0]

    @staticmethod
    def _read() -> tuple[float, float]:
        return time.process_time(), time.perf_counter()

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = self._read()

    def now(self) -> float:
        """CPU seconds of training so far."""
        return self.now_both()[0]

    def now_both(self) -> tuple[float, float]:
        if self.t0 is None:
            return 0.0, 0.0
        cpu, wall = self._read()
        return cpu - self.t0[0] - self.excluded[0], wall - self.t0[1] - self.excluded[1]

    @contextlib.contextmanager
    def paused(self):
        cpu, wall = self._read()
        try:
            yield
        finally:
            cpu2, wall2 = self._read()
            self.excluded[0] += cpu2 - cpu
            self.excluded[1] += wall2 - wall


class Curve(HeftCallback):
    """Held-out accuracy every `every` optimizer steps and at each stage's end, against training time so far."""

    def __init__(self, evaluate, clock: Clock, every: int, stages_to_measure: set[str] | None = None) -> None:
        self.evaluate, self.clock, self.every = evaluate, clock, every
        self.stages_to_measure = stages_to_measure  # None: every stage
        self.points: list[dict] = []
        self.stage: str | None = None
        self.last_step = -1

    def _measure(self, state, model) -> None:
        if state.global_step == self.last_step:
            return
        self.last_step = state.global_step
        at, wall = self.clock.now_both()
        start = time.perf_counter()
        with self.clock.paused():
            model.eval()
            result = self.evaluate(model)
            model.train()
        spent = time.perf_counter() - start
        self.points.append(
            {
                "stage": self.stage,
                "step": state.global_step,
                "train_seconds": at,
                "train_wall_seconds": wall,
                "loadavg_1min": os.getloadavg()[0],
                "accuracy": result["accuracy"],
                "correct": result["correct"],
                "total": result["total"],
                "eval_seconds": spent,
            }
        )
        log(f"  {self.stage} step {state.global_step}: accuracy {result['accuracy']:.3f} at {at:.0f}s")

    def _active(self) -> bool:
        return self.stages_to_measure is None or self.stage in self.stages_to_measure

    def on_stage_begin(self, args, state, control, stage=None, **kwargs):
        self.stage, self.last_step = stage, -1
        self.clock.start()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._active() and self.every > 0 and state.global_step % self.every == 0:
            self._measure(state, model)

    def on_stage_end(self, args, state, control, stage=None, model=None, **kwargs):
        if self._active():
            self._measure(state, model)


def search_space():
    from peft_heft.trainer.search import FineStageSearchSpace

    # the fine stage's own knobs; the schedule (epochs) is the same as HEFT's so the searched run costs trials only
    return FineStageSearchSpace(
        layers=["all", "every2", "top_half"],
        positions=[1, 3, 5, 7],
        share_weights=[False, True],
        ranks=[2, 4, 8],
        intervention_types=None,
        learning_rate=(1e-3, 1e-2),
        epochs=None,
    )


def run_one(args, task: str, method: str, seed: int, data, work: Path) -> dict:
    stages = METHODS[method]["stages"]
    epochs = args.long_epochs if len(stages) == 1 else args.short_epochs
    choices = list(TASKS[task].choices)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)

    def evaluate(m) -> dict:
        return evaluate_generation_accuracy(
            m, tokenizer, data["test"], choices=choices, max_new_tokens=4, batch_size=32
        )

    searched = method == "heft_searched"
    steps_per_epoch = -(-len(data["train"]) // args.batch_size)
    output_dir = work / f"{task}-{method}-{seed}"
    # a run starts from scratch: an earlier, interrupted run's search folder would hand the search a trained coarse
    # stage, whose time this run would then not count
    shutil.rmtree(output_dir, ignore_errors=True)
    train_args = HeftSFTConfig(
        output_dir=str(output_dir),
        stage_order=stages,
        lora_num_train_epochs=epochs,
        reft_num_train_epochs=epochs,
        lora_max_steps=args.max_steps or -1,
        reft_max_steps=args.max_steps or -1,
        lora_learning_rate=args.lora_lr,
        reft_learning_rate=args.reft_lr,
        merge_lora_before_reft=not searched,  # the search restores the unmerged coarse weights between trials
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        logging_steps=10,
        eval_strategy="steps" if searched else "no",
        eval_steps=max(1, steps_per_epoch // 4),
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
    clock = Clock()
    curve = Curve(evaluate, clock, args.eval_every, {"lora"} if searched else None)
    trainer = StagedSFTTrainer(
        model=model,
        args=train_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"] if searched else None,
        processing_class=tokenizer,
        peft_config=peft_config(args),
        callbacks=[curve],
    )
    start = time.perf_counter()
    extra: dict = {}
    if searched:
        import optuna

        from peft_heft import run_fine_stage_search

        clock.start()
        study = run_fine_stage_search(
            trainer,
            args.trials,
            search_space(),
            metric="eval_loss",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
        )
        train_seconds, train_wall = clock.now_both()
        final = evaluate(trainer.model)
        curve.points.append(
            {
                "stage": "search",
                "step": None,
                "train_seconds": train_seconds,
                "train_wall_seconds": train_wall,
                "loadavg_1min": os.getloadavg()[0],
                "accuracy": final["accuracy"],
                "correct": final["correct"],
                "total": final["total"],
            }
        )
        log(f"  search best: accuracy {final['accuracy']:.3f} at {train_seconds:.0f}s")
        extra["search"] = {
            "best_params": study.best_trial.params,
            "best_value": study.best_value,
            "trials": [
                {
                    "number": t.number,
                    "state": t.state.name,
                    "value": t.value,
                    "params": t.params,
                    "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                    if t.datetime_complete and t.datetime_start
                    else None,
                }
                for t in study.trials
            ],
        }
    else:
        output = trainer.train()
        train_seconds, train_wall = clock.now_both()
        extra["train_loss"] = {s: output.metrics.get(f"{s}_train_loss") for s in stages}
        extra["steps"] = {s: output.metrics.get(f"{s}_train_steps") for s in stages}
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "stages": stages,
        "epochs_per_stage": epochs,
        "steps_per_epoch": steps_per_epoch,
        "curve": curve.points,
        "accuracy": curve.points[-1]["accuracy"],
        "train_seconds": train_seconds,
        "train_wall_seconds": train_wall,
        "wall_seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def zero_shot(args, task: str, data) -> dict:
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    result = evaluate_generation_accuracy(
        model, tokenizer, data["test"], choices=list(TASKS[task].choices), max_new_tokens=4, batch_size=32
    )
    labels = [row["label"] for row in data["test"]]
    majority = max(set(labels), key=labels.count)
    return {
        "task": task,
        "method": "zero_shot",
        "accuracy": result["accuracy"],
        "majority_label": majority,
        "majority_accuracy": labels.count(majority) / len(labels),
    }


def load_data(task: str, args) -> dict:
    splits = load_task_dataset(task, max_train=args.train_size + args.val_size, max_test=args.eval_size)
    train = splits["train"]
    if len(train) < args.train_size + args.val_size:
        raise SystemExit(f"{task} has {len(train)} training rows; --train_size + --val_size is more.")
    return {
        "train": train.select(range(args.train_size)),
        "validation": train.select(range(args.train_size, args.train_size + args.val_size)),
        "test": splits["test"],
    }


# ------------------------------------------------------------------------------------------------------------ report
def mean_curve(runs: list[dict]) -> list[dict]:
    """Point by point over seeds (every seed measures at the same steps): mean time, mean and min/max accuracy."""
    n = min(len(r["curve"]) for r in runs)
    out = []
    for i in range(n):
        points = [r["curve"][i] for r in runs]
        acc = [p["accuracy"] for p in points]
        out.append(
            {
                "stage": points[0]["stage"],
                "step": points[0]["step"],
                "train_seconds": statistics.mean(p["train_seconds"] for p in points),
                "accuracy": statistics.mean(acc),
                "accuracy_min": min(acc),
                "accuracy_max": max(acc),
            }
        )
    return out


def accuracy_at(curve: list[dict], seconds: float) -> float | None:
    """The accuracy of the last point measured at or before a training time (what a run stopped then would have:
    no value between two measurements is made up, and a search counts only once it has finished); None before the
    first point or past the last one."""
    if not curve or seconds > curve[-1]["train_seconds"] + 1e-9 or seconds < curve[0]["train_seconds"] - 1e-9:
        return None
    return [p for p in curve if p["train_seconds"] <= seconds + 1e-9][-1]["accuracy"]


def difference(a: float, b: float) -> float:
    """a - b, with float noise (a mean of 0.835 and 0.865 against 0.850) made 0: accuracies are multiples of
    1 / eval_size, far coarser than 1e-9, so a tie reads "ties" and "+0.000", never "beats" or "-0.000"."""
    delta = a - b
    return 0.0 if abs(delta) < 1e-9 else delta


def compared(delta: float, more: str, same: str, less: str) -> str:
    return same if delta == 0 else more if delta > 0 else less


def method_stats(method: str, runs: list[dict]) -> dict:
    """Final accuracy (mean, std, per seed), best point, training time and the mean curve of one method's runs."""
    finals = [r["accuracy"] for r in runs]
    return {
        "label": METHODS[method]["label"],
        "seeds": [r["seed"] for r in runs],
        "finals": finals,
        "accuracy_mean": statistics.mean(finals),
        "accuracy_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "best_accuracy_mean": statistics.mean(max(p["accuracy"] for p in r["curve"]) for r in runs),
        "train_seconds_mean": statistics.mean(r["train_seconds"] for r in runs),
        "curve": mean_curve(runs),
    }


def summarize(results: dict) -> dict:
    summary: dict = {}
    for task in sorted({r["task"] for r in results["runs"].values()}):
        task_runs = [r for r in results["runs"].values() if r["task"] == task]
        zero = next((r for r in task_runs if r["method"] == "zero_shot"), None)
        runs = {
            method: sorted((r for r in task_runs if r["method"] == method), key=lambda r: r["seed"])
            for method in METHODS
        }
        runs = {method: method_runs for method, method_runs in runs.items() if method_runs}
        methods = {method: method_stats(method, method_runs) for method, method_runs in runs.items()}
        summary[task] = {"zero_shot": zero, "methods": methods, "verdicts": verdicts(task, methods, zero, runs)}
    return summary


def verdicts(task: str, methods: dict, zero: dict | None, runs: dict) -> list[str]:
    """One line per comparison, each made on the seeds both methods have run (paired), at the end and at equal
    training time."""
    lines = []
    pairs = [
        ("heft", "lora"),
        ("heft", "reft"),
        ("heft_searched", "heft"),
        ("heft_searched", "lora"),
        ("heft_searched", "reft"),
    ]
    for a, b in pairs:
        if a not in methods or b not in methods:
            continue
        common = sorted(set(methods[a]["seeds"]) & set(methods[b]["seeds"]))
        if not common:
            continue
        ma, mb = (method_stats(m, [r for r in runs[m] if r["seed"] in common]) for m in (a, b))
        only = (
            "" if common == methods[a]["seeds"] == methods[b]["seeds"] else f" (on seed(s) {common}, which both have)"
        )
        delta = difference(ma["accuracy_mean"], mb["accuracy_mean"])
        ratio = ma["train_seconds_mean"] / max(mb["train_seconds_mean"], 1e-9)
        same_time = accuracy_at(mb["curve"], ma["train_seconds_mean"])
        text = (
            f"{task}: {ma['label']} ({ma['accuracy_mean']:.3f}, {ma['train_seconds_mean'] / 60:.1f} min) "
            f"{compared(delta, 'beats', 'ties', 'does not beat')} {mb['label']}'s final accuracy "
            f"({mb['accuracy_mean']:.3f}, {delta:+.3f}) at {ratio:.2f}x its training time"
        )
        if same_time is not None:
            d2 = difference(ma["accuracy_mean"], same_time)
            text += f"; at equal training time {mb['label']} had {same_time:.3f} ({d2:+.3f} for {ma['label']})"
        else:
            # the other way round: where the longer run stood when the shorter one ended
            a_then = accuracy_at(ma["curve"], mb["train_seconds_mean"])
            if a_then is not None:
                text += (
                    f"; at {mb['label']}'s training time ({mb['train_seconds_mean'] / 60:.1f} min) {ma['label']} had "
                    f"{a_then:.3f} ({difference(a_then, mb['accuracy_mean']):+.3f})"
                )
        n = min(len(ma["seeds"]), len(mb["seeds"]))
        spread = max(ma["accuracy_std"], mb["accuracy_std"])
        if n > 1 and abs(delta) <= spread:
            text += f"; the difference is within the seeds' spread (std up to {spread:.3f})"
        lines.append(text + only + ".")
    for name in ("heft", "heft_searched"):
        if name not in methods:
            continue
        coarse = [p for p in methods[name]["curve"] if p["stage"] == "lora"]
        if coarse:
            before, after = coarse[-1]["accuracy"], methods[name]["accuracy_mean"]
            change = difference(after, before)
            lines.append(
                f"{task}: {methods[name]['label']}'s fine stage "
                f"{compared(change, 'raises', 'keeps', 'lowers')} the accuracy its "
                f"coarse stage reached: {before:.3f} at the end of the LoRA stage, {after:.3f} at the end "
                f"({change:+.3f})."
            )
    if zero is not None and methods:
        best = max(methods.values(), key=lambda m: m["accuracy_mean"])
        if best["accuracy_mean"] <= zero["majority_accuracy"] + 0.02:
            lines.append(
                f"{task}: no method is more than 0.02 above the majority class ({zero['majority_accuracy']:.3f}): "
                "the model does not learn this task here."
            )
    return lines


def per_step_seconds(run: dict) -> float | None:
    steps = sum((run.get("steps") or {}).values())
    return run["train_seconds"] / steps if steps else None


def per_step_spread(results: dict) -> str:
    """How much the CPU time per step of one task and method varies between its runs (the cost of shared cores)."""
    groups: dict = {}
    for run in results["runs"].values():
        cost = per_step_seconds(run) if "curve" in run else None
        if cost is not None:
            groups.setdefault((run["task"], run["method"]), []).append(cost)
    spreads = [max(c) / min(c) - 1 for c in groups.values() if len(c) > 1]
    if not spreads:
        return "no task and method has two runs yet to compare"
    return f"runs of the same task and method differ by up to {100 * max(spreads):.0f}% in CPU s per step"


def markdown(results: dict, summary: dict, stem: str) -> str:
    s = results["setup"]
    steps = -(-s["train_size"] // s["batch_size"])
    lines = [
        "# HEFT learning curves at 1,000+ examples (SmolLM2-135M-Instruct, CPU)",
        "",
        f"{results.get('date_utc', '')} · {s['device']} · torch {s['torch']} · commit `{s.get('commit', '')[:10]}`",
        "",
        f"Model {s['model']} (embedded GGUF, dequantized to fp32). Train: the first {s['train_size']} training rows of "
        f"each task ({steps} optimizer steps per epoch at batch {s['batch_size']}); validation (the search's metric "
        f"only): the next {s['val_size']} training rows; held-out: the first {s['eval_size']} test rows (fixed splits "
        f"of peft_heft.assets). Linear schedule, 10% warmup. LoRA r={s['lora_r']} on q_proj/v_proj, lr {s['lora_lr']}; "
        f"LoReFT rank {s['reft_rank']} on all 30 layers, positions {s['positions']}, lr {s['reft_lr']}; HEFT merges "
        f"LoRA before its ReFT stage. LoRA-only and ReFT-only train {s['long_epochs']:g} epochs; HEFT "
        f"{s['short_epochs']:g} + {s['short_epochs']:g}; HEFT-searched trains the same LoRA stage once, then "
        f"{s['trials']} fine-stage trials of {s['short_epochs']:g} epoch(s) (layers, positions, weight sharing, rank, "
        "intervention type, learning rate; TPE sampler, median pruner on validation loss every quarter epoch) and "
        "keeps the best. Its LoRA stage has HEFT's settings and seed but is not the same run to the bit: its "
        "validation passes draw from the global random generator (each PyTorch DataLoader iteration draws a seed), "
        "so LoRA dropout gets other masks from the first validation pass on. Accuracy: greedy generation of 4 "
        "tokens, first answer word matched, measured every "
        f"{s['eval_every']} steps and at each stage's end; time: the training process's CPU time with one compute "
        "thread (other load on the machine does not stretch it as it stretches wall time, but a run that shared "
        f"the 2 cores pays more CPU time per step: {per_step_spread(results)}, see the per-run table), evaluation "
        "excluded, "
        f"the whole search included for HEFT-searched. Seeds {s['seeds']}; mean ± sample std over seeds.",
        "",
        "How the schedule maps to the paper's: the paper trains HEFT 3 + 3 epochs against 20 epochs of each single "
        f"method (BoolQ, about 9,400 rows). Here one epoch is {steps} steps and the CPU affords "
        f"{s['long_epochs']:g} epochs per single method: the single methods get {s['long_epochs'] / (2 * s['short_epochs']):.1f}x "
        "HEFT's epochs instead of the paper's 3.3x, and the curves show each single method at every point of its run, "
        "so each comparison is made both at the end and at equal training time (the accuracy last measured by then: "
        "nothing is interpolated, and HEFT-searched's search counts only once it has finished).",
        "",
        "<!-- --8<-- [start:results] -->",
        "| task | method | final accuracy (mean ± std) | per seed | best point (mean) | train time (min, mean) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task, t in summary.items():
        zero = t["zero_shot"]
        if zero is not None:
            lines.append(
                f"| {task} | majority class ('{zero['majority_label']}') | {zero['majority_accuracy']:.3f} | - | - | 0 |"
            )
            lines.append(f"| {task} | zero-shot | {zero['accuracy']:.3f} | - | - | 0 |")
        for m in t["methods"].values():
            spread = f" ± {m['accuracy_std']:.3f}" if len(m["seeds"]) > 1 else " (1 seed)"
            per_seed = ", ".join(f"{a:.3f}" for a in m["finals"])
            lines.append(
                f"| {task} | {m['label']} | {m['accuracy_mean']:.3f}{spread} | {per_seed} | "
                f"{m['best_accuracy_mean']:.3f} | {m['train_seconds_mean'] / 60:.1f} |"
            )
    lines += ["", "Verdicts (computed from the numbers above):", ""]
    for t in summary.values():
        lines += [f"- {v}" for v in t["verdicts"]]
    missing = [
        f"{task}/{method}/{seed}"
        for task in results["setup"]["tasks"]
        for seed in results["setup"]["seeds"]
        for method in results["setup"]["methods"]
        if f"{task}/{method}/{seed}" not in results["runs"]
    ]
    if missing:
        lines += ["", f"Not run yet ({len(missing)}): {', '.join(missing)}."]
    lines += ["<!-- --8<-- [end:results] -->", ""]
    lines += [
        "Every run (CPU s per step: training CPU time over optimizer steps, the validation passes of HEFT-searched "
        "included; runs that shared the 2 cores with another run or with tests show it as a higher cost per step; "
        "load: the mean 1-minute load average at the curve points):",
        "",
        "| run | final accuracy | train CPU min | wall min | CPU s per step | load |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, run in sorted(results["runs"].items()):
        if "curve" not in run:
            continue
        cost = per_step_seconds(run)
        per_step = f"{cost:.2f}" if cost is not None else "-"
        loads = [p["loadavg_1min"] for p in run["curve"] if p.get("loadavg_1min") is not None]
        load = f"{statistics.mean(loads):.1f}" if loads else "-"
        lines.append(
            f"| {key} | {run['accuracy']:.3f} | {run['train_seconds'] / 60:.1f} | {run['wall_seconds'] / 60:.1f} | "
            f"{per_step} | {load} |"
        )
    lines.append("")
    for task in summary:
        lines.append(f"![{task}: accuracy vs training time]({stem}_{task}.png)")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_dir: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"lora": "s-", "reft": "^-", "heft": "o-", "heft_searched": "D--"}
    for task, t in summary.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        zero = t["zero_shot"]
        if zero is not None:
            ax.axhline(zero["majority_accuracy"], color="gray", linestyle=":", linewidth=1, label="majority class")
            ax.axhline(zero["accuracy"], color="gray", linestyle="--", linewidth=1, label="zero-shot")
        for method, m in t["methods"].items():
            xs = [p["train_seconds"] / 60 for p in m["curve"]]
            ax.plot(
                xs,
                [p["accuracy"] for p in m["curve"]],
                styles[method],
                drawstyle="steps-post",  # the accuracy last measured, as the verdicts read it: nothing interpolated
                markersize=4,
                label=f"{m['label']} (n={len(m['seeds'])})",
            )
            if len(m["seeds"]) > 1:
                ax.fill_between(
                    xs,
                    [p["accuracy_min"] for p in m["curve"]],
                    [p["accuracy_max"] for p in m["curve"]],
                    step="post",
                    alpha=0.15,
                )
        ax.set_title(f"{task}: held-out accuracy vs training time (SmolLM2-135M, CPU)")
        ax.set_xlabel("training time (CPU min, one thread; evaluation excluded, search included)")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_{task}.png", dpi=110)
        plt.close(fig)


TASK_NAMES = {"rotten_tomatoes": "Rotten Tomatoes", "fever": "FEVER"}
README_START, README_END = "<!-- replication_curves:start -->", "<!-- replication_curves:end -->"


def readme_block(results: dict, summary: dict) -> str:
    """The README's summary table: final held-out accuracy (mean ± std over seeds) and training time per method."""
    s = results["setup"]
    long, short = f"{s['long_epochs']:g}", f"{s['short_epochs']:g}"
    columns = {
        "lora": f"LoRA-only {long} ep",
        "reft": f"ReFT-only {long} ep",
        "heft": f"HEFT {short}+{short} ep",
        "heft_searched": f"HEFT-searched ({s['trials']} trials)",
    }
    lines = [
        "| task | " + " | ".join(columns.values()) + " | majority class | zero-shot |",
        "|---|" + "---:|" * (len(columns) + 2),
    ]
    for task, t in summary.items():
        cells = []
        for method in columns:
            m = t["methods"].get(method)
            if m is None:
                cells.append("not run yet")
                continue
            minutes = f"{m['train_seconds_mean'] / 60:.1f} min"
            if len(m["seeds"]) > 1:
                cells.append(f"{m['accuracy_mean']:.3f} ± {m['accuracy_std']:.3f} ({minutes})")
            else:
                cells.append(f"{m['accuracy_mean']:.3f} (1 seed, {minutes})")
        zero = t["zero_shot"]
        tail = [f"{zero['majority_accuracy']:.3f}", f"{zero['accuracy']:.3f}"] if zero else ["-", "-"]
        lines.append(f"| {TASK_NAMES.get(task, task)} | " + " | ".join(cells + tail) + " |")
    seeds = sorted({r["seed"] for r in results["runs"].values() if "seed" in r})
    lines += [
        "",
        f"Mean ± std over seeds {seeds}; time = training CPU minutes (one thread, evaluation excluded, the whole search "
        "included). Verdicts, computed from the numbers by the benchmark:",
        "",
    ]
    for t in summary.values():
        lines += [f"- {v}" for v in t["verdicts"]]
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> None:
    """Rewrite the README's replication table between its two markers (nothing else in the file changes)."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} block for the replication table.")
    readme.write_text(text[: start + len(README_START)] + "\n" + block + "\n" + text[end:])


def report(results: dict, out_dir: Path, stem: str, readme: Path | None = None) -> None:
    summary = summarize(results)
    results["summary"] = summary
    write(results, out_dir / f"{stem}.json")
    md = markdown(results, summary, stem)
    (out_dir / f"{stem}.md").write_text(md)
    plot(summary, out_dir, stem)
    if readme is not None:
        update_readme(readme, readme_block(results, summary))
    print(md)


class Store:
    """The results JSON, shared by every worker running this benchmark: each change re-reads the file under an
    exclusive lock and writes it atomically, and a run is claimed (a file naming the worker's pid) before it starts,
    so two workers never run the same run and neither loses the other's results."""

    def __init__(self, path: Path, claims: Path) -> None:
        self.path, self.claims = path, claims
        claims.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self):
        with open(self.claims / "results.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield json.loads(self.path.read_text()) if self.path.exists() else {"runs": {}}
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _claim_path(self, key: str) -> Path:
        return self.claims / (key.replace("/", "--") + ".pid")

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            return "replicate_curves" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False

    def claim(self, key: str) -> bool:
        """True when this worker takes `key`: not finished, and not claimed by another live worker."""
        with self.locked() as results:
            if key in results["runs"]:
                return False
            path = self._claim_path(key)
            if path.exists():
                with contextlib.suppress(ValueError):
                    if self._alive(int(path.read_text().strip() or 0)):
                        return False
            path.write_text(str(os.getpid()))
            return True

    def release(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._claim_path(key).unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "fever"], choices=sorted(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train_size", type=int, default=1000)
    parser.add_argument("--val_size", type=int, default=200)
    parser.add_argument("--eval_size", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--short_epochs", type=float, default=1)
    parser.add_argument("--long_epochs", type=float, default=2)
    parser.add_argument("--eval_every", type=int, default=50, help="held-out accuracy every N optimizer steps")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_lr", type=float, default=1e-3)
    parser.add_argument("--reft_rank", type=int, default=4)
    parser.add_argument("--reft_lr", type=float, default=4e-3)
    parser.add_argument("--positions", default="f5+l5")
    parser.add_argument("--trials", type=int, default=4, help="fine-stage trials of HEFT-searched")
    parser.add_argument("--max_steps", type=int, default=None, help="cap every stage (smoke runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--stem", default=DEFAULT_STEM)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "replication_curves")
    parser.add_argument("--quick", action="store_true", help="1 seed, 16/8/16 rows, 2 steps per stage, into out/")
    parser.add_argument("--report", action="store_true", help="only rewrite the table, verdicts and plots")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU-time clock is the run time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.train_size, args.val_size, args.eval_size = [0], 16, 8, 16
        args.max_steps, args.eval_every, args.trials = 2, 1, 2
        args.out, args.stem, args.work = REPO / "out", "replication_curves_quick", REPO / "out" / "curves_quick"
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.stem}.json"
    store = Store(json_path, args.work / "claims")
    # the committed results (default folder and name) also rewrite README.md's table; other runs leave it alone
    readme = REPO / "README.md" if (args.out, args.stem) == (DEFAULT_OUT, DEFAULT_STEM) else None
    if args.report:
        with store.locked() as results:
            if "setup" not in results:
                raise SystemExit(f"{json_path}: no runs to report; run the benchmark first (without --report).")
            report(results, args.out, args.stem, readme)
        return
    for task in args.tasks:  # a task whose data is missing stops the run now, not hours in, with how to get it
        try:
            load_task_dataset(task, max_train=1, max_test=1)
        except FileNotFoundError as error:
            raise SystemExit(f"--tasks {task}: {error}") from error
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    setup = {k: getattr(args, k) for k in SETTINGS}
    with store.locked() as results:
        old = results.get("setup")
        if old and any(old.get(k) != setup[k] for k in SETTINGS):
            changed = [k for k in SETTINGS if old.get(k) != setup[k]]
            raise SystemExit(f"{json_path} holds runs with other settings ({changed}); use --stem NAME for a new set.")
        device = (
            "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
        )
        merged = lambda key: sorted(set((old or {}).get(key, [])) | set(getattr(args, key)), key=str)  # noqa: E731
        results["setup"] = {
            **(old or {}),
            **setup,
            "tasks": merged("tasks"),
            "methods": [m for m in METHODS if m in merged("methods")],
            "seeds": merged("seeds"),
            "torch": torch.__version__,
            "commit": commit,
            "device": device,
        }
        results["date_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        write(results, json_path)
    started = time.perf_counter()
    # one seed of every task first, so that a partial run already compares the methods on both tasks; several
    # workers (one per core) may run this loop at once: each run is claimed by one of them
    for seed in args.seeds:
        for task in args.tasks:
            data = None
            for key in [f"{task}/zero_shot"] + [f"{task}/{method}/{seed}" for method in args.methods]:
                if not store.claim(key):
                    continue
                try:
                    data = data or load_data(task, args)
                    log(f"{key} ...")
                    if key.endswith("/zero_shot"):
                        run = zero_shot(args, task, data)
                    else:
                        run = run_one(args, task, key.split("/")[1], seed, data, args.work)
                    run["commit"], run["finished_utc"] = commit, datetime.datetime.now(datetime.UTC).isoformat()
                    with store.locked() as results:
                        results["runs"][key] = run
                        report(results, args.out, args.stem, readme)
                finally:
                    store.release(key)
                log(
                    f"{key}: accuracy {run['accuracy']:.3f}, train {run.get('train_seconds', 0) / 60:.1f} min, "
                    f"total {(time.perf_counter() - started) / 60:.1f} min"
                )


if __name__ == "__main__":
    main()
