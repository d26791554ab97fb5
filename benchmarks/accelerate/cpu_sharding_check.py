"""Does StagedSFTTrainer train both HEFT stages correctly under FSDP2 / DeepSpeed ZeRO-2 / ZeRO-3 on CPU?

StagedSFTTrainer supports FSDP2 and DeepSpeed ZeRO-2/ZeRO-3 (refused: FSDP1, ZeRO-3 with non-reentrant gradient
checkpointing over two stages, DeepSpeed bf16/fp16 with LoReFT/DiReFT; see ``check_sharding_supported``). Until
2026-12-06 it refused both engines and this script lifted the refusal; it no longer does (``--lift-refusal`` still can,
to show what a refused setup does). It trains the trainer tests' tiny Llama (tests/sft_fixtures.py) for a few steps
per stage on 2 CPU processes and checks, with numbers:

  (i)   stage 1 changes only LoRA tensors, stage 2 only intervention tensors (full parameters gathered: DTensor
        ``full_tensor()`` under FSDP2, ``deepspeed.zero.GatheredParameters`` under ZeRO-3);
  (ii)  both ranks hold the same parameters after each stage (all_gather of the gathered vectors);
  (iii) the adapter written by ``trainer.save_model`` reloads in one plain process (``PeftModel.from_pretrained`` on a
        fresh ``tiny_sft_model()`` after ``import peft_heft``) with the trained model's logits to ~1e-5;
  (iv)  the final adapter tensors are close to those of the same run under plain DDP (same seeds and data).

Two modes:

  train   run under ``accelerate launch`` (2 processes, torchrun, gloo); writes <out>/train_results.json,
          <out>/adapter (save_model), <out>/trained_adapter.pt (gathered), <out>/logits.pt (batch + logits)
  verify  one plain process: reload <out>/adapter, compare logits and tensors (and with --ddp-out, with DDP's run);
          prints and writes <out>/summary.json

Engines (``--engine``): ``ddp`` (the reference, as tests/test_trainer_ddp.py), ``fsdp2`` (launch with
examples/accelerate/fsdp2_cpu.yaml), ``zero2`` / ``zero3`` (launch with zero2_cpu.yaml / zero3_cpu.yaml, from a
venv with deepspeed, DS_ACCELERATOR=cpu). ``--force-fsdp-on-cpu``: accelerate 1.15 only selects FSDP when its
distributed type is a multi-accelerator one (MULTI_GPU, ...); on CPU (MULTI_CPU, or NO without CUDA) the FSDP plugin
is dropped and the run is plain DDP. This flag makes accelerate's backend detection report MULTI_GPU with gloo and
ACCELERATE_TORCH_DEVICE=cpu, so that accelerate really applies FSDP2 (``fully_shard``) on CPU. It is a test hack,
not a supported configuration. See benchmarks/results/cpu_sharding_check.md for commands and results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests"))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from sharded_staged_script import force_fsdp_on_cpu  # noqa: E402  (the tests' hack, one copy)

GROUPS = ("lora", "reft", "base")
STEPS = 4


def group_of(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if "heft_interventions" in name:
        return "reft"
    return "base"


def clean(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


# ------------------------------------------------------------------ the refusal, lifted here only
def lift_refusal() -> None:
    """--lift-refusal: this script (only) replaces the check that detects the engines, to run a refused setup."""
    import peft_heft.trainer.validation as validation

    validation.sharding_engine = lambda args: None


# ------------------------------------------------------------------ gathering full parameters
def gather_full(model) -> dict[str, torch.Tensor]:
    """Every parameter as a full, plain CPU tensor, on every rank (collective under FSDP2 and ZeRO-3)."""
    named = sorted(model.named_parameters())
    out = {}
    zero3 = [p for _, p in named if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            for name, p in named:
                out[clean(name)] = p.detach().clone().float().cpu()
        return out
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    for name, p in named:
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[clean(name)] = t.detach().clone().float().cpu()
    return out


def group_vector(params: dict[str, torch.Tensor], group: str) -> torch.Tensor:
    parts = [t.flatten() for n, t in sorted(params.items()) if group_of(n) == group]
    return torch.cat(parts) if parts else torch.zeros(0)


def rank_diff(vec: torch.Tensor) -> float:
    import torch.distributed as dist

    gathered = [torch.zeros_like(vec) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vec.contiguous())
    return max(float((g - gathered[0]).abs().max()) if g.numel() else 0.0 for g in gathered)


def describe_wrapper(trainer) -> dict:
    wrapped = trainer.model_wrapped
    info = {
        "model_wrapped": type(wrapped).__name__,
        "model_wrapped_id": id(wrapped),
        "model": type(trainer.model).__name__,
    }
    try:
        from torch.distributed.fsdp import FSDPModule

        info["model_is_fsdp_module"] = isinstance(trainer.model, FSDPModule)
        info["fsdp_modules"] = sum(isinstance(m, FSDPModule) for m in trainer.model.modules())
    except ImportError:  # pragma: no cover
        pass
    opt = trainer.optimizer
    if opt is not None:
        inner = getattr(opt, "optimizer", opt)
        params = [p for g in getattr(inner, "param_groups", []) for p in g["params"]]
        info["optimizer"] = type(opt).__name__ + "/" + type(inner).__name__
        info["optimizer_params"] = len(params)
        info["optimizer_numel"] = int(sum(p.numel() for p in params))
    try:
        from torch.distributed.tensor import DTensor

        params = list(trainer.model.parameters())
        info["dtensor_params"] = sum(isinstance(p, DTensor) for p in params)
        info["local_numel"] = int(
            sum(
                p.ds_tensor.numel()
                if hasattr(p, "ds_tensor")
                else (p.to_local() if isinstance(p, DTensor) else p).numel()
                for p in params
            )
        )
        info["global_numel"] = int(sum(p.numel() for p in params))
    except ImportError:  # pragma: no cover
        pass
    info["zero3_params"] = sum(hasattr(p, "ds_id") for p in trainer.model.parameters())
    modules = list(trainer.model.modules())
    info["forward_pre_hooks"] = sum(len(m._forward_pre_hooks) for m in modules)
    info["forward_hooks"] = sum(len(m._forward_hooks) for m in modules)
    info["backward_hooks"] = sum(len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {})) for m in modules)
    info["trainable_numel_by_group"] = {
        g: int(sum(p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad and group_of(n) == g))
        for g in GROUPS
    }
    return info


# ------------------------------------------------------------------ train (under accelerate launch)
def train(cli) -> None:
    if cli.lift_refusal:
        lift_refusal()
    if cli.force_fsdp_on_cpu:
        force_fsdp_on_cpu()
    import torch.distributed as dist
    from sft_fixtures import cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer

    from peft_heft import HeftCallback, StagedSFTTrainer

    os.makedirs(cli.out, exist_ok=True)
    # DDP (the reference) runs exactly like tests/ddp_staged_script.py: use_cpu=True (accelerate's MULTI_CPU, gloo).
    # accelerate drops DeepSpeed when cpu=True, and FSDP is dropped on MULTI_CPU: those engines run with use_cpu=False
    use_cpu = cli.engine == "ddp" or (cli.engine == "fsdp2" and not cli.force_fsdp_on_cpu)
    extra = {"ddp_backend": "gloo"} if not use_cpu else {}
    args = cpu_sft_args(
        cli.out,
        per_device_train_batch_size=4,
        lora_max_steps=STEPS,
        reft_max_steps=STEPS,
        use_cpu=use_cpu,
        gradient_checkpointing=cli.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": True} if cli.reentrant else None,
        stage_order=cli.stage_order.split(","),
        **extra,
    )

    class Probe(HeftCallback):
        def __init__(self):
            self.results, self.begin, self.wrappers = {}, {}, {}

        def on_stage_begin(self, args, state, control, stage=None, model=None, **kwargs):
            self.begin = gather_full(self.trainer.model)

        def on_step_end(self, args, state, control, **kwargs):
            self.wrappers[self.trainer.stage] = describe_wrapper(self.trainer)

        def on_stage_end(self, args, state, control, stage=None, model=None, **kwargs):
            end = gather_full(self.trainer.model)
            out = {"wrapper": self.wrappers.get(stage)}
            for g in GROUPS:
                before, after = group_vector(self.begin, g), group_vector(end, g)
                out[f"{g}_max_change"] = float((after - before).abs().max()) if after.numel() else 0.0
                out[f"{g}_max_rank_diff"] = rank_diff(after)
            out["train_loss"] = kwargs.get("metrics", {}).get("train_loss")
            self.results[stage] = out

    probe = Probe()
    data = make_dataset("prompt_completion", 32)
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=args,
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        peft_config=sft_heft_config(),
        callbacks=[probe],
    )
    probe.trainer = trainer
    if cli.contiguous_rotations:
        # FSDP2's fully_shard refuses non-contiguous parameters; torch's orthogonal parametrization stores the
        # rotation's `original` (32, 2) as a transposed view (stride (1, 32)). Same values, contiguous storage:
        for p in trainer.model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    acc = trainer.accelerator
    setup = {
        "engine": cli.engine,
        "force_fsdp_on_cpu": cli.force_fsdp_on_cpu,
        "contiguous_rotations": cli.contiguous_rotations,
        "reentrant": cli.reentrant,
        "lift_refusal": cli.lift_refusal,
        "use_cpu": use_cpu,
        "gradient_checkpointing": cli.gradient_checkpointing,
        "stage_order": cli.stage_order,
        "distributed_type": str(acc.distributed_type),
        "is_fsdp2": bool(getattr(acc, "is_fsdp2", False)),
        "fsdp_plugin": type(getattr(acc.state, "fsdp_plugin", None)).__name__,
        "deepspeed_plugin": type(getattr(acc.state, "deepspeed_plugin", None)).__name__,
        "num_processes": acc.num_processes,
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "device": str(acc.device),
        "torch": torch.__version__,
    }
    try:
        import deepspeed

        setup["deepspeed"] = deepspeed.__version__
        from deepspeed.accelerator import get_accelerator

        setup["ds_accelerator"] = get_accelerator()._name
    except ImportError:
        pass
    print("SETUP", json.dumps(setup), flush=True)
    output = trainer.train()
    final = gather_full(trainer.model)
    trainer.save_model(os.path.join(cli.out, "adapter"))
    if trainer.is_deepspeed_enabled:
        # Trainer.save_model under ZeRO-3 + PEFT saves _zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=
        # True): parameters frozen at save time (LoRA, after the ReFT stage) are left out. Also save from the full
        # consolidated state dict, to tell a saving problem from a training one.
        state_dict = acc.get_state_dict(trainer.model_wrapped)
        if trainer.is_world_process_zero():
            trainer.model.save_pretrained(os.path.join(cli.out, "adapter_full_state_dict"), state_dict=state_dict)
    # logits of the trained model on a fixed batch, forward on every rank (FSDP2 / ZeRO-3 gather inside forward)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    kwargs = {k: batch[k].to(acc.device) for k in ("input_ids", "attention_mask", "intervention_locations")}
    model = trainer.model
    model.eval()
    with torch.no_grad():
        logits = model(**kwargs).logits.float().cpu()
    logits_rank_diff = rank_diff(logits.flatten())
    results = {
        "setup": setup,
        "stages": probe.results,
        "global_step": output.global_step,
        "train_loss": output.training_loss,
        "logits_rank_diff": logits_rank_diff,
    }
    if trainer.is_world_process_zero():
        adapter = {n: t for n, t in final.items() if group_of(n) != "base"}
        torch.save(adapter, os.path.join(cli.out, "trained_adapter.pt"))
        torch.save(
            {"batch": {k: v.cpu() for k, v in kwargs.items()}, "logits": logits}, os.path.join(cli.out, "logits.pt")
        )
        with open(os.path.join(cli.out, "train_results.json"), "w") as handle:
            json.dump(results, handle, indent=1)
        print("TRAIN_RESULTS", json.dumps(results), flush=True)
    # a barrier after the last collective on Python tensors (gloo teardown deadlock, see tests/ddp_staged_script.py)
    acc.wait_for_everyone()
    acc.end_training()


# ------------------------------------------------------------------ verify (one plain process)
def verify(cli) -> dict:
    from peft import PeftModel
    from sft_fixtures import tiny_sft_model

    import peft_heft  # noqa: F401  (registers HEFT with PEFT)

    path = os.path.join(cli.out, "train_results.json")
    with open(path) as handle:
        results = json.load(handle)
    stages = results["stages"]
    tol = 1e-5
    checks = {}
    lora, reft = stages.get("lora", {}), stages.get("reft", {})
    checks["i_stage1_only_lora"] = bool(
        lora.get("lora_max_change", 0) > 0
        and lora.get("reft_max_change", 1) == 0
        and lora.get("base_max_change", 1) == 0
    )
    checks["i_stage2_only_reft"] = bool(
        reft.get("reft_max_change", 0) > 0
        and reft.get("lora_max_change", 1) == 0
        and reft.get("base_max_change", 1) == 0
    )
    checks["ii_ranks_agree"] = bool(
        all(s.get(f"{g}_max_rank_diff", 1) == 0 for s in (lora, reft) for g in GROUPS)
        and results["logits_rank_diff"] == 0
    )
    saved = torch.load(os.path.join(cli.out, "logits.pt"))
    trained = torch.load(os.path.join(cli.out, "trained_adapter.pt"))
    numbers = {}
    for folder, key in (("adapter", "iii_reload_logits"), ("adapter_full_state_dict", "iii_alt_full_state_dict_save")):
        if not os.path.isdir(os.path.join(cli.out, folder)):
            continue
        prefix = "" if folder == "adapter" else "alt_"
        try:
            loaded = PeftModel.from_pretrained(tiny_sft_model(), os.path.join(cli.out, folder)).eval()
        except Exception as error:  # a failed reload is a failed check, with its message
            numbers[f"{prefix}reload_error"] = f"{type(error).__name__}: {error}"[:600]
            checks[key] = False
            continue
        with torch.no_grad():
            got = loaded(**saved["batch"]).logits.float()
        numbers[f"{prefix}reload_logits_max_abs_diff"] = float((got - saved["logits"]).abs().max())
        reloaded = {clean(n): p.detach().float() for n, p in loaded.named_parameters() if group_of(n) != "base"}
        numbers[f"{prefix}reload_missing_tensors"] = sorted(set(trained) ^ set(reloaded))
        common = sorted(set(trained) & set(reloaded))
        numbers[f"{prefix}reload_tensor_max_abs_diff"] = max(
            (float((trained[n] - reloaded[n]).abs().max()) for n in common), default=None
        )
        checks[key] = bool(
            numbers[f"{prefix}reload_logits_max_abs_diff"] <= tol and not numbers[f"{prefix}reload_missing_tensors"]
        )
    if cli.ddp_out:
        ref = torch.load(os.path.join(cli.ddp_out, "trained_adapter.pt"))
        common = sorted(set(trained) & set(ref))
        diffs = {
            g: max((float((trained[n] - ref[n]).abs().max()) for n in common if group_of(n) == g), default=None)
            for g in ("lora", "reft")
        }
        numbers["vs_ddp_max_abs_diff"] = diffs
        numbers["vs_ddp_missing_tensors"] = sorted(set(trained) ^ set(ref))
        ref_logits = torch.load(os.path.join(cli.ddp_out, "logits.pt"))["logits"]
        numbers["vs_ddp_logits_max_abs_diff"] = float((saved["logits"] - ref_logits).abs().max())
        with open(os.path.join(cli.ddp_out, "train_results.json")) as handle:
            ddp = json.load(handle)
        numbers["train_loss"] = {"this": results["train_loss"], "ddp": ddp["train_loss"]}
        checks["iv_close_to_ddp"] = bool(
            not numbers["vs_ddp_missing_tensors"] and all(d is not None and d <= 1e-4 for d in diffs.values())
        )
    summary = {
        "engine": results["setup"]["engine"],
        "setup": results["setup"],
        "checks": checks,
        "all_pass": all(v for k, v in checks.items() if not k.startswith("iii_alt")),
        "numbers": numbers,
        "stages": stages,
    }
    with open(os.path.join(cli.out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    print(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("train", "verify"))
    parser.add_argument("--engine", choices=("ddp", "fsdp2", "zero2", "zero3"), default="ddp")
    parser.add_argument("--out", required=True)
    parser.add_argument("--force-fsdp-on-cpu", action="store_true")
    parser.add_argument(
        "--contiguous-rotations", action="store_true", help="store the rotations' parameters contiguously (FSDP2)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--reentrant", action="store_true", help="reentrant gradient checkpointing")
    parser.add_argument("--lift-refusal", action="store_true", help="run a setup StagedSFTTrainer refuses")
    parser.add_argument("--stage-order", default="lora,reft", help="train: e.g. 'reft' for one stage (one engine)")
    parser.add_argument("--ddp-out", default=None, help="verify: the DDP run's --out, for check (iv)")
    cli = parser.parse_args(argv)
    train(cli) if cli.mode == "train" else verify(cli)


if __name__ == "__main__":
    main()
