"""GPU check of peft-heft: the checks a CPU machine cannot run, in one script of a few minutes on one GPU.

Run on a GPU machine, from the repository root::

    python benchmarks/gpu_check.py                 # writes benchmarks/results/gpu_check.{json,md}
    python benchmarks/gpu_check.py --out DIR       # elsewhere
    python benchmarks/gpu_check.py --cpu-smoke --out DIR   # every check's code path on CPU, float32, tiny model

On the embedded SmolLM2-135M-Instruct (no hub) with Rotten Tomatoes, on CUDA:

1. ``bf16_staged``: both stages in bfloat16 with ``StagedSFTTrainer``; the held-out loss (16 reviews) before
   training and after each stage must go down stage by stage (the first and last training losses of each stage are
   recorded too); the adapter saved and reloaded with the same logits;
2. ``qlora_staged``: the same on a 4-bit base (nf4, ``bnb_4bit_compute_dtype=torch.bfloat16``);
3. ``generate_cache``: greedy ``generate`` with ``use_cache=True`` gives the tokens of ``use_cache=False`` (left-padded
   batch, bfloat16, interventions on);
4. ``device_map``: with >= 2 visible GPUs, the decoder layers split over two of them (``device_map``) give the logits
   of the single-GPU model; skipped with one GPU;
5. ``step_ratios``: ``bench_core.py``'s step-time and tokens/s ratios, measured on the GPU with bench_core's own code
   (its SmolLM2 shape, float32 as there; timings taken around ``torch.cuda.synchronize()``);
6. ``padding_free``: with the fastest attention installed (flash-attention 2 when ``flash_attn`` imports, else sdpa),
   ``padding_free=True`` gives the per-step training losses of the padded run on the same batches (both stages), then
   ``benchmarks/padding_free.py``'s configurations (padded and padding-free HEFT, TRL + LoRA padding-free): tokens/s,
   peak memory and their ratios; the aims (>= 1.15x over padded, within 10% of TRL + LoRA) are reported apart from
   pass/fail;
7. ``fsdp2``: both stages under FSDP2 on every visible GPU (``examples/accelerate/fsdp2.yaml``, bf16 mixed precision,
   gradient checkpointing; ``accelerate/gpu_sharded_train.py``): the engine must really be FSDP2 (DTensor
   parameters), both stages train, and the saved adapter reloads in one process with the trained model's logits;
8. ``qlora_fsdp``: the same on a 4-bit nf4 base stored as bf16 (``bnb_4bit_quant_storage=torch.bfloat16``).

Tolerances (logits compared over a left-padded batch): float32: max |difference| <= 1e-5 x max |logit| and the same
argmax everywhere; bfloat16: max |difference| <= 2e-2 x max |logit| (bfloat16 keeps 8 significant bits, 2^-8 = 0.4%
per rounding, a few roundings apart) and argmax equal at >= 98% of positions. The QLoRA reload is held to the bfloat16
tolerance in every mode: TRL trains a quantized model's LoRA in bfloat16 and the reloaded LoRA layers are float32
(docs/qlora.md).

Without CUDA (and without ``--cpu-smoke``) it exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_core  # noqa: E402  (this folder's benchmark: its variants, timing rounds and ratios are reused)
import padding_free  # noqa: E402  (this folder's padded vs padding-free benchmark: its configurations are reused)

REPO = HERE.parent
EMBEDDED = "embedded:smollm2-135m-instruct"
NO_CUDA = (
    "gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False here). Run it on a GPU machine: "
    "python benchmarks/gpu_check.py; or run --cpu-smoke for the code paths on CPU."
)
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
ARGMAX_AGREEMENT = {torch.float32: 1.0, torch.bfloat16: 0.98}


class Setup:
    """Where the checks run: device, dtype, the base model's folder, the tokenizer and the data."""

    def __init__(self, cpu_smoke: bool, work: Path, steps: int):
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from peft_heft.assets import load_task_dataset, resolve_model_name_or_path

        self.cpu_smoke = cpu_smoke
        self.device = torch.device("cpu" if cpu_smoke else "cuda:0")
        self.dtype = torch.float32 if cpu_smoke else torch.bfloat16
        self.steps = steps
        self.work = work
        embedded = resolve_model_name_or_path(EMBEDDED)
        self.tokenizer = AutoTokenizer.from_pretrained(embedded)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if cpu_smoke:
            # tests/conftest.py's tiny Llama, with the SmolLM2 tokenizer's vocabulary; hidden 64 (bitsandbytes' CPU
            # 4-bit kernel needs in_features >= 64)
            torch.manual_seed(0)
            config = LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=len(self.tokenizer),
                max_position_embeddings=512,
                pad_token_id=self.tokenizer.pad_token_id,
                bos_token_id=self.tokenizer.bos_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            self.path = str(work / "tiny-llama")
            LlamaForCausalLM(config).save_pretrained(self.path)
            self.tokenizer.save_pretrained(self.path)  # benchmarks/padding_free.py loads model and tokenizer by path
        else:
            self.path = embedded
        batch = 2 if cpu_smoke else 8
        self.data = load_task_dataset("rotten_tomatoes", max_train=batch * steps, max_test=4 if cpu_smoke else 16)
        texts = [
            self.tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            for row in self.data["test"].select(range(4))
        ]
        self.tokenizer.padding_side = "left"
        self.batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        assert (self.batch["attention_mask"] == 0).any(), "the prompt batch should be left-padded"

    def base(self, **kwargs):
        from transformers import AutoModelForCausalLM

        if "device_map" in kwargs or "quantization_config" in kwargs:
            return AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype, **kwargs)
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype).to(self.device)

    def args(self, output_dir: Path, **overrides):
        from peft_heft import HeftSFTConfig

        settings = dict(
            output_dir=str(output_dir),
            lora_max_steps=self.steps,
            reft_max_steps=self.steps,
            lora_learning_rate=5e-4,
            reft_learning_rate=2e-3,
            per_device_train_batch_size=2 if self.cpu_smoke else 8,
            per_device_eval_batch_size=8,
            max_length=160 if self.cpu_smoke else 256,
            # SFTConfig turns gradient checkpointing on by default; with a 4-bit base prepared without it
            # (prepare_model_for_kbit_training(use_gradient_checkpointing=False)) the LoRA stage got no gradient
            gradient_checkpointing=False,
            merge_lora_before_reft=False,  # the trained model and the reloaded one compute LoRA the same way
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=self.cpu_smoke,
            bf16=not self.cpu_smoke,
            disable_tqdm=True,
            seed=0,
        )
        return HeftSFTConfig(**{**settings, **overrides})


def heft_config():
    from peft_heft import HeftConfig

    return HeftConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        intervention_layers="all",
        intervention_rank=4,
        intervention_positions="f5+l5",
    )


@torch.no_grad()
def logits(model, setup: Setup) -> torch.Tensor:
    model.eval()
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    batch = {k: v.to(device) for k, v in setup.batch.items()}
    out = model(**batch).logits.float().cpu()
    return out[setup.batch["attention_mask"].bool()]  # real positions only


def compare(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> dict:
    diff = (a - b).abs().max().item()
    scale = max(a.abs().max().item(), 1.0)
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return {
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "relative_diff": diff / scale,
        "argmax_agreement": agreement,
        "tolerance": {"relative": REL_TOL[dtype], "argmax_agreement": ARGMAX_AGREEMENT[dtype]},
        "pass": diff / scale <= REL_TOL[dtype] and agreement >= ARGMAX_AGREEMENT[dtype],
    }


def stage_losses(trainer) -> dict:
    """First logged training loss of each stage, the mean of its last 5 (logging_steps=1), its largest grad norm."""
    out = {}
    for stage in trainer.args.stage_order:
        losses = [e["loss"] for e in trainer.stage_log_history if e.get("stage") == stage and "loss" in e]
        grad_norms = [
            e["grad_norm"] for e in trainer.stage_log_history if e.get("stage") == stage and "grad_norm" in e
        ]
        out[stage] = {
            "train_loss_first_step": losses[0] if losses else None,
            "train_loss_last5_mean": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
            "steps_logged": len(losses),
            "grad_norm_max": max(grad_norms) if grad_norms else None,  # 0: the stage's parameters got no gradient
        }
    return out


def train_stages(setup: Setup, model, name: str) -> tuple[dict, object, Path]:
    """StagedSFTTrainer over both stages; returns the numbers, the trained model and the saved adapter's folder."""
    from peft_heft import StagedSFTTrainer

    out_dir = setup.work / name
    trainer = StagedSFTTrainer(
        model=model,
        args=setup.args(out_dir),
        train_dataset=setup.data["train"],
        eval_dataset=setup.data["test"],
        processing_class=setup.tokenizer,
        peft_config=None if hasattr(model, "peft_config") else heft_config(),
    )
    before = trainer.evaluate()["eval_loss"]
    t0 = time.perf_counter()
    metrics = trainer.train().metrics
    seconds = time.perf_counter() - t0
    per_stage = stage_losses(trainer)
    trained = trainer.model
    adapter = out_dir / "adapter"
    trained.save_pretrained(str(adapter))
    result = {
        "eval_loss_before": before,
        "eval_loss_after_lora": metrics.get("lora_eval_loss"),
        "eval_loss_after_reft": metrics.get("reft_eval_loss"),
        "stages": per_stage,
        "steps": {s: metrics.get(f"{s}_train_steps") for s in ("lora", "reft")},
        "train_seconds": seconds,
    }
    # trained: the held-out loss went down in each stage (the per-step training losses are on different batches)
    trained_ok = before > result["eval_loss_after_lora"] > result["eval_loss_after_reft"]
    result["trained"] = trained_ok
    return result, trained, adapter


def check_bf16_staged(setup: Setup, state: dict) -> dict:
    from peft import PeftModel

    result, trained, adapter = train_stages(setup, setup.base(), "bf16")
    reloaded = PeftModel.from_pretrained(setup.base(), str(adapter))
    result["reload"] = compare(logits(trained, setup), logits(reloaded, setup), setup.dtype)
    result["pass"] = result["trained"] and result["reload"]["pass"]
    state["adapter"], state["trained"] = adapter, trained
    return result


def quantized_base(setup: Setup):
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=setup.dtype)
    device_map = "cpu" if setup.cpu_smoke else {"": 0}
    base = setup.base(quantization_config=config, device_map=device_map)
    return base, prepare_model_for_kbit_training


def check_qlora_staged(setup: Setup, state: dict) -> dict:
    from peft import PeftModel, get_peft_model

    base, prepare = quantized_base(setup)
    weight_dtypes = sorted({str(p.dtype) for n, p in base.named_parameters() if "proj" in n})
    model = get_peft_model(prepare(base, use_gradient_checkpointing=False), heft_config())
    result, trained, adapter = train_stages(setup, model, "qlora")
    fresh, _ = quantized_base(setup)
    # prepared as the trained base was (prepare_model_for_kbit_training casts the norms and embeddings to float32)
    reloaded = PeftModel.from_pretrained(prepare(fresh, use_gradient_checkpointing=False), str(adapter))
    # bf16 LoRA (TRL's cast for quantized models) against the reloaded float32 LoRA layers: the bf16 tolerance
    result["reload"] = compare(logits(trained, setup), logits(reloaded, setup), torch.bfloat16)
    result["quantized_weight_dtypes"] = weight_dtypes
    result["pass"] = result["trained"] and result["reload"]["pass"]
    return result


@torch.no_grad()
def greedy(model, setup: Setup, use_cache: bool) -> torch.Tensor:
    model.eval()
    batch = {k: v.to(setup.device) for k, v in setup.batch.items()}
    out = model.generate(
        **batch,
        max_new_tokens=16,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=setup.tokenizer.pad_token_id,
    )
    return out[:, batch["input_ids"].shape[1] :].cpu()


def check_generate_cache(setup: Setup, state: dict) -> dict:
    model = state["trained"]
    cached, uncached = greedy(model, setup, True), greedy(model, setup, False)
    rows = (cached == uncached).all(-1)
    base = setup.base()
    base_rows = (greedy(base, setup, True) == greedy(base, setup, False)).all(-1)
    return {
        "rows": len(rows),
        "rows_equal": int(rows.sum()),
        "base_model_rows_equal": int(base_rows.sum()),  # the same comparison without HEFT, for reference
        "new_tokens": cached.shape[1],
        "dtype": str(setup.dtype),
        "pass": bool(rows.all()),
    }


def split_device_map(setup: Setup, devices: list) -> dict:
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(setup.path).num_hidden_layers
    first, second = devices
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "lm_head": first, "model.norm": second}
    for i in range(layers):
        device_map[f"model.layers.{i}"] = first if i < layers // 2 else second
    return device_map


def check_device_map(setup: Setup, state: dict) -> dict:
    from peft import PeftModel

    if setup.cpu_smoke:
        devices = ["cpu", "cpu"]  # the code path only: both halves on the CPU
    elif torch.cuda.device_count() >= 2:
        devices = [0, 1]
    else:
        return {"pass": None, "skipped": f"{torch.cuda.device_count()} GPU visible; needs >= 2", "gpus": 1}
    split = PeftModel.from_pretrained(setup.base(device_map=split_device_map(setup, devices)), str(state["adapter"]))
    single = PeftModel.from_pretrained(setup.base(), str(state["adapter"]))
    layer_devices = sorted({str(p.device) for n, p in split.named_parameters() if ".layers." in n})
    intervention_devices = sorted({str(p.device) for p in split.base_model.heft_interventions.parameters()})
    result = compare(logits(single, setup), logits(split, setup), setup.dtype)
    result.update(layer_devices=layer_devices, intervention_devices=intervention_devices, gpus=len(devices))
    if not setup.cpu_smoke:
        result["pass"] = result["pass"] and len(layer_devices) == 2
    return result


def check_step_ratios(setup: Setup, state: dict) -> dict:
    """bench_core's variants and ratios, moved onto the device and timed with a synchronize around each call."""
    shape = bench_core.SHAPES["quick" if setup.cpu_smoke else "smollm2"]
    variants = list(bench_core.STEP_VARIANTS) + list(bench_core.FORWARD_VARIANTS)
    bench = bench_core.Bench(shape, variants + list(bench_core.GENERATE_VARIANTS))
    errors = dict(bench.errors)
    device = setup.device
    for key, model in bench.models.items():
        model.set_device(device) if key == "pyreft" else model.to(device)
    if bench.base is not None:
        bench.base.to(device)
    for name in ("ids", "mask", "labels", "gen_ids", "gen_mask"):
        setattr(bench, name, getattr(bench, name).to(device))
    if hasattr(bench, "unit_locations"):
        bench.unit_locations = bench_core.pyreft_unit_locations(bench.mask.cpu(), shape)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn, tokens=None):
        def run(variant):
            sync()
            t0 = time.perf_counter()
            _, extra = fn(variant)
            sync()
            dt = time.perf_counter() - t0
            return dt, (tokens / dt if tokens else extra)

        return run

    runnable = [v for v in variants if v not in errors]
    warmup, repeats = (0, 1) if setup.cpu_smoke else (2, 10)
    t_start = time.perf_counter()
    timing = bench_core.interleaved(timed(bench.run), runnable, warmup, repeats, "steps", t_start)
    gen_raw = bench_core.interleaved(
        timed(bench.generate, shape["batch"] * shape["new"]),
        list(bench_core.GENERATE_VARIANTS),
        warmup,
        repeats,
        "generate",
        t_start,
    )
    generate = {"seconds": gen_raw["raw_s"], "tokens_per_s": gen_raw["extra"]}
    ratios, info = bench_core.compute_ratios(timing, generate, errors)
    steps = {v: bench_core.summarize(s) for v, s in timing["raw_s"].items() if s}
    return {
        "shape": shape,
        "dtype": "float32",
        "rounds": repeats,
        "warmup_rounds": warmup,
        "median_ms": {v: s["median"] * 1e3 for v, s in steps.items()},
        "generate_tokens_per_s": {v: bench_core.summarize(s)["median"] for v, s in gen_raw["extra"].items() if s},
        "ratios": ratios,
        "info_ratios": info,
        "errors": errors,
        "pass": all(r["pass"] is not False for r in ratios),
    }


def fastest_attention(setup: Setup) -> str:
    """flash-attention 2 (variable-length kernels: no compute across packed sequences) when installed, else sdpa."""
    if setup.cpu_smoke:
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


def check_padding_free(setup: Setup, state: dict) -> dict:
    """Padding-free HEFT: the per-step losses of the padded run on the same batches (both stages), then tokens/s and
    peak memory of benchmarks/padding_free.py's configurations (padded and padding-free HEFT, TRL + LoRA
    padding-free), with the fastest attention installed."""
    from transformers import AutoModelForCausalLM

    from peft_heft import StagedSFTTrainer

    attn = fastest_attention(setup)
    losses = {}
    for mode in ("padded", "padding_free"):
        model = AutoModelForCausalLM.from_pretrained(setup.path, dtype=setup.dtype, attn_implementation=attn)
        overrides = {"padding_free": True, "max_length": None} if mode == "padding_free" else {"max_length": None}
        trainer = StagedSFTTrainer(
            model=model.to(setup.device),
            args=setup.args(setup.work / f"padding_free_{mode}", **overrides),
            train_dataset=setup.data["train"],
            processing_class=setup.tokenizer,
            peft_config=heft_config(),
        )
        trainer.train()
        losses[mode] = [(e["stage"], e["loss"]) for e in trainer.stage_log_history if "loss" in e]
        del trainer, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    tolerance = 1e-4 if setup.dtype == torch.float32 else 2e-2
    worst = max(
        abs(a[1] - b[1]) / max(abs(a[1]), 1e-6) for a, b in zip(losses["padded"], losses["padding_free"], strict=True)
    )
    same_steps = [s for s, _ in losses["padded"]] == [s for s, _ in losses["padding_free"]]
    rows = 8 if setup.cpu_smoke else 96
    runs = {}
    for name in ("heft_padded", "heft_padding_free", "lora_padding_free"):
        device = "cpu" if setup.cpu_smoke else "cuda"
        runs[name] = padding_free.run_config(
            name, rows=rows, batch=2 if setup.cpu_smoke else 8, device=device, attn=attn, model=setup.path
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def tokens_per_s(name: str, stage: str) -> float:
        return runs[name]["stages"][stage]["tokens_per_s"]

    ratios = {
        "heft_padding_free/heft_padded (lora)": tokens_per_s("heft_padding_free", "lora")
        / tokens_per_s("heft_padded", "lora"),
        "heft_padding_free/heft_padded (reft)": tokens_per_s("heft_padding_free", "reft")
        / tokens_per_s("heft_padded", "reft"),
        "heft_padding_free (lora)/lora_padding_free": tokens_per_s("heft_padding_free", "lora")
        / tokens_per_s("lora_padding_free", "lora"),
        "heft_padding_free (reft)/lora_padding_free": tokens_per_s("heft_padding_free", "reft")
        / tokens_per_s("lora_padding_free", "lora"),
    }
    return {
        "attn_implementation": attn,
        "losses": losses,
        "loss_relative_diff_max": worst,
        "loss_tolerance": tolerance,
        "tokens_per_s": {f"{n}/{st}": tokens_per_s(n, st) for n in runs for st in runs[n]["stages"]},
        "peak_memory_mib": {n: r["peak_memory_mib"] for n, r in runs.items()},
        "speed_ratios": ratios,
        # the aims, reported apart from correctness: >= 1.15x over padded, within 10% of TRL + LoRA
        "meets_speed_aims": ratios["heft_padding_free/heft_padded (lora)"] >= 1.15
        and min(
            ratios["heft_padding_free (lora)/lora_padding_free"], ratios["heft_padding_free (reft)/lora_padding_free"]
        )
        >= 0.9,
        "pass": same_steps and worst <= tolerance,
    }


def check_fsdp2(setup: Setup, state: dict, qlora: bool = False) -> dict:
    """Both stages under FSDP2 on every visible GPU (bf16 mixed precision, gradient checkpointing), launched with
    examples/accelerate/fsdp2.yaml; the engine must really be FSDP2 (DTensor parameters), both stages must train, and
    the saved adapter must reload in this process with the trained model's logits."""
    import socket

    from peft import PeftModel

    out = setup.work / ("qlora_fsdp" if qlora else "fsdp2")
    processes = 2 if setup.cpu_smoke else max(torch.cuda.device_count(), 1)
    config = REPO / "examples" / "accelerate" / ("fsdp2_cpu.yaml" if setup.cpu_smoke else "fsdp2.yaml")
    with socket.socket() as probe:  # a free port: two launches in a row must not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", str(processes), "--main_process_port", str(port),
        str(HERE / "accelerate" / "gpu_sharded_train.py"), "--model", setup.path, "--out", str(out),
        "--steps", str(setup.steps),
    ]  # fmt: skip
    command += ["--qlora"] if qlora else []
    command += ["--cpu-smoke"] if setup.cpu_smoke else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if setup.cpu_smoke else dict(os.environ)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=480, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {
            "pass": False,
            "processes": processes,
            "error": f"launch failed ({proc.returncode}):\n" + proc.stderr[-4000:],
        }
    result = json.loads((out / "results.json").read_text())
    saved = torch.load(out / "logits.pt", weights_only=True)
    if qlora:
        base, _ = quantized_base(setup)
    else:
        base = setup.base()
    reloaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    device = next(p.device for p in reloaded.parameters() if p.device.type != "meta")
    with torch.no_grad():
        again = reloaded(**{k: v.to(device) for k, v in saved["batch"].items()}).logits.float().cpu()
    real = saved["batch"]["attention_mask"].bool()
    reload = compare(saved["logits"][real], again[real], setup.dtype if not qlora else torch.bfloat16)
    engine = result["engine"]
    really_fsdp2 = engine["dtensor_params"] > 0 and engine["fsdp_modules"] > 0
    both_stages = all(len(result["losses"][s]) == setup.steps for s in ("lora", "reft")) and result["losses_finite"]
    return {
        "processes": processes,
        "engine": {
            k: engine[k] for k in ("model_wrapped", "fsdp_modules", "dtensor_params", "intervention_fsdp_units")
        },
        "really_fsdp2": really_fsdp2,
        "losses_first_last": {s: (v[0], v[-1]) if v else None for s, v in result["losses"].items()},
        "trainable_dtypes": result["trainable_dtypes"],
        "reload": reload,
        "pass": really_fsdp2 and both_stages and reload["pass"],
    }


def check_qlora_fsdp(setup: Setup, state: dict) -> dict:
    """check_fsdp2 on a 4-bit nf4 base stored as bf16 (bnb_4bit_quant_storage), the QLoRA + FSDP recipe."""
    return check_fsdp2(setup, state, qlora=True)


CHECKS = {
    "bf16_staged": check_bf16_staged,
    "qlora_staged": check_qlora_staged,
    "generate_cache": check_generate_cache,
    "device_map": check_device_map,
    "step_ratios": check_step_ratios,
    "padding_free": check_padding_free,
    "fsdp2": check_fsdp2,
    "qlora_fsdp": check_qlora_fsdp,
}


def environment(setup: Setup) -> dict:
    import peft
    import transformers
    import trl

    import peft_heft

    cuda = torch.cuda.is_available()
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "cpu-smoke" if setup.cpu_smoke else "cuda",
        "gpu": torch.cuda.get_device_name(0) if cuda and not setup.cpu_smoke else None,
        "gpus_visible": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "bitsandbytes": bench_core._dist_version("bitsandbytes"),
        "peft_heft": peft_heft.__version__,
        "python": platform.python_version(),
        "model": "tiny random Llama (hidden 64, 2 layers), SmolLM2 tokenizer" if setup.cpu_smoke else EMBEDDED,
        "dtype": str(setup.dtype),
        "steps_per_stage": setup.steps,
    }


def numbers(result: dict) -> str:
    keys = (
        "eval_loss_before",
        "eval_loss_after_lora",
        "eval_loss_after_reft",
        "relative_diff",
        "argmax_agreement",
        "rows_equal",
        "base_model_rows_equal",
    )
    parts = [
        f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}" for k in keys if k in result
    ]
    if "reload" in result:
        parts.append(f"reload relative_diff={result['reload']['relative_diff']:.3g}")
    for stage, s in result.get("stages", {}).items():
        if s["train_loss_first_step"] is not None:
            parts.append(
                f"{stage} train loss {s['train_loss_first_step']:.3f} -> {s['train_loss_last5_mean']:.3f}, "
                f"max grad norm {s['grad_norm_max']}"
            )
    if "loss_relative_diff_max" in result:
        parts.append(
            f"padded vs padding-free per-step losses: max relative diff {result['loss_relative_diff_max']:.2g} "
            f"(tolerance {result['loss_tolerance']:g}), attention {result['attn_implementation']}"
        )
    for ratio, value in result.get("speed_ratios", {}).items():
        parts.append(f"tokens/s {ratio} {value:.3f}")
    if "meets_speed_aims" in result:
        parts.append(f"speed aims (>= 1.15x padded, >= 0.9x TRL+LoRA) met: {result['meets_speed_aims']}")
    for r in result.get("ratios", []):
        value = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        parts.append(f"{r['ratio']} {value} ({r['target']})")
    if "skipped" in result:
        parts.append(f"skipped: {result['skipped']}")
    if "error" in result:
        parts.append(f"error: {result['error'].splitlines()[0][:200]}")
    return "; ".join(parts)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# GPU check (`benchmarks/gpu_check.py`)",
        "",
        f"{env['mode']}, GPU: {env['gpu']} ({env['gpus_visible']} visible), torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}, trl {env['trl']}, bitsandbytes {env['bitsandbytes']}; "
        f"{env['model']}, {env['dtype']}, {env['steps_per_stage']} steps per stage; {env['date_utc']}.",
        "",
        "| check | pass | numbers |",
        "|---|---|---|",
    ]
    for name, result in report["checks"].items():
        verdict = {True: "yes", False: "**no**", None: "skipped"}[result.get("pass")]
        lines.append(f"| {name} | {verdict} | {numbers(result)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every check on CPU, float32, tiny model (seconds)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    parser.add_argument("--steps", type=int, default=None, help="steps per stage (default 40; --cpu-smoke: 3)")
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), default=None, help="run these checks only")
    cli = parser.parse_args(argv)
    if not cli.cpu_smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    out = Path(cli.out) if cli.out else REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        setup = Setup(cli.cpu_smoke, work, cli.steps or (3 if cli.cpu_smoke else 40))
        report = {"environment": environment(setup), "checks": {}}
        state: dict = {}
        for name, check in CHECKS.items():
            if cli.only and name not in cli.only and name not in ("bf16_staged",):
                continue  # bf16_staged always runs: the other checks use its adapter
            t0 = time.perf_counter()
            try:
                result = check(setup, state)
            except Exception:
                result = {"pass": False, "error": traceback.format_exc()}
            result["seconds"] = time.perf_counter() - t0
            report["checks"][name] = result
            print(f"{name}: pass={result['pass']} ({result['seconds']:.1f} s) {numbers(result)}", flush=True)
        stem = "gpu_check_cpu_smoke" if cli.cpu_smoke else "gpu_check"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        (out / f"{stem}.md").write_text(markdown(report), encoding="utf-8")
        print(f"wrote {out / stem}.json and .md")
        return 0 if all(r["pass"] is not False for r in report["checks"].values()) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
