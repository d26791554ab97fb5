"""Use HEFT the way a user does, once: train both stages, search the fine stage (plots), save, card, load, generate,
DPO. tests/test_thin_plugin.py runs this in a fresh interpreter between two snapshots of upstream modules."""

from __future__ import annotations

import os

import torch
from datasets import Dataset
from peft import PeftConfig, PeftModel
from sft_fixtures import cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer

from peft_heft import FineStageSearchSpace, HeftDPOConfig, HeftDPOTrainer, StagedSFTTrainer
from peft_heft.modelcard import update_model_card
from peft_heft.trainer.search import run_fine_stage_search


def run_heft_once(folder: str) -> None:
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    args = cpu_sft_args(
        os.path.join(folder, "run"), lora_max_steps=2, reft_max_steps=2, eval_strategy="steps", eval_steps=2
    )
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=args,
        train_dataset=make_dataset("prompt_completion", 16),
        eval_dataset=make_dataset("prompt_completion", 8, seed=1),
        processing_class=tokenizer,
        peft_config=sft_heft_config(),
    )
    trainer.train()
    space = FineStageSearchSpace(layers=["all"], positions=[1], ranks=[1], learning_rate=(1e-3, 1e-2), epochs=None)
    run_fine_stage_search(trainer, 1, space)  # draws study.png
    adapter = os.path.join(folder, "adapter")
    trainer.save_model(adapter)
    trainer.create_model_card()
    assert PeftConfig.from_pretrained(adapter).peft_type == "HEFT"
    model = PeftModel.from_pretrained(tiny_sft_model(), adapter).eval()
    prompt = tokenizer("w1 w2 ? Answer:", return_tensors="pt")
    model.generate(**prompt, max_new_tokens=3, do_sample=False)
    model.save_pretrained(os.path.join(folder, "plain"))
    update_model_card(os.path.join(folder, "plain"), model.peft_config["default"])

    pairs = Dataset.from_list(
        [{"prompt": "w1 w2 ? Answer:", "chosen": " yes", "rejected": " no"}] * 4
        + [{"prompt": "w20 w3 ? Answer:", "chosen": " no", "rejected": " yes"}] * 4
    )
    dpo = HeftDPOTrainer(
        model=PeftModel.from_pretrained(tiny_sft_model(), adapter, is_trainable=True),
        args=HeftDPOConfig(
            output_dir=os.path.join(folder, "dpo"),
            max_steps=1,
            per_device_train_batch_size=4,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            max_length=64,
            gradient_checkpointing=False,
            disable_tqdm=True,
        ),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    dpo.train()
    dpo.save_model(os.path.join(folder, "dpo-adapter"))
