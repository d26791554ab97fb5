"""Model cards of HEFT adapters: update_model_card after PEFT's save_pretrained, and the trainers' cards."""

from __future__ import annotations

import warnings

from conftest import heft_config, tiny_llama
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from sft_fixtures import make_dataset, tiny_sft_model, tiny_tokenizer

from peft_heft import HeftSFTConfig, StagedSFTTrainer
from peft_heft.modelcard import SECTION_BEGIN, SECTION_END, update_model_card


def test_plain_save_pretrained_writes_peft_card_unchanged(tmp_path):
    """peft-heft changes nothing in PEFT: model.save_pretrained writes PEFT's card; HEFT's own writers add the section."""
    model = get_peft_model(tiny_llama(), heft_config())
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert SECTION_BEGIN not in text and ModelCard.load(tmp_path / "README.md").data.library_name == "peft"


def test_update_model_card_after_save_pretrained_adds_heft_section_and_keeps_the_users_text(tmp_path):
    model = get_peft_model(tiny_llama(), heft_config(intervention_positions="f2+l3", intervention_rank=3))
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n\nNotes I wrote myself.\n")
    for _ in range(2):  # a second save + update replaces the section instead of adding another
        model.save_pretrained(tmp_path)
        update_model_card(tmp_path, model.peft_config["default"])
    card = ModelCard.load(tmp_path / "README.md")
    text = card.text
    assert text.count(SECTION_BEGIN) == 1 and text.count(SECTION_END) == 1
    assert "Notes I wrote myself." in text and card.data.license == "mit"
    assert "import peft_heft" in text and "AutoPeftModelForCausalLM.from_pretrained" in text
    assert "| `intervention_positions` | f2+l3 |" in text and "| `intervention_rank` | 3 |" in text
    assert "| `r` | 4 |" in text and "| `target_modules` | " in text
    assert {"peft-heft", "heft", "lora", "reft"} <= set(card.data.tags) and card.data.library_name == "peft"


def test_card_says_how_to_evaluate_and_what_goes_wrong_elsewhere(tmp_path):
    """The snippet names lm_eval's `heft` model (with the base model filled in) and says plainly that lm_eval's `hf`
    stops and that other scorers calling model(input_ids) on prompt + answer get no error."""
    model = get_peft_model(tiny_llama(), heft_config())
    model.peft_config["default"].base_model_name_or_path = "org/base-model"
    model.save_pretrained(tmp_path)
    update_model_card(tmp_path, model.peft_config["default"])
    text = (tmp_path / "README.md").read_text()
    command = f"python -m peft_heft.lm_eval --model heft --model_args pretrained=org/base-model,peft={tmp_path}"
    assert command in text
    assert "`--model hf` stops with an error" in text and "**with no error**" in text
    assert "intervention_prompt_lengths=" in text


def test_other_peft_methods_get_no_heft_section(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert SECTION_BEGIN not in text and "peft_heft" not in text


def test_trainer_card_has_loading_code_schedule_data_and_metrics(tmp_path):
    warnings.filterwarnings("ignore", category=FutureWarning)
    tokenizer = tiny_tokenizer()
    args = HeftSFTConfig(
        output_dir=str(tmp_path),
        lora_max_steps=2,
        reft_max_steps=3,
        lora_learning_rate=1e-3,
        reft_learning_rate=5e-3,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        hub_model_id="someone/heft-tiny",
    )
    trainer = StagedSFTTrainer(
        model=tiny_sft_model(),
        args=args,
        processing_class=tokenizer,
        train_dataset=make_dataset("prompt_completion", 16),
        peft_config=heft_config(intervention_layers=[0, 1]),
    )
    trainer.train()
    (tmp_path / "README.md").unlink(missing_ok=True)
    trainer.create_model_card(dataset_name="someone/yes-no", tags=["demo"])
    card = ModelCard.load(tmp_path / "README.md")
    text = card.text
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "import peft_heft" in quick_start and "pipeline(" not in quick_start
    assert 'AutoPeftModelForCausalLM.from_pretrained("someone/heft-tiny")' in quick_start
    assert "| lora | - | 2 | 0.001 | 2 |" in text and "| reft | - | 3 | 0.005 | 3 |" in text
    lora_loss = trainer.completed_stages["lora"]["train_loss"]
    assert f"| lora_train_loss | {lora_loss:.4g} |" in text
    assert "Training data: `someone/yes-no`." in text
    assert "someone/yes-no" in card.data.datasets and {"demo", "peft-heft", "trl"} <= set(card.data.tags)


def test_trainer_save_model_keeps_an_existing_card(tmp_path):
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = HeftSFTConfig(
        output_dir=str(tmp_path),
        lora_max_steps=1,
        reft_max_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    trainer = StagedSFTTrainer(
        model=tiny_sft_model(),
        args=args,
        processing_class=tiny_tokenizer(),
        train_dataset=make_dataset("prompt_completion", 8),
        peft_config=heft_config(intervention_layers=[0, 1]),
    )
    trainer.train()
    (tmp_path / "README.md").write_text("# Mine\n\nKeep this line.\n")
    trainer.save_model()
    text = (tmp_path / "README.md").read_text()
    assert "Keep this line." in text and SECTION_BEGIN in text
