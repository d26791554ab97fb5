"""Padded vs padding-free training: both HEFT stages against TRL + PEFT LoRA, tokens/s and peak memory.

Run from the repository root::

    python benchmarks/padding_free.py                # CPU: writes benchmarks/results/padding_free_cpu.{json,md}
    python benchmarks/padding_free.py --quick        # tiny rows/steps, writes nothing unless --out DIR
    python benchmarks/padding_free.py --device cuda  # on a GPU (gpu_check.py calls run_config the same way)

The embedded SmolLM2-135M-Instruct on Rotten Tomatoes with its chat template (the demo's data: prompt-completion,
conversational), every training row seen once per stage (``rows`` = ``steps`` x ``batch``, shuffled by the sampler
with the same seed in every configuration, so every configuration trains on the same tokens in the same batches).
Configurations, each in its own process (peak memory is the process's):

* ``heft_padded``: ``StagedSFTTrainer``, padded batches (TRL's default);
* ``heft_padding_free``: ``StagedSFTTrainer(padding_free=True)``;
* ``lora_padding_free``: TRL ``SFTTrainer`` + PEFT ``LoraConfig`` (HEFT's LoRA settings), ``padding_free=True``;
* ``lora_padded``: the same, padded (reference).

tokens/s counts the real tokens of the rows (no padding) over the wall time of the steps after the first of each
stage (the first carries one-off set-up). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's
peak resident set on CPU (model, data and Python included, so differences are what the comparison shows). Runs
alternate configurations over ``--repeats`` rounds; the report gives the median per configuration and the ratios
within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EMBEDDED = "embedded:smollm2-135m-instruct"
CONFIGS = ("heft_padded", "heft_padding_free", "lora_padded", "lora_padding_free")


class StepTimer:
    """A TrainerCallback (built lazily: transformers is imported in the worker only) timing every step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.steps: list[float] = []
                self.current: list[float] = []
                self._start = 0.0

            def on_train_begin(self, args, state, control, **kwargs):
                self.current = []
                self.steps.append(self.current)  # one list per stage (one train() call)

            def on_step_begin(self, args, state, control, **kwargs):
                _sync()
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _sync()
                self.current.append(time.perf_counter() - self._start)

        return _Timer()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_config(
    name: str, *, rows: int, batch: int, device: str, attn: str, seed: int = 0, model: str = EMBEDDED
) -> dict:
    """Train configuration ``name`` once in this process and return its timings and peak memory."""
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from peft_heft import HeftConfig, HeftSFTConfig, StagedSFTTrainer
    from peft_heft.assets import load_model_and_tokenizer, load_task_dataset

    torch.manual_seed(seed)
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model_name = model
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=dtype, attn_implementation=attn)
    data = load_task_dataset("rotten_tomatoes", max_train=rows)["train"].remove_columns("label")
    padding_free = name.endswith("padding_free")
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    common = dict(
        output_dir=str(REPO / "out" / "bench_padding_free" / name),
        per_device_train_batch_size=batch,
        max_length=None,  # TRL: padding-free without packing does not truncate; the rows are short anyway
        padding_free=padding_free,
        save_strategy="no",
        report_to="none",
        logging_steps=1_000_000,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    if cuda:
        model = model.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    if name.startswith("heft"):
        args = HeftSFTConfig(lora_num_train_epochs=1, reft_num_train_epochs=1, **common)
        config = HeftConfig(
            task_type="CAUSAL_LM",
            intervention_layers="all",
            intervention_rank=4,
            intervention_positions="f5+l5",
            **lora,
        )
        trainer = StagedSFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=config,
            callbacks=[timer],
        )
        stages = list(args.stage_order)
    else:
        args = SFTConfig(num_train_epochs=1, learning_rate=5e-4, **common)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
            callbacks=[timer],
        )
        stages = ["lora"]
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])  # real tokens of one pass
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"config": name, "tokens_per_stage": tokens, "peak_memory_mib": peak / 2**20, "stages": {}}
    for stage, steps in zip(stages, timer.steps, strict=True):
        timed = steps[1:]  # the first step of a stage carries one-off set-up
        share = tokens * len(timed) / len(steps)  # tokens of the timed steps (same batches in every config)
        result["stages"][stage] = {
            "steps": len(steps),
            "seconds_timed": sum(timed),
            "median_step_s": statistics.median(timed),
            "tokens_per_s": share / sum(timed),
        }
    return result


def _worker(cli) -> None:
    result = run_config(cli.worker, rows=cli.rows, batch=cli.batch, device=cli.device, attn=cli.attn)
    Path(cli.result).write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (e.g. flash_attention_2 on a GPU)")
    parser.add_argument("--rows", type=int, default=96, help="training rows (one pass per stage)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--quick", action="store_true", help="24 rows, 1 round: a smoke run")
    parser.add_argument("--out", default=None, help="folder for the results (default benchmarks/results)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    if cli.worker:
        _worker(cli)
        return 0
    if cli.quick:
        cli.rows, cli.repeats = 24, 1
    out = Path(cli.out) if cli.out else (None if cli.quick else HERE / "results")
    runs: dict[str, list[dict]] = {name: [] for name in cli.configs}
    result_file = REPO / "out" / "bench_padding_free.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    for round_ in range(cli.repeats):
        order = cli.configs if round_ % 2 == 0 else list(reversed(cli.configs))
        for name in order:
            command = [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--result",
                str(result_file),
                "--rows",
                str(cli.rows),
                "--batch",
                str(cli.batch),
                "--device",
                cli.device,
                "--attn",
                cli.attn,
            ]
            subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            runs[name].append(json.loads(result_file.read_text()))
            print(name, json.dumps(runs[name][-1]["stages"]), flush=True)
    report = summarize(runs, cli)
    print(report["markdown"])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = f"padding_free_{cli.device}"
        (out / f"{stem}.json").write_text(json.dumps({k: v for k, v in report.items() if k != "markdown"}, indent=2))
        (out / f"{stem}.md").write_text(report["markdown"])
    return 0


def summarize(runs: dict[str, list[dict]], cli) -> dict:
    import torch
    import transformers
    import trl

    median: dict[str, dict[str, float]] = {}
    for name, results in runs.items():
        for stage in results[0]["stages"]:
            median[f"{name}/{stage}"] = {
                "tokens_per_s": statistics.median(r["stages"][stage]["tokens_per_s"] for r in results),
                "median_step_s": statistics.median(r["stages"][stage]["median_step_s"] for r in results),
                "peak_memory_mib": statistics.median(r["peak_memory_mib"] for r in results),
            }

    def ratio(a: str, b: str) -> float | None:
        return median[a]["tokens_per_s"] / median[b]["tokens_per_s"] if a in median and b in median else None

    ratios = {
        "heft_padding_free/heft_padded (lora stage)": ratio("heft_padding_free/lora", "heft_padded/lora"),
        "heft_padding_free/heft_padded (reft stage)": ratio("heft_padding_free/reft", "heft_padded/reft"),
        "heft_padding_free/lora_padding_free (lora stage)": ratio("heft_padding_free/lora", "lora_padding_free/lora"),
        "heft_padding_free/lora_padding_free (reft stage)": ratio("heft_padding_free/reft", "lora_padding_free/lora"),
        "lora_padding_free/lora_padded": ratio("lora_padding_free/lora", "lora_padded/lora"),
    }
    first = next(iter(runs.values()))[0]
    meta = {
        "device": torch.cuda.get_device_name()
        if cli.device == "cuda"
        else f"CPU ({platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "attn_implementation": cli.attn,
        "rows": cli.rows,
        "batch": cli.batch,
        "repeats": cli.repeats,
        "tokens_per_stage": first["tokens_per_stage"],
    }
    lines = [
        f"# Padded vs padding-free training ({cli.device})",
        "",
        "Generated by `benchmarks/padding_free.py` (see its docstring). "
        + ", ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "| configuration / stage | tokens/s | median step (s) | peak memory (MiB) |",
        "|---|---|---|---|",
    ]
    for key, values in median.items():
        lines.append(
            f"| {key} | {values['tokens_per_s']:.0f} | {values['median_step_s']:.3f} | {values['peak_memory_mib']:.0f} |"
        )
    lines += ["", "| ratio of tokens/s (same run) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in ratios.items() if v is not None]
    return {"meta": meta, "median": median, "ratios": ratios, "runs": runs, "markdown": "\n".join(lines) + "\n"}


if __name__ == "__main__":
    sys.exit(main())
