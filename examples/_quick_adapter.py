"""Shared by the examples that start from a trained adapter: train one quickly when none is given.

`train_quick_adapter("rotten_tomatoes", "out/rt-adapter", steps=16)` runs both HEFT stages with StagedSFTTrainer on the
embedded SmolLM2-135M-Instruct and saves the adapter; `make demo` writes a better-trained one to out/heft-demo.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from peft_heft import HeftConfig, HeftSFTConfig, StagedSFTTrainer
from peft_heft.assets import EMBEDDED_MODEL, load_model_and_tokenizer, load_task_dataset


def train_quick_adapter(task: str, output_dir: str | Path, steps: int, train_size: int = 128) -> Path:
    """Train HEFT (LoRA then ReFT, `steps` optimizer steps each) on `task` and save the adapter to `output_dir`."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL)
    cuda = torch.cuda.is_available()
    args = HeftSFTConfig(
        output_dir=str(output_dir),
        lora_max_steps=steps,
        reft_max_steps=steps,
        lora_learning_rate=5e-4,
        reft_learning_rate=2e-3,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=False,
        disable_tqdm=True,
        logging_steps=max(1, steps),
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
        model=model,
        args=args,
        processing_class=tokenizer,
        peft_config=config,
        train_dataset=load_task_dataset(task, max_train=train_size)["train"],
    )
    trainer.train()
    trainer.save_model()
    return Path(output_dir)
