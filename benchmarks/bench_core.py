"""Core CPU benchmark of peft-heft: training-step time, peak memory and generation speed.

Run by hand from the repository root::

    python benchmarks/bench_core.py            # full run (~50M-parameter Llama), writes benchmarks/results/core_cpu.{json,md}
    python benchmarks/bench_core.py --quick    # tiny model, 2 steps: a smoke run; writes nothing unless --out is given

What it measures (see benchmarks/README.md for the method and how to read the numbers):

* forward+backward time of one training step (median over interleaved repeats) for
  (a) the base model, forward only, no grad; (b) a plain PEFT LoRA step; (c) HEFT in stage "reft", LoRA unmerged;
  (d) the same after ``model.merge_adapter()``; (e) pyreft's LoReFT on the same layers and positions;
  (f) HEFT in stage "lora" (interventions off);
* forward-only time of HEFT with interventions on (stage "reft") and off (stage "lora"): the hooks' cost per forward,
  plus a micro-benchmark of the hook path alone (plan + per-layer hooks, forward and backward);
* greedy ``generate`` tokens/s for the base model, LoRA and HEFT (interventions on);
* peak memory of each step, as the peak-RSS increase of a fresh subprocess per variant (Linux ``/proc``);
* the ratios the project targets, with pass/fail.

All variants start from the same base weights; LoRA weights are identical in (b)-(d), (f), and pyreft's base in (e) is
that LoRA merged into the weights, with the same intervention weights as HEFT, so the losses of (c), (d), (e) agree and
are recorded as a consistency check.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints a notice about an optional backend on import
    import peft
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    import peft_heft
    from peft_heft.tuner.placement import find_backbone
    from peft_heft.tuner.positions import PositionSpec, compute_locations

    try:
        import pyreft
        import pyvene

        PYREFT_IMPORT_ERROR = None
    except Exception as exc:  # recorded in the results instead of a number
        pyreft = pyvene = None
        PYREFT_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

SHAPES = {
    # hidden 512, intermediate 1376, 8 layers, 8 heads (MHA), untied vocab 24000: 49,881,600 parameters
    "full": dict(hidden=512, intermediate=1376, layers=8, heads=8, vocab=24000, batch=8, seq=256, prompt=64, new=32),
    # the embedded SmolLM2-135M-Instruct (peft_heft.assets; tied embeddings, GQA 9/3 heads): issue 5's real model
    "smollm2": dict(
        model="embedded:smollm2-135m-instruct",  # by name: the hub id would mean the hub's weights
        hidden=576,
        intermediate=1536,
        layers=30,
        heads=9,
        vocab=49152,
        batch=8,
        seq=256,
        prompt=64,
        new=32,
    ),
    "quick": dict(hidden=64, intermediate=172, layers=2, heads=4, vocab=1000, batch=8, seq=32, prompt=16, new=8),
}
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
INTERVENTION_RANK = 4
POSITIONS = "f7+l7"
PAD, BOS, EOS = 0, 1, 2

STEP_VARIANTS = {
    "base_forward": "(a) base model, forward only (no grad)",
    "lora_step": "(b) LoRA-only training step (peft.LoraConfig)",
    "heft_reft_step": "(c) HEFT stage 'reft' training step, LoRA unmerged",
    "heft_reft_merged_step": "(d) HEFT stage 'reft' training step after merge_adapter()",
    "pyreft_step": "(e) pyreft LoReFT training step, same layers/positions",
    "heft_lora_step": "(f) HEFT stage 'lora' training step (interventions off)",
    "heft_reft_merged_top_step": "(g) as (d), interventions on the top half of the layers only",
}
FORWARD_VARIANTS = {
    "heft_reft_forward": "HEFT stage 'reft', forward only (no grad): interventions applied",
    "heft_lora_forward": "HEFT stage 'lora', forward only (no grad): hooks installed, interventions off",
}
GENERATE_VARIANTS = {
    "base_generate": "base model",
    "lora_generate": "LoRA-only",
    "heft_generate": "HEFT, interventions on (stage 'reft', LoRA unmerged)",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- model and data
def build_base(shape: dict) -> LlamaForCausalLM:
    torch.manual_seed(0)
    if shape.get("model"):
        from peft_heft.assets import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(shape["model"], dtype=torch.float32)
        c = model.config
        found = dict(
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            layers=c.num_hidden_layers,
            heads=c.num_attention_heads,
            vocab=c.vocab_size,
        )
        assert found == {k: shape[k] for k in found}, f"{shape['model']} has {found}"
        model.config.use_cache = False
        model.eval().requires_grad_(False)
        return model
    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        use_cache=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def left_padded_batch(batch: int, length: int, vocab: int, seed: int):
    """Random ids, some rows left-padded (real lengths 100%, 94%, 78%, 50%, ...), with mask and labels."""
    fractions = [1.0, 0.94, 1.0, 0.78, 1.0, 0.5, 1.0, 0.7]
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), PAD, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = max(16, int(length * fractions[row % len(fractions)]))
        n = min(n, length)
        ids[row, length - n :] = torch.randint(3, vocab, (n,), generator=g)
        ids[row, length - n] = BOS
        mask[row, length - n :] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def set_lora_weights(model: torch.nn.Module) -> None:
    """Deterministic non-zero LoRA weights (a 'trained' LoRA), identical for every model with the same LoRA names."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def pyreft_interventions(shape: dict) -> list:
    """pyreft LoReFT modules in layer order, (prefix, suffix) per layer: the reference weights for every variant."""
    torch.manual_seed(2)
    return [
        pyreft.LoreftIntervention(embed_dim=shape["hidden"], low_rank_dimension=INTERVENTION_RANK, dtype=torch.float32)
        for _ in range(shape["layers"])
        for _ in range(2)
    ]


def copy_into_heft(heft_model, interventions: list, shape: dict) -> None:
    ours = heft_model.base_model.heft_interventions["default"]
    keys = [f"layer{layer}_{side}" for layer in range(shape["layers"]) for side in ("first", "last")]
    assert sorted(ours.keys()) == sorted(keys), sorted(ours.keys())
    with torch.no_grad():
        for key, theirs in zip(keys, interventions, strict=True):
            ours[key].learned_source.load_state_dict(theirs.learned_source.state_dict())
            ours[key].rotate_layer.weight = theirs.rotate_layer.weight.detach().clone()


def build_lora(base, shape):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", **LORA))
    set_lora_weights(model)
    return model


def build_heft(base, shape, interventions, stage: str, merged: bool = False, layers="all"):
    config = peft_heft.HeftConfig(
        task_type="CAUSAL_LM",
        **LORA,
        intervention_layers=layers,
        intervention_rank=INTERVENTION_RANK,
        intervention_positions=POSITIONS,
    )
    model = peft.get_peft_model(copy.deepcopy(base), config)
    set_lora_weights(model)
    if interventions is not None and layers == "all":
        copy_into_heft(model, interventions, shape)
    model.base_model.set_stage(stage)
    if merged:
        model.merge_adapter()
    return model


def build_pyreft(base, shape, interventions):
    if pyreft is None:
        raise RuntimeError(f"pyreft cannot be imported: {PYREFT_IMPORT_ERROR}")
    merged_base = build_lora(base, shape).merge_and_unload()  # same function as HEFT's LoRA, folded in
    merged_base.requires_grad_(False)
    representations = [
        {"layer": i // 2, "component": "block_output", "low_rank_dimension": INTERVENTION_RANK, "intervention": m}
        for i, m in enumerate(interventions)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        reft = pyreft.get_reft_model(merged_base, pyreft.ReftConfig(representations=representations))
    modules = [reft.interventions[k] for k in reft.interventions]
    assert all(a is b for a, b in zip(modules, interventions, strict=True)), "pyreft reordered the interventions"
    return reft


def pyreft_unit_locations(mask: torch.Tensor, shape: dict):
    """pyvene unit_locations: one [batch][positions] list per intervention, (prefix, suffix) per layer.

    Positions are the first 7 and last 7 real tokens of each left-padded row, as HEFT computes them."""
    batch, seq = mask.shape
    locs = compute_locations(PositionSpec.parse(POSITIONS), mask, batch, seq, False)  # (B, 2, 7)
    assert (locs >= 0).all()
    first, last = locs[:, 0, :].tolist(), locs[:, 1, :].tolist()
    return {"sources->base": (None, [first, last] * shape["layers"])}


# ---------------------------------------------------------------------------------------------- steps
def zero_grads(params) -> None:
    for p in params:
        p.grad = None


class Bench:
    """Holds the models of the variants asked for and runs one measured call of each."""

    def __init__(self, shape: dict, variants: list[str]):
        self.shape = shape
        self.base = build_base(shape)
        self.n_params = count_parameters(self.base)
        self.ids, self.mask, self.labels = left_padded_batch(shape["batch"], shape["seq"], shape["vocab"], seed=3)
        self.gen_ids, self.gen_mask, _ = left_padded_batch(shape["batch"], shape["prompt"], shape["vocab"], seed=4)
        need = set(variants)
        self.interventions = pyreft_interventions(shape) if pyreft is not None else None
        self.models: dict[str, torch.nn.Module] = {}
        self.errors: dict[str, str] = {}
        if need & {"lora_step", "lora_generate"}:
            self.models["lora"] = build_lora(self.base, shape)
        if need & {"heft_reft_step", "heft_reft_forward", "heft_generate", "hook_micro"}:
            self.models["heft_reft"] = build_heft(self.base, shape, self.interventions, "reft")
        if need & {"heft_reft_merged_step"}:
            self.models["heft_reft_merged"] = build_heft(self.base, shape, self.interventions, "reft", merged=True)
        if need & {"heft_reft_merged_top_step"}:
            # the backward pass stops at the lowest intervened layer: how the reft step scales with that layer
            top = list(range(shape["layers"] // 2, shape["layers"]))
            self.models["heft_reft_merged_top"] = build_heft(self.base, shape, None, "reft", merged=True, layers=top)
        if need & {"heft_lora_step", "heft_lora_forward"}:
            self.models["heft_lora"] = build_heft(self.base, shape, self.interventions, "lora")
        if "pyreft_step" in need:
            try:
                self.models["pyreft"] = build_pyreft(self.base, shape, self.interventions)
                self.unit_locations = pyreft_unit_locations(self.mask, shape)
            except Exception as exc:
                self.errors["pyreft_step"] = f"{type(exc).__name__}: {exc}"
        if "base_forward" not in need and "base_generate" not in need:
            self.base = None
        gc.collect()

    def trainable(self, key: str) -> list[torch.nn.Parameter]:
        model = self.models[key]
        if key == "pyreft":
            return [p for m in model.interventions.values() for p in m.parameters() if p.requires_grad]
        return [p for p in model.parameters() if p.requires_grad]

    def describe_trainable(self) -> dict:
        out = {}
        for key in self.models:
            params = self.trainable(key)
            out[key] = {"tensors": len(params), "parameters": sum(p.numel() for p in params)}
        return out

    # one measured call each; returns (seconds, loss or None)
    def run(self, variant: str) -> tuple[float, float | None]:
        ids, mask, labels = self.ids, self.mask, self.labels
        if variant == "base_forward":
            with torch.inference_mode():
                t0 = time.perf_counter()
                self.base(input_ids=ids, attention_mask=mask)
                return time.perf_counter() - t0, None
        if variant in ("heft_reft_forward", "heft_lora_forward"):
            model = self.models[variant.replace("_forward", "")]
            model.eval()
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    model(input_ids=ids, attention_mask=mask)
                    return time.perf_counter() - t0, None
            finally:
                model.train()
        if variant == "pyreft_step":
            model = self.models["pyreft"]
            params = self.trainable("pyreft")
            zero_grads(params)
            model.train()
            t0 = time.perf_counter()
            _, out = model(
                base={"input_ids": ids, "attention_mask": mask},
                unit_locations=self.unit_locations,
                labels=labels,
                use_cache=False,
            )
            out.loss.backward()
            dt = time.perf_counter() - t0
            assert all(p.grad is not None for p in params)
            return dt, float(out.loss)
        key = variant.removesuffix("_step")
        model = self.models[key]
        params = self.trainable(key)
        zero_grads(params)
        model.train()
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        dt = time.perf_counter() - t0
        assert params and all(p.grad is not None for p in params), f"{variant}: no gradient"
        return dt, float(out.loss)

    def generate(self, variant: str) -> tuple[float, float]:
        shape = self.shape
        model = (
            self.base
            if variant == "base_generate"
            else self.models[{"lora_generate": "lora", "heft_generate": "heft_reft"}[variant]]
        )
        model.eval()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(
                input_ids=self.gen_ids,
                attention_mask=self.gen_mask,
                max_new_tokens=shape["new"],
                min_new_tokens=shape["new"],
                do_sample=False,
                use_cache=True,
                pad_token_id=PAD,
                eos_token_id=EOS,
            )
            dt = time.perf_counter() - t0
        model.train() if variant != "base_generate" else None
        assert out.shape == (shape["batch"], shape["prompt"] + shape["new"]), tuple(out.shape)
        return dt, shape["batch"] * shape["new"] / dt


# ---------------------------------------------------------------------------------------------- interleaved timing
def interleaved(run, variants: list[str], warmup: int, repeats: int, label: str, t_start: float) -> dict:
    """Interleaved rounds: every round runs each variant once, in a shuffled order (seeded). Warmup rounds dropped."""
    raw = {v: [] for v in variants}
    extra = {v: [] for v in variants}
    loadavg = []
    rng = random.Random(0)
    orders = []
    for rnd in range(warmup + repeats):
        order = list(variants)
        rng.shuffle(order)  # a fresh order every round: no variant always follows the same neighbour
        orders.append(order)
        for v in order:
            gc.collect()
            dt, x = run(v)
            if rnd >= warmup:
                raw[v].append(dt)
                extra[v].append(x)
        if rnd >= warmup:
            loadavg.append(os.getloadavg()[0])
        log(
            f"{label} round {rnd + 1}/{warmup + repeats} {'(warmup)' if rnd < warmup else ''} "
            f"elapsed {time.perf_counter() - t_start:.0f}s, 1-min load {os.getloadavg()[0]:.2f}"
        )
    return {
        "raw_s": raw,
        "extra": extra,
        "rounds": repeats,
        "warmup_rounds": warmup,
        "loadavg_1min": loadavg,
        "orders": orders,
    }


def summarize(samples: list[float]) -> dict:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "mean": statistics.fmean(samples),
        "n": len(samples),
    }


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-round ratios (both taken in the same round, so slow phases of the machine cancel)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


# ---------------------------------------------------------------------------------------------- hook micro-benchmark
def hook_micro(bench: Bench, repeats: int) -> dict:
    """Time HEFT's hook path alone on the benchmark's shapes: the per-forward plan and the per-layer hooks."""
    tuner = bench.models["heft_reft"].base_model
    hooks = tuner._hooks  # the tuner's LayerHooks (peft_heft.tuner.layer)
    shape = bench.shape
    b, t, d = shape["batch"], shape["seq"], shape["hidden"]
    layers = sorted(hooks.routes)

    def med(fn, n):
        for _ in range(3):
            fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    backbone = find_backbone(
        tuner.model
    )  # found once, as the hook is registered once: the lookup is not per-forward work

    def plan():
        hooks.plan_forward_hook(backbone, (), {"input_ids": bench.ids, "attention_mask": bench.mask})

    plan_s = med(plan, repeats)
    plan()  # leaves the plan in place for the layer hooks
    hidden = torch.randn(b, t, d, generator=torch.Generator().manual_seed(5))

    def chain(x):
        for layer in layers:
            x = hooks.layer_output_hook(layer, None, (), x)
        return x

    with torch.no_grad():
        hooks_fwd_s = med(lambda: chain(hidden), repeats)

    def hooks_fwd_bwd():
        x = hidden.clone().requires_grad_(True)
        chain(x).sum().backward()

    def baseline_fwd_bwd():  # the same leaf/sum/backward without the hooks
        x = hidden.clone().requires_grad_(True)
        (x * 1.0).sum().backward()

    fwd_bwd_s = med(hooks_fwd_bwd, repeats)
    baseline_s = med(baseline_fwd_bwd, repeats)

    # one intervention module alone, on the gathered slots of one group (B, 7, d), forward+backward
    module = tuner.heft_interventions["default"]["layer0_first"]
    x_small = torch.randn(b, 7, d)

    def module_fwd_bwd():
        module(x_small).sum().backward()

    module_s = med(module_fwd_bwd, repeats)

    # where the hook path's time goes: torch.profiler over repeated forward+backward passes of the hook chain
    from torch.profiler import ProfilerActivity, profile

    n_prof = max(3, repeats // 5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_prof):
            hooks_fwd_bwd()
    averages = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    top_ops = [
        {"op": e.key, "self_cpu_ms_per_pass": e.self_cpu_time_total / 1e3 / n_prof, "calls_per_pass": e.count / n_prof}
        for e in averages[:12]
    ]
    profiled_total = sum(e.self_cpu_time_total for e in averages) / 1e3 / n_prof
    rotation_s = med(lambda: module.rotate_layer.weight.sum().backward(), repeats)
    zero_grads(bench.trainable("heft_reft"))
    hooks.plan_forward_hook(backbone, (), {})  # no input ids: clears this context's plan
    n_mods = len(tuner.heft_interventions["default"])
    return {
        "repeats": repeats,
        "plan_forward_pre_hook_ms": plan_s * 1e3,
        "layer_hooks_forward_ms": hooks_fwd_s * 1e3,
        "layer_hooks_forward_backward_ms": (fwd_bwd_s - baseline_s) * 1e3,
        "layer_hooks_forward_backward_raw_ms": fwd_bwd_s * 1e3,
        "leaf_sum_backward_baseline_ms": baseline_s * 1e3,
        "one_intervention_forward_backward_ms": module_s * 1e3,
        "one_rotation_householder_forward_backward_ms": rotation_s * 1e3,
        "intervened_layers": len(layers),
        "intervention_modules": n_mods,
        "per_training_step_estimate_ms": (plan_s + fwd_bwd_s - baseline_s) * 1e3,
        "profile_passes": n_prof,
        "profile_total_self_cpu_ms_per_pass": profiled_total,
        "profile_top_ops": top_ops,
    }


# ---------------------------------------------------------------------------------------------- profiler
def profile_ops(bench: Bench, variants: list[str], steps: int = 3) -> dict:
    """torch.profiler over a few steps of each variant (per-step averages): self CPU time per op, and the ops that
    HEFT's reft step calls more often than the LoRA step (the hook path's ops), with their extra time."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for v in variants:
        bench.run(v)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                bench.run(v)
        ops = {}
        for e in prof.key_averages():
            ops[e.key] = {"self_cpu_ms": e.self_cpu_time_total / 1e3 / steps, "count": e.count / steps}
        tables[v] = ops
    result = {"steps_per_variant": steps, "top_self_cpu": {}}
    for v, ops in tables.items():
        top = sorted(ops.items(), key=lambda kv: -kv[1]["self_cpu_ms"])[:15]
        result["top_self_cpu"][v] = [{"op": k, **val} for k, val in top]
    ref = "lora_step"
    if ref in tables:
        for v in variants:
            if v == ref:
                continue
            diff = []
            for k in set(tables[v]) | set(tables[ref]):
                a = tables[v].get(k, {"self_cpu_ms": 0.0, "count": 0})
                b = tables[ref].get(k, {"self_cpu_ms": 0.0, "count": 0})
                diff.append(
                    {
                        "op": k,
                        "extra_self_cpu_ms": a["self_cpu_ms"] - b["self_cpu_ms"],
                        "count": a["count"],
                        "count_in_lora_step": b["count"],
                    }
                )
            diff = [r for r in diff if r["count"] > r["count_in_lora_step"]]  # ops the hooks add (more calls)
            diff.sort(key=lambda r: -r["extra_self_cpu_ms"])
            result[f"{v}_minus_{ref}"] = diff[:15]
            result[f"{v}_total_self_cpu_ms"] = sum(o["self_cpu_ms"] for o in tables[v].values())
        result[f"{ref}_total_self_cpu_ms"] = sum(o["self_cpu_ms"] for o in tables[ref].values())
    return result


# ---------------------------------------------------------------------------------------------- memory (subprocess)
def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def memory_worker(variant: str, shape_name: str) -> dict:
    """In a fresh process: build only this variant, then the peak RSS above the resident level during step 1 and 2."""
    bench = Bench(SHAPES[shape_name], [variant])
    if variant in bench.errors:
        return {"error": bench.errors[variant]}
    result = {}
    for step in (1, 2):
        gc.collect()
        resident = _proc_status("VmRSS")
        if not _reset_peak():
            return {"error": "cannot write /proc/self/clear_refs to reset the peak RSS"}
        bench.run(variant)
        peak = _proc_status("VmHWM")
        result[f"step{step}_resident_mib"] = resident / 2**20
        result[f"step{step}_peak_mib"] = peak / 2**20
        result[f"step{step}_peak_delta_mib"] = (peak - resident) / 2**20
    return result


def measure_memory(variants: list[str], shape_name: str, threads: int | None) -> dict:
    env = dict(os.environ)
    # a fixed mmap threshold: every allocation >= 64 KiB is its own mmap, returned to the OS when freed, so RSS
    # follows live tensor memory (glibc's default dynamic threshold keeps freed blocks in the heap)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = {}
    for v in variants:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-worker", v, "--shape", shape_name]
            + (["--threads", str(threads)] if threads else []),
            capture_output=True,
            text=True,
            env=env,
            cwd=str(REPO),
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_JSON ")]
        if proc.returncode != 0 or not lines:
            out[v] = {"error": f"worker exited {proc.returncode}: {proc.stderr[-2000:]}"}
        else:
            out[v] = json.loads(lines[-1][len("MEMORY_JSON ") :])
        log(f"memory {v}: {out[v]} ({time.perf_counter() - t0:.0f}s)")
    return out


# ---------------------------------------------------------------------------------------------- environment
def environment() -> dict:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "peft_heft"], capture_output=True, text=True, cwd=REPO
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = None, None
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "os_cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "torch_parallel_backend": torch.__config__.parallel_info().splitlines()[-1].strip(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_heft": peft_heft.__version__,
        "pyvene": getattr(pyvene, "__version__", "installed") if pyvene is not None else None,
        "pyreft": _dist_version("pyreft"),
        "git_commit": commit,
        "peft_heft_dirty": dirty,
        "loadavg_start": os.getloadavg(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }


def _dist_version(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------- report
TARGETS = [
    # name, numerator, denominator, comparison, target, what it says
    (
        "heft_reft_unmerged / lora_step",
        "heft_reft_step",
        "lora_step",
        "<=",
        1.05,
        "interventions add <= 5% to a LoRA-only step",
    ),
    (
        "heft_reft_merged / lora_step",
        "heft_reft_merged_step",
        "lora_step",
        "<=",
        1.05,
        "same, LoRA merged into the weights",
    ),
    (
        "heft_reft_merged / lora_step (<= 0.6)",
        "heft_reft_merged_step",
        "lora_step",
        "<=",
        0.6,
        "a reft-stage step with LoRA merged costs <= 0.6x a LoRA step (issue 5)",
    ),
    (
        "heft_generate_tps / lora_generate_tps",
        "heft_generate",
        "lora_generate",
        ">=",
        0.95,
        "generation with interventions >= 95% of LoRA-only tokens/s",
    ),
    (
        "heft_reft_unmerged / pyreft_step",
        "heft_reft_step",
        "pyreft_step",
        "<=",
        1.0,
        "HEFT's reft step no slower than pyreft's (HEFT still runs the unmerged LoRA branch, pyreft's base has it merged)",
    ),
    (
        "heft_reft_merged / pyreft_step",
        "heft_reft_merged_step",
        "pyreft_step",
        "<=",
        1.0,
        "HEFT's reft step no slower than pyreft's, like for like (neither runs a LoRA branch)",
    ),
]
INFO_RATIOS = [
    ("heft_reft_merged_top / lora_step", "heft_reft_merged_top_step", "lora_step"),
    ("base_forward / lora_step", "base_forward", "lora_step"),
    ("heft_lora_step / lora_step", "heft_lora_step", "lora_step"),
    ("heft_reft_unmerged / heft_lora_step", "heft_reft_step", "heft_lora_step"),
    ("pyreft_step / lora_step", "pyreft_step", "lora_step"),
    ("heft_reft_forward / heft_lora_forward", "heft_reft_forward", "heft_lora_forward"),
    ("heft_generate_tps / base_generate_tps", "heft_generate", "base_generate"),
    ("lora_generate_tps / base_generate_tps", "lora_generate", "base_generate"),
]


def compute_ratios(timing: dict, gen: dict, errors: dict) -> tuple[list, list]:
    med = {v: statistics.median(s) for v, s in timing["raw_s"].items() if s}
    raw = dict(timing["raw_s"])
    for v, s in gen["tokens_per_s"].items():
        med[v] = statistics.median(s)
        raw[v] = s
    rows = []
    for name, num, den, cmp, target, meaning in TARGETS:
        if num not in med or den not in med:
            missing = num if num not in med else den
            rows.append(
                {
                    "ratio": name,
                    "value": None,
                    "target": f"{cmp} {target}",
                    "pass": None,
                    "meaning": meaning,
                    "why_missing": errors.get(missing, f"{missing} not measured"),
                }
            )
            continue
        value = med[num] / med[den]
        paired = paired_ratio(raw[num], raw[den])
        ok = value <= target if cmp == "<=" else value >= target
        ok_paired = paired <= target if cmp == "<=" else paired >= target
        rows.append(
            {
                "ratio": name,
                "value": value,
                "paired_median": paired,
                "target": f"{cmp} {target}",
                "pass": ok,
                "pass_paired": ok_paired,
                "meaning": meaning,
            }
        )
    info = []
    for name, num, den in INFO_RATIOS:
        if num in med and den in med:
            info.append(
                {"ratio": name, "value": med[num] / med[den], "paired_median": paired_ratio(raw[num], raw[den])}
            )
    return rows, info


def fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    s = result["setup"]
    env = result["environment"]
    lines = [
        f"# peft-heft {'SmolLM2-135M' if s.get('model') else 'core'} CPU benchmark",
        "",
        f"{env['date_utc']} · {env['cpu_model']} · {env['cpus_usable']} usable CPUs · torch {env['torch']} "
        f"({env['torch_num_threads']} threads) · transformers {env['transformers']} · peft {env['peft']} · "
        f"pyreft {env['pyreft']} · commit `{(env['git_commit'] or '')[:10]}`"
        f"{' (peft_heft modified)' if env['peft_heft_dirty'] else ''}",
        "",
        (f"Model: **{s['model']}** (embedded copy, peft_heft.assets), " if s.get("model") else "Model: ")
        + f"Llama, hidden {s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, {s['heads']} heads, "
        f"vocab {s['vocab']}: **{s['parameters']:,} parameters**, fp32, CPU. Batch {s['batch']} x {s['seq']} tokens "
        f"(rows left-padded to {s['real_lengths']} real tokens). LoRA r={LORA['r']} on q_proj, v_proj; interventions "
        f"LoReFT rank {INTERVENTION_RANK} on all {s['layers']} layers' block output, positions {POSITIONS} "
        f"(2 interventions per layer). Timings: median of {result['timing']['rounds']} interleaved rounds after "
        f"{result['timing']['warmup_rounds']} warmup round(s); full run took {result['wall_s'] / 60:.1f} min. "
        f"1-minute load average during the timed rounds: {min(result['timing']['loadavg_1min']):.2f} to "
        f"{max(result['timing']['loadavg_1min']):.2f} (this benchmark alone is about 1-2 on {env['cpus_usable']} CPUs).",
        "",
        "## Step time and peak memory",
        "",
        "| variant | median ms | min ms | max ms | loss | peak RSS delta MiB (step 1 / step 2) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v, desc in {**STEP_VARIANTS, **FORWARD_VARIANTS}.items():
        st = result["steps"].get(v)
        mem = result["memory"].get(v, {})
        if mem.get("error"):
            mem_s = "error"
        elif mem:
            mem_s = f"{mem['step1_peak_delta_mib']:.0f} / {mem['step2_peak_delta_mib']:.0f}"
        else:
            mem_s = "-"
        if st is None:
            why = result["errors"].get(v, "not measured")
            lines.append(f"| {desc} | n/a ({why}) | | | | {mem_s} |")
            continue
        loss = st.get("loss")
        lines.append(
            f"| {desc} | {st['median'] * 1e3:.0f} | {st['min'] * 1e3:.0f} | {st['max'] * 1e3:.0f} | "
            f"{fmt(loss, 4) if loss is not None else '-'} | {mem_s} |"
        )
    lines += [
        "",
        "## Generation (greedy, use_cache=True)",
        "",
        f"Batch {s['batch']}, prompt {s['prompt']} tokens (some rows left-padded), {s['new']} new tokens; "
        f"tokens/s = batch x new tokens / wall time of `generate` (prefill included). Median of "
        f"{result['generate']['rounds']} interleaved rounds.",
        "",
        "| model | median tokens/s | min | max |",
        "|---|---:|---:|---:|",
    ]
    for v, desc in GENERATE_VARIANTS.items():
        tps = result["generate"]["tokens_per_s"].get(v)
        if tps:
            lines.append(f"| {desc} | {statistics.median(tps):.1f} | {min(tps):.1f} | {max(tps):.1f} |")
    lines += [
        "",
        "## Targets",
        "",
        "| ratio | value (ratio of medians) | median of per-round ratios | target | met |",
        "|---|---:|---:|---|---|",
    ]
    for r in result["ratios"]:
        met = "n/a" if r["pass"] is None else ("yes" if r["pass"] else "**no**")
        if r["pass"] is not None and r["pass"] != r["pass_paired"]:
            met += " (per-round: " + ("yes" if r["pass_paired"] else "no") + ")"
        extra = f" ({r['why_missing']})" if r.get("why_missing") else ""
        lines.append(
            f"| {r['ratio']} | {fmt(r['value'])}{extra} | {fmt(r.get('paired_median'))} | {r['target']} | {met} |"
        )
    lines += ["", "Other ratios (information):", "", "| ratio | value | per-round median |", "|---|---:|---:|"]
    for r in result["info_ratios"]:
        lines.append(f"| {r['ratio']} | {r['value']:.3f} | {r['paired_median']:.3f} |")
    h = result.get("hook_micro")
    if h:
        lines += [
            "",
            "## HEFT hook path in isolation",
            "",
            f"Micro-benchmark on the same shapes (median of {h['repeats']} calls): the forward pre-hook that "
            f"computes the plan once per forward, and the {h['intervened_layers']} layer hooks "
            f"({h['intervention_modules']} LoReFT modules) applied to a ({s['batch']}, {s['seq']}, {s['hidden']}) "
            "hidden state.",
            "",
            "| part | ms |",
            "|---|---:|",
            f"| plan (forward pre-hook: locations from the mask, gather indices) | {h['plan_forward_pre_hook_ms']:.3f} |",
            f"| all layer hooks, forward, no grad | {h['layer_hooks_forward_ms']:.3f} |",
            f"| all layer hooks, forward + backward (leaf/sum baseline subtracted) | {h['layer_hooks_forward_backward_ms']:.3f} |",
            f"| one LoReFT module on (B, 7, d), forward + backward | {h['one_intervention_forward_backward_ms']:.3f} |",
            f"| the Householder product for R alone (weight, sum, backward) | {h['one_rotation_householder_forward_backward_ms']:.3f} |",
            f"| {h['intervention_modules']} LoReFT modules (n x the row above) | "
            f"{h['intervention_modules'] * h['one_intervention_forward_backward_ms']:.2f} |",
            f"| remainder: gather, scatter_add, keep mask, split/cat on the full hidden state | "
            f"{h['layer_hooks_forward_backward_ms'] - h['intervention_modules'] * h['one_intervention_forward_backward_ms']:.2f} |",
            f"| **estimated hook cost per training step** | **{h['per_training_step_estimate_ms']:.2f}** "
            f"({h['per_training_step_estimate_ms'] / (result['steps']['lora_step']['median'] * 1e3) * 100:.2f}% "
            "of the LoRA step) |",
        ]
        lines += [
            "",
            f"Where the hook path's forward + backward time goes (torch.profiler, {h['profile_passes']} passes; "
            f"{h['profile_total_self_cpu_ms_per_pass']:.1f} ms self CPU per pass, profiler overhead included):",
            "",
            "| op | self CPU ms per pass | calls per pass |",
            "|---|---:|---:|",
        ]
        for r in h["profile_top_ops"][:10]:
            lines.append(f"| `{r['op']}` | {r['self_cpu_ms_per_pass']:.2f} | {r['calls_per_pass']:.0f} |")
    fo = result["steps"].get("heft_reft_forward")
    fl = result["steps"].get("heft_lora_forward")
    if fo and fl:
        lines += [
            "",
            f"Whole-forward difference, HEFT reft - HEFT lora (no grad): "
            f"{(fo['median'] - fl['median']) * 1e3:+.1f} ms on {fl['median'] * 1e3:.0f} ms "
            f"({(fo['median'] / fl['median'] - 1) * 100:+.2f}%).",
        ]
    c = result.get("consistency")
    if c:
        lines += [
            "",
            "## Consistency",
            "",
            "Losses of the first measured step (same weights everywhere): "
            + ", ".join(f"{k} {v:.6f}" for k, v in c["losses"].items())
            + f". Max |difference| among HEFT reft "
            f"unmerged / merged / pyreft: {fmt(c.get('reft_loss_max_abs_diff'), 2 if c.get('reft_loss_max_abs_diff') is None else 8)}.",
        ]
    if result.get("profile"):
        p = result["profile"]
        lines += [
            "",
            f"## Whole-step profile (torch.profiler, mean of {p['steps_per_variant']} steps per variant)",
            "",
            "Total self CPU per step: "
            + ", ".join(
                f"{v} {p[f'{v}_total_self_cpu_ms']:.0f} ms"
                for v in ("lora_step", "heft_reft_step", "heft_reft_merged_step", "pyreft_step")
                if f"{v}_total_self_cpu_ms" in p
            )
            + ".",
            "",
            "Ops the HEFT reft step (unmerged) calls more often than the LoRA step, by extra self CPU time per "
            "step (a single op's time also moves with machine noise; the hook micro-benchmark above is the "
            "cleaner number):",
            "",
            "| op | extra ms per step | calls (HEFT reft) | calls (LoRA) |",
            "|---|---:|---:|---:|",
        ]
        for r in p.get("heft_reft_step_minus_lora_step", [])[:12]:
            lines.append(
                f"| `{r['op']}` | {r['extra_self_cpu_ms']:+.2f} | {r['count']:.0f} | {r['count_in_lora_step']:.0f} |"
            )
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- TRL's fused LM head on CPU
def trainer_head_benchmark(args) -> None:
    """StagedSFTTrainer steps on the embedded SmolLM2 and real reviews: TRL's own fused LM head (on CPU it projects
    every position) against peft-heft's labelled-positions-only switch; same batch, same weights, interleaved."""
    import trl

    from peft_heft import HeftConfig, HeftSFTConfig, StagedSFTTrainer
    from peft_heft.assets import EMBEDDED_MODEL, load_model_and_tokenizer, load_task_dataset

    t_start = time.perf_counter()
    rounds = args.steps or (2 if args.quick else 10)
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL, dtype=torch.float32)
    train = load_task_dataset("rotten_tomatoes")["train"].select(range(64))
    config = HeftConfig(
        task_type="CAUSAL_LM",
        **LORA,
        intervention_layers="all",
        intervention_rank=INTERVENTION_RANK,
        intervention_positions="f5+l5",
    )
    trainer = StagedSFTTrainer(
        model,
        args=HeftSFTConfig(
            output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "heft-bench-trainer-head"),
            report_to="none",
            use_cpu=True,
            bf16=False,
            per_device_train_batch_size=8,
            max_length=256,
            gradient_checkpointing=False,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=config,
    )
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = inputs["labels"][:, 1:]
    base = trainer.model.get_base_model()
    switched = base.forward
    variants = {"trl_full": switched.__wrapped__, "labelled_only": switched}

    def step(variant: str) -> tuple[float, float, torch.Tensor]:
        base.forward = variants[variant]
        trainer.model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = trainer.compute_loss(trainer.model, dict(inputs))
        loss.backward()
        elapsed = time.perf_counter() - start
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
        return elapsed, float(loss), grads

    stages: dict[str, dict] = {}
    for stage in ("lora", "reft"):
        trainer._apply_stage(stage)
        samples: dict[str, list[float]] = {v: [] for v in variants}
        last: dict[str, tuple[float, torch.Tensor]] = {}
        for i in range(rounds + args.warmup):
            for v in list(variants) if i % 2 == 0 else list(reversed(variants)):
                elapsed, loss, grads = step(v)
                if i >= args.warmup:
                    samples[v].append(elapsed)
                last[v] = (loss, grads)
        base.forward = switched
        r: dict = {v: summarize(s) for v, s in samples.items()}
        r["speedup_median"] = r["trl_full"]["median"] / r["labelled_only"]["median"]
        r["paired_ratio"] = paired_ratio(samples["labelled_only"], samples["trl_full"])
        r["loss"] = {v: last[v][0] for v in variants}
        r["loss_abs_diff"] = abs(last["trl_full"][0] - last["labelled_only"][0])
        r["grad_max_abs_diff"] = float((last["trl_full"][1] - last["labelled_only"][1]).abs().max())
        stages[stage] = r
        log(
            f"{stage}: TRL {r['trl_full']['median'] * 1e3:.0f} ms, labelled only {r['labelled_only']['median'] * 1e3:.0f}"
            f" ms (x{r['speedup_median']:.2f}); loss diff {r['loss_abs_diff']:.1e}, grad diff {r['grad_max_abs_diff']:.1e}"
        )
    env = environment()
    env["trl"] = trl.__version__
    env["loadavg_end"] = os.getloadavg()
    result = {
        "benchmark": "TRL fused LM head on CPU, StagedSFTTrainer steps",
        "setup": {
            "model": EMBEDDED_MODEL,
            "data": "rotten_tomatoes train, first 64 rows; the first batch of the trainer's dataloader (seed 0)",
            "batch": int(inputs["input_ids"].shape[0]),
            "sequence_length": int(inputs["input_ids"].shape[1]),
            "labelled_positions": int((labels != -100).sum()),
            "positions": int(labels.numel()),
            "lora": LORA,
            "interventions": f"LoReFT rank {INTERVENTION_RANK}, all layers, f5+l5",
            "step": "trainer.compute_loss (TRL's SFT loss through the fused head) + backward, no optimizer step",
            "rounds": rounds,
            "warmup_rounds": args.warmup,
        },
        "stages": stages,
        "environment": env,
        "wall_s": time.perf_counter() - t_start,
    }
    md = trainer_head_markdown(result)
    print(md)
    out_dir = args.out if args.out is not None else (None if args.quick else REPO / "benchmarks" / "results")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "trainer_head_cpu.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out_dir / "trainer_head_cpu.md").write_text(md)
        log(f"wrote {out_dir / 'trainer_head_cpu.json'} and {out_dir / 'trainer_head_cpu.md'}")


def trainer_head_markdown(result: dict) -> str:
    setup, env = result["setup"], result["environment"]
    lines = [
        "# TRL's fused LM head on CPU: every position vs the labelled positions only",
        "",
        f"{env['date_utc']} · {env['cpu_model']} · torch {env['torch']} ({env['torch_num_threads']} threads) · "
        f"transformers {env['transformers']} · trl {env['trl']} · commit `{str(env['git_commit'])[:10]}`",
        "",
        f"Model {setup['model']} (fp32), StagedSFTTrainer. One batch of {setup['batch']} Rotten Tomatoes reviews as "
        f"TRL's SFT builds it: {setup['sequence_length']} tokens per row, {setup['labelled_positions']} of "
        f"{setup['positions']} next-token positions labelled. Step: {setup['step']}. Median of {setup['rounds']} "
        f"interleaved rounds after {setup['warmup_rounds']} warmup; wall {result['wall_s'] / 60:.1f} min; load average "
        f"{env['loadavg_start'][0]:.2f} at the start, {env['loadavg_end'][0]:.2f} at the end.",
        "",
        "| stage | TRL's head, every position (ms) | labelled positions only (ms) | speed-up (medians) | "
        "per-round time ratio | loss abs diff | max grad abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, r in result["stages"].items():
        lines.append(
            f"| {stage} | {r['trl_full']['median'] * 1e3:.0f} | {r['labelled_only']['median'] * 1e3:.0f} | "
            f"{r['speedup_median']:.2f}x | {r['paired_ratio']:.3f} | {r['loss_abs_diff']:.1e} | "
            f"{r['grad_max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and 2 steps (smoke run); no results written")
    parser.add_argument(
        "--smollm2",
        action="store_true",
        help="the embedded SmolLM2-135M-Instruct instead of the random 50M Llama (results/smollm2_cpu.*)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results for a full run; none for --quick)",
    )
    parser.add_argument("--steps", type=int, default=None, help="measured rounds per step variant (full: 15)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--warmup", type=int, default=1, help="warmup rounds, dropped")
    parser.add_argument("--gen-repeats", type=int, default=None, help="measured generate rounds (full: 15)")
    parser.add_argument("--micro-repeats", type=int, default=None, help="hook micro-benchmark calls (full: 50)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--profile", action="store_true", help="profile the hook path even if every target is met")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="full", help=argparse.SUPPRESS)
    parser.add_argument(
        "--trainer-head",
        action="store_true",
        help="only StagedSFTTrainer steps on SmolLM2: TRL's fused LM head vs the labelled-positions-only switch "
        "(results/trainer_head_cpu.*)",
    )
    args = parser.parse_args()
    if args.trainer_head:
        if args.threads:
            torch.set_num_threads(args.threads)
        trainer_head_benchmark(args)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print("MEMORY_JSON " + json.dumps(memory_worker(args.memory_worker, args.shape)), flush=True)
        return

    t_start = time.perf_counter()
    shape_name = "quick" if args.quick else "smollm2" if args.smollm2 else "full"
    shape = SHAPES[shape_name]
    steps = args.steps or (2 if args.quick else 15)
    gen_repeats = args.gen_repeats or (2 if args.quick else 15)
    micro_repeats = args.micro_repeats or (5 if args.quick else 50)
    out_dir = args.out if args.out is not None else (None if args.quick else REPO / "benchmarks" / "results")

    env = environment()
    log(f"torch {env['torch']}, {env['torch_num_threads']} threads, {env['cpus_usable']} CPUs; shape {shape_name}")
    step_variants = list(STEP_VARIANTS) + list(FORWARD_VARIANTS)
    bench = Bench(shape, step_variants + list(GENERATE_VARIANTS) + ["hook_micro"])
    n_params = bench.n_params
    log(f"base model: {n_params:,} parameters ({n_params / 1e6:.2f}M); trainable: {bench.describe_trainable()}")
    if bench.errors:
        log(f"unavailable: {bench.errors}")
    errors = dict(bench.errors)
    runnable = [v for v in step_variants if v not in errors]

    timing = interleaved(bench.run, runnable, args.warmup, steps, "steps", t_start)
    gen_raw = interleaved(bench.generate, list(GENERATE_VARIANTS), args.warmup, gen_repeats, "generate", t_start)
    generate = {
        "rounds": gen_repeats,
        "warmup_rounds": args.warmup,
        "seconds": gen_raw["raw_s"],
        "tokens_per_s": gen_raw["extra"],
        "tokens_per_call": shape["batch"] * shape["new"],
    }
    log("hook micro-benchmark")
    micro = hook_micro(bench, micro_repeats)
    log(f"hook micro: {micro}")

    steps_summary = {}
    for v, samples in timing["raw_s"].items():
        steps_summary[v] = summarize(samples)
        losses = [x for x in timing["extra"][v] if x is not None]
        if losses:
            steps_summary[v]["loss"] = losses[0]
    ratios, info = compute_ratios(timing, generate, errors)
    for r in ratios:
        log(
            f"ratio {r['ratio']}: {fmt(r['value'])} (per-round {fmt(r.get('paired_median'))}) target {r['target']} "
            f"pass={r['pass']}"
        )

    losses = {v: s["loss"] for v, s in steps_summary.items() if "loss" in s}
    reft_losses = [losses[v] for v in ("heft_reft_step", "heft_reft_merged_step", "pyreft_step") if v in losses]
    consistency = {
        "losses": losses,
        "reft_loss_max_abs_diff": (max(reft_losses) - min(reft_losses)) if len(reft_losses) > 1 else None,
        "lora_loss_abs_diff": abs(losses["lora_step"] - losses["heft_lora_step"])
        if {"lora_step", "heft_lora_step"} <= set(losses)
        else None,
    }

    profile = None
    if args.profile or any(r["pass"] is False for r in ratios):
        log("profiling (a target was missed or --profile)")
        profile = profile_ops(
            bench,
            [v for v in ("lora_step", "heft_reft_step", "heft_reft_merged_step", "pyreft_step") if v in runnable],
        )

    memory = {}
    if not args.no_memory:
        del bench
        gc.collect()
        memory = measure_memory(list(STEP_VARIANTS), shape_name, args.threads)

    env["loadavg_end"] = os.getloadavg()
    result = {
        "benchmark": "peft_heft core CPU",
        "mode": shape_name,
        "setup": {
            **shape,
            "parameters": n_params,
            "dtype": "float32",
            "device": "cpu",
            "real_lengths": left_padded_batch(shape["batch"], shape["seq"], shape["vocab"], 3)[1].sum(1).tolist(),
            "prompt_real_lengths": left_padded_batch(shape["batch"], shape["prompt"], shape["vocab"], 4)[1]
            .sum(1)
            .tolist(),
            "lora": LORA,
            "intervention_type": "loreft",
            "intervention_rank": INTERVENTION_RANK,
            "intervention_layers": "all",
            "intervention_positions": POSITIONS,
            "attn_implementation": LlamaForCausalLM(
                LlamaConfig(
                    hidden_size=8,
                    intermediate_size=8,
                    num_hidden_layers=1,
                    num_attention_heads=1,
                    vocab_size=8,
                )
            ).config._attn_implementation,
            "step": "forward with labels (HF causal-LM loss) + loss.backward(); grads set to None before each step, "
            "no optimizer",
        },
        "variants": {**STEP_VARIANTS, **FORWARD_VARIANTS, **GENERATE_VARIANTS},
        "environment": env,
        "timing": timing,
        "steps": steps_summary,
        "generate": generate,
        "ratios": ratios,
        "info_ratios": info,
        "hook_micro": micro,
        "consistency": consistency,
        "memory": memory,
        "memory_method": "fresh subprocess per variant (MALLOC_MMAP_THRESHOLD_=65536); before each of two steps: "
        "gc, read VmRSS (resident: model + inputs), reset the peak RSS by writing 5 to "
        "/proc/self/clear_refs, run the step, read VmHWM; delta = VmHWM - VmRSS before the step",
        "profile": profile,
        "argv": sys.argv[1:],
        "errors": errors,
        "wall_s": time.perf_counter() - t_start,
    }
    md = markdown(result)
    print(md)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = {"full": "core_cpu", "smollm2": "smollm2_cpu"}.get(shape_name, "core_cpu_quick")
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out_dir / f"{stem}.md").write_text(md)
        log(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    log(f"total {result['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
