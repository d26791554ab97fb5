"""Quickstart: base model -> HEFT adapter -> both stages with TRL -> save -> reload -> generate -> accuracy.

Runs offline on the embedded SmolLM2-135M-Instruct and Rotten Tomatoes reviews in about a minute on 2 CPU cores
(the budget is tiny on purpose; `examples/demo.py` trains longer). The sections between the `--8<--` markers are the
code blocks of docs/quickstart.md, so the page shows exactly what this file runs (tests/test_docs.py runs it).

Run: `.venv/bin/python examples/quickstart.py`
"""

# ruff: noqa: E402, F401, I001  (imports sit in the section that first needs them, as on the docs page)
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)

# --8<-- [start:model]
import peft_heft  # registers the HEFT method with PEFT
from peft_heft.assets import load_model_and_tokenizer, load_task_dataset

model, tokenizer = load_model_and_tokenizer("embedded:smollm2-135m-instruct")  # or a hub id / local folder
data = load_task_dataset("rotten_tomatoes", max_train=64, max_test=32)  # TRL prompt-completion conversations
print(data["train"][0]["prompt"][0]["content"], "->", data["train"][0]["completion"][0]["content"])
# --8<-- [end:model]

# --8<-- [start:adapter]
from peft import get_peft_model
from peft_heft import HeftConfig

config = HeftConfig(
    task_type="CAUSAL_LM",
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "v_proj"],  # stage 1: LoRA
    intervention_layers="all",
    intervention_rank=4,
    intervention_positions="f5+l5",  # stage 2: LoReFT
)
model = get_peft_model(model, config)
model.print_trainable_parameters()
# --8<-- [end:adapter]

# --8<-- [start:train]
from peft_heft import HeftSFTConfig, StagedSFTTrainer

args = HeftSFTConfig(
    output_dir="heft-quickstart",
    lora_num_train_epochs=1,
    reft_num_train_epochs=1,  # the paper uses 3 + 3
    lora_learning_rate=5e-4,
    reft_learning_rate=2e-3,
    per_device_train_batch_size=8,
    logging_steps=4,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,  # drop these three on a GPU
)
trainer = StagedSFTTrainer(model=model, args=args, train_dataset=data["train"], processing_class=tokenizer)
output = trainer.train()
print({k: round(v, 3) for k, v in output.metrics.items() if k.endswith("train_loss")})
trainer.save_model()  # adapter_config.json + adapter_model.safetensors (+ README.md model card)
# --8<-- [end:train]

# --8<-- [start:reload]
from peft import PeftModel

base, _ = load_model_and_tokenizer("embedded:smollm2-135m-instruct")
reloaded = PeftModel.from_pretrained(base, "heft-quickstart")

messages = data["test"][0]["prompt"]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
print(tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
# --8<-- [end:reload]

# --8<-- [start:measure]
from peft_heft.evaluation import evaluate_generation_accuracy

result = evaluate_generation_accuracy(reloaded, tokenizer, data["test"], choices=["positive", "negative"])
print(f"held-out accuracy {result['accuracy']:.3f} ({result['correct']}/{result['total']})")
# --8<-- [end:measure]
