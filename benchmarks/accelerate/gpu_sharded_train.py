"""Both HEFT stages under FSDP2 on the GPUs present, for `benchmarks/gpu_check.py` (checks `fsdp2`, `qlora_fsdp`).

Launched by gpu_check.py as::

    accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes <gpus> \\
        benchmarks/accelerate/gpu_sharded_train.py --model <folder> --out <dir> [--qlora] [--steps N]

The embedded SmolLM2-135M-Instruct (gpu_check passes its folder) on Rotten Tomatoes, bf16 mixed precision, gradient
checkpointing, `StagedSFTTrainer` over both stages, `save_model()` into `<out>/adapter`. `--qlora` loads the base in
4-bit nf4 with `bnb_4bit_quant_storage=torch.bfloat16`, the storage type FSDP needs to shard 4-bit weights with the
bf16 ones. Rank 0 writes `<out>/results.json` (the engine that really ran, the losses of each stage, the dtypes of
the trainable parameters) and `<out>/logits.pt` (a fixed left-padded prompt batch and the trained model's logits), so
gpu_check can reload the adapter in one plain process and compare.

`--cpu-smoke`: the same code path on CPU processes over gloo with a tiny model, FSDP2 forced onto CPU with the test
hack of `tests/sharded_staged_script.py` (accelerate runs DDP on CPU otherwise); its numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base model's folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--qlora", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true")
    cli = parser.parse_args()
    if cli.cpu_smoke:
        from sharded_staged_script import force_fsdp_on_cpu

        force_fsdp_on_cpu()

    import torch.distributed as dist
    from gpu_check import heft_config  # the GPU check's own adapter settings
    from sharded_staged_script import engine_facts
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from peft_heft import HeftSFTConfig, StagedSFTTrainer
    from peft_heft.assets import load_task_dataset

    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict = {"dtype": torch.float32 if cli.cpu_smoke else torch.bfloat16}
    if cli.qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(cli.model, **kwargs)
    batch = 2 if cli.cpu_smoke else 8
    data = load_task_dataset("rotten_tomatoes", max_train=batch * cli.steps * 8, max_test=8)
    args = HeftSFTConfig(
        output_dir=str(out / "run"),
        lora_max_steps=cli.steps,
        reft_max_steps=cli.steps,
        lora_learning_rate=5e-4,
        reft_learning_rate=2e-3,
        per_device_train_batch_size=batch,
        max_length=160 if cli.cpu_smoke else 256,
        gradient_checkpointing=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=not cli.cpu_smoke,
        disable_tqdm=True,
        seed=0,
    )
    trainer = StagedSFTTrainer(
        model=model, args=args, train_dataset=data["train"], processing_class=tokenizer, peft_config=heft_config()
    )
    trainer.train()
    facts = engine_facts(trainer)
    trainer.save_model(str(out / "adapter"))

    texts = [
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        for row in data["test"].select(range(4))
    ]
    tokenizer.padding_side = "left"
    prompts = tokenizer(texts, padding=True, return_tensors="pt")
    trainer.model.eval()
    device = trainer.args.device
    with torch.no_grad():  # every rank runs the forward (FSDP gathers the shards); rank 0 keeps the result
        logits = trainer.model(**{k: v.to(device) for k, v in prompts.items()}).logits.float().cpu()
    losses = {
        stage: [e["loss"] for e in trainer.stage_log_history if e.get("stage") == stage and "loss" in e]
        for stage in ("lora", "reft")
    }
    trainable = {
        name: str(p.dtype) for name, p in trainer.model.named_parameters() if "lora_" in name or "heft_" in name
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"batch": dict(prompts), "logits": logits}, out / "logits.pt")
        result = {
            "engine": facts,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "losses": losses,
            "losses_finite": all(math.isfinite(x) for v in losses.values() for x in v),
            "trainable_dtypes": sorted(set(trainable.values())),
            "qlora": cli.qlora,
        }
        (out / "results.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
