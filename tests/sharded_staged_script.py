"""Run by test_trainer_sharded.py under `accelerate launch --config_file <cpu yaml>` (2 processes, gloo).

Trains both HEFT stages of the trainer tests' tiny Llama with StagedSFTTrainer under DDP (the reference), FSDP2 or
DeepSpeed ZeRO-2/3, then writes, on rank 0, into <out>:
  results.json          what engine really ran (DTensor parameters, FSDP modules, ZeRO-3 partitioned parameters,
                        DeepSpeed engines), what changed in each stage, the largest difference between ranks, dtypes
  trained_adapter.pt    the adapter tensors gathered from the trained model (full tensors)
  logits.pt             a fixed batch and the trained model's logits on it
  adapter/              trainer.save_model() (the folder the test reloads in one plain process)

Usage: sharded_staged_script.py <engine: ddp|fsdp2|zero2|zero3> <out> [--gc] [--reentrant] [--save-steps N]
       [--resume <checkpoint>]
Mixed precision comes from the launcher (`accelerate launch --mixed_precision bf16`: transformers refuses bf16=True
without a GPU unless use_cpu=True, which would drop FSDP/DeepSpeed).

FSDP2 ON CPU (a test hack, it lives here only, never in peft_heft): accelerate keeps the FSDP plugin only on a
multi-accelerator distributed type (MULTI_GPU, ...); on CPU it drops it without a word and runs DDP (MULTI_CPU). For
`fsdp2`, this script makes accelerate's backend detection report MULTI_GPU over gloo with ACCELERATE_TORCH_DEVICE=cpu,
so accelerate really applies `fully_shard`; results.json records the proof (DTensor parameters, FSDPModule count).
"""

import argparse
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore")

from sft_fixtures import cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer  # noqa: E402

from peft_heft import HeftCallback, StagedSFTTrainer  # noqa: E402

STEPS = 4
GROUPS = ("lora", "reft", "base")


def group_of(name):
    if "lora_" in name:
        return "lora"
    if "heft_interventions" in name:
        return "reft"
    return "base"


def force_fsdp_on_cpu():
    """Test hack: accelerate treats the 2 CPU processes as MULTI_GPU over gloo, so that it keeps the FSDP plugin."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"  # PartialState.set_device returns at once (no torch.cuda)
    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = original(self, cpu, sagemaker_dp, backend)
        if kind == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_GPU
        return found, kind

    PartialState._prepare_backend = prepare_backend


def gather_full(model):
    """Every parameter as a full CPU tensor, on every rank (collectives under FSDP2 and ZeRO-3)."""
    from torch.distributed.tensor import DTensor

    named = sorted(model.named_parameters())
    out = {}
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().clone().float().cpu() for n, p in named}
    for name, p in named:
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().clone().float().cpu()
    return out


def group_vector(params, group):
    parts = [t.flatten() for n, t in sorted(params.items()) if group_of(n) == group]
    return torch.cat(parts) if parts else torch.zeros(0)


def rank_diff(vec):
    gathered = [torch.zeros_like(vec) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, vec.contiguous())
    return max(float((g - gathered[0]).abs().max()) if g.numel() else 0.0 for g in gathered)


def engine_facts(trainer):
    """What really wraps the model: the proof that FSDP2 / DeepSpeed ran (and not DDP)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = list(trainer.model.named_parameters())
    wrapped = trainer.model_wrapped
    facts = {
        "model_wrapped": type(wrapped).__name__,
        "model_wrapped_id": id(wrapped),
        "fsdp_modules": sum(isinstance(m, FSDPModule) for m in trainer.model.modules()),
        "fsdp_module_names": [n for n, m in trainer.model.named_modules() if isinstance(m, FSDPModule)],
        # the FSDP unit each intervention parameter is sharded in (the closest FSDPModule above it)
        "intervention_fsdp_units": sorted(
            {
                max(
                    (u for u, m in trainer.model.named_modules() if isinstance(m, FSDPModule) and n.startswith(u)),
                    key=len,
                    default=None,
                )
                or "<root>"
                for n, _ in params
                if group_of(n) == "reft"
            }
        ),
        "dtensor_params": sum(isinstance(p, DTensor) for _, p in params),
        "zero3_partitioned_params": sum(hasattr(p, "ds_id") for _, p in params),
        "num_params": len(params),
        "local_numel": int(
            sum(
                p.ds_tensor.numel()
                if hasattr(p, "ds_tensor")
                else (p.to_local() if isinstance(p, DTensor) else p).numel()
                for _, p in params
            )
        ),
        "global_numel": int(sum(p.numel() for _, p in params)),
        "trainable_dtypes": sorted({str(p.dtype) for _, p in params if p.requires_grad}),
        "intervention_dtypes": sorted({str(p.dtype) for n, p in params if group_of(n) == "reft"}),
        "trainable_numel": {
            g: int(sum(p.numel() for n, p in params if p.requires_grad and group_of(n) == g)) for g in GROUPS
        },
    }
    modules = list(trainer.model.modules())
    facts["forward_pre_hooks"] = sum(len(m._forward_pre_hooks) for m in modules)
    facts["forward_hooks"] = sum(len(m._forward_hooks) for m in modules)
    facts["backward_hooks"] = sum(len(m._backward_hooks) + len(m._backward_pre_hooks) for m in modules)
    if hasattr(wrapped, "zero_optimization_stage"):
        facts["zero_stage"] = int(wrapped.zero_optimization_stage())
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if optimizer is not None:
        facts["optimizer"] = type(optimizer).__name__
    return facts


class Probe(HeftCallback):
    def __init__(self):
        self.results, self.begin, self.facts = {}, {}, {}

    def on_stage_begin(self, args, state, control, stage=None, **kwargs):
        self.begin = gather_full(self.trainer.model)

    def on_step_end(self, args, state, control, **kwargs):
        self.facts[self.trainer.stage] = engine_facts(self.trainer)

    def on_stage_end(self, args, state, control, stage=None, **kwargs):
        end = gather_full(self.trainer.model)
        out = {"engine": self.facts.get(stage), "train_loss": kwargs.get("metrics", {}).get("train_loss")}
        for g in GROUPS:
            before, after = group_vector(self.begin, g), group_vector(end, g)
            out[f"{g}_max_change"] = float((after - before).abs().max()) if after.numel() else 0.0
            out[f"{g}_max_rank_diff"] = rank_diff(after)
        self.results[stage] = out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=("ddp", "fsdp2", "zero2", "zero3"))
    parser.add_argument("out")
    parser.add_argument("--gc", action="store_true", help="gradient checkpointing")
    parser.add_argument("--reentrant", action="store_true", help="reentrant gradient checkpointing")
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume", default=None, help="a checkpoint folder to resume from")
    cli = parser.parse_args(argv)
    if cli.engine == "fsdp2":
        force_fsdp_on_cpu()
    os.makedirs(cli.out, exist_ok=True)
    # DDP runs as tests/ddp_staged_script.py (use_cpu=True: MULTI_CPU, gloo). accelerate drops DeepSpeed with
    # use_cpu=True, and FSDP on MULTI_CPU: those run with use_cpu=False (the forced MULTI_GPU over gloo for FSDP2,
    # DeepSpeed's CPU accelerator for ZeRO)
    use_cpu = cli.engine == "ddp"
    extra = {} if use_cpu else {"ddp_backend": "gloo"}
    if cli.save_steps:
        extra.update(save_strategy="steps", save_steps=cli.save_steps)
    args = cpu_sft_args(
        cli.out,
        per_device_train_batch_size=4,
        lora_max_steps=STEPS,
        reft_max_steps=STEPS,
        use_cpu=use_cpu,
        gradient_checkpointing=cli.gc,
        gradient_checkpointing_kwargs={"use_reentrant": True} if cli.reentrant else None,
        **extra,
    )
    if cli.engine.startswith("zero") and os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16":
        # DeepSpeed's config wants bf16=True in the arguments, which transformers refuses without a GPU unless
        # use_cpu=True (which drops DeepSpeed): set after validation (test only)
        args.bf16 = True
    probe = Probe()
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=args,
        train_dataset=make_dataset("prompt_completion", 32),
        processing_class=tiny_tokenizer(),
        peft_config=sft_heft_config(),
        callbacks=[probe],
    )
    probe.trainer = trainer
    acc = trainer.accelerator
    setup = {
        "engine": cli.engine,
        "distributed_type": str(acc.distributed_type),
        "is_fsdp2": bool(getattr(acc, "is_fsdp2", False)),
        "mixed_precision": str(acc.mixed_precision),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
    }
    output = trainer.train(resume_from_checkpoint=cli.resume)
    final = gather_full(trainer.model)
    trainer.save_model(os.path.join(cli.out, "adapter"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    kwargs = {k: batch[k].to(acc.device) for k in ("input_ids", "attention_mask", "intervention_locations")}
    trainer.model.eval()
    with torch.no_grad():  # every rank (FSDP2 / ZeRO-3 gather the parameters in forward)
        logits = trainer.model(**kwargs).logits.float().cpu()
    results = {
        "setup": setup,
        "stages": probe.results,
        "global_step": output.global_step,
        "train_loss": output.training_loss,
        "logits_rank_diff": rank_diff(logits.flatten()),
    }
    if trainer.is_world_process_zero():
        torch.save({n: t for n, t in final.items() if group_of(n) != "base"}, os.path.join(cli.out, "trained.pt"))
        torch.save(
            {"batch": {k: v.cpu() for k, v in kwargs.items()}, "logits": logits}, os.path.join(cli.out, "logits.pt")
        )
        with open(os.path.join(cli.out, "results.json"), "w") as handle:
            json.dump(results, handle, indent=1)
    # a barrier after the last collective on Python tensors, then leave the group (see tests/ddp_staged_script.py)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
