"""HEFT with data-parallel training over 2 processes, launched by accelerate.

What it shows: the same `StagedSFTTrainer` code runs under `accelerate launch`; each stage gets a fresh DDP wrapper
over exactly its trainable parameters (LoRA in stage 1, interventions in stage 2), so gradients are all-reduced in
both stages and every rank ends with the same adapter (checked at the end by an all-gather of a weight checksum).

Run (2 GPUs):            accelerate launch --num_processes 2 examples/accelerate_two_processes.py
Run (CPU, 2 processes):  accelerate launch --multi_gpu --num_processes 2 examples/accelerate_two_processes.py
                         (accelerate's --cpu multi-process mode needs mpirun; --multi_gpu starts the processes with
                         torchrun and, without CUDA, they join a gloo process group)
`--fast` trains 2 steps per stage on 32 examples (used by the tests).
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.distributed as dist

from peft_heft import HeftConfig, HeftSFTConfig, StagedSFTTrainer
from peft_heft.assets import EMBEDDED_MODEL, load_model_and_tokenizer, load_task_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="out/heft-two-processes")
    parser.add_argument("--fast", action="store_true")
    cli = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cuda = torch.cuda.is_available()
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL)
    data = load_task_dataset("rotten_tomatoes", max_train=32 if cli.fast else 512)
    args = HeftSFTConfig(
        output_dir=cli.output_dir,
        lora_num_train_epochs=1,
        reft_num_train_epochs=1,
        lora_max_steps=2 if cli.fast else -1,
        reft_max_steps=2 if cli.fast else -1,
        lora_learning_rate=5e-4,
        reft_learning_rate=2e-3,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
        logging_steps=1 if cli.fast else 8,
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        ddp_find_unused_parameters=False,
    )
    config = HeftConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        intervention_layers="all",
        intervention_rank=4,
        intervention_positions="f5+l5",
    )
    trainer = StagedSFTTrainer(
        model=model, args=args, train_dataset=data["train"], processing_class=tokenizer, peft_config=config
    )
    output = trainer.train()

    # every rank must hold the same adapter: compare a checksum of the trainable weights across processes
    adapter = [p for n, p in trainer.model.named_parameters() if "lora_" in n or "heft_interventions" in n]
    checksum = torch.stack([p.detach().double().sum() for p in adapter]).sum().to(trainer.args.device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum) if world > 1 else gathered.__setitem__(0, checksum)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    # Compare before saving, and pass a barrier: gloo's worker thread releases the tensors of a collective (which
    # takes the GIL) after the caller has its result; a process group torn down at once, by the DDP wrapper freed
    # when main() returns while the GIL is held, joins that thread and both wait forever (seen: a hang at exit).
    trainer.accelerator.wait_for_everyone()
    trainer.save_model()
    if trainer.is_world_process_zero():
        print(
            f"world size {world}; LoRA stage {output.metrics['lora_train_steps']} steps, ReFT stage "
            f"{output.metrics['reft_train_steps']} steps; adapters identical on every rank: {same}; saved to "
            f"{cli.output_dir}"
        )
    trainer.accelerator.end_training()  # closes the process group, so no rank exits with gloo threads alive
    if not same:
        raise SystemExit("adapters differ across ranks")


if __name__ == "__main__":
    main()
