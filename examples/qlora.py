"""QLoRA-style HEFT: both stages on a bitsandbytes 4-bit (nf4/fp4) or 8-bit base, then reload onto a fresh one.

What it shows, offline (the embedded SmolLM2-135M-Instruct, nothing downloaded):

1. the base quantized on load (`BitsAndBytesConfig`; bitsandbytes >= 0.50 also runs it on CPU) and
   `prepare_model_for_kbit_training`;
2. `get_peft_model(base, HeftConfig(...))`: LoRA on the quantized linear layers, interventions in float32 on each
   layer's device (never the quantized weights' uint8/int8);
3. `StagedSFTTrainer`: the LoRA stage, then the ReFT stage, with accuracy before and after;
4. `save_pretrained`, then `PeftModel.from_pretrained` onto a freshly quantized base: same answers.

Run: `.venv/bin/python examples/qlora.py` (`--quantization fp4` or `int8`; `--fast`: 2 steps per stage of 4
reviews, used by the tests). On CPU the compute dtype is float32, on a GPU bfloat16.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from peft_heft import HeftConfig, HeftSFTConfig, StagedSFTTrainer
from peft_heft.assets import EMBEDDED_MODEL, load_task_dataset, resolve_model_name_or_path
from peft_heft.evaluation import evaluate_generation_accuracy

CHOICES = ["positive", "negative"]


def quantized_base(path: str, quantization: str):
    cuda = torch.cuda.is_available()
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=compute_dtype
        )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="auto" if cuda else "cpu", dtype=compute_dtype
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", default=EMBEDDED_MODEL)
    parser.add_argument("--quantization", choices=["nf4", "fp4", "int8"], default="nf4")
    parser.add_argument("--output_dir", default="out/heft-qlora")
    parser.add_argument("--fast", action="store_true", help="2 steps per stage of 4 reviews (used by the tests)")
    cli = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(0)

    path = resolve_model_name_or_path(cli.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = load_task_dataset("rotten_tomatoes", max_train=8 if cli.fast else 256, max_test=4 if cli.fast else 64)

    base = quantized_base(path, cli.quantization)
    weights = sorted({str(p.dtype).removeprefix("torch.") for n, p in base.named_parameters() if "proj" in n})
    print(
        f"base quantized ({cli.quantization}): linear weights stored as {', '.join(weights)}; "
        f"{base.get_memory_footprint() / 2**20:.0f} MiB"
    )
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=not cli.fast)
    config = HeftConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        intervention_layers="all",
        intervention_rank=4,
        intervention_positions="f5+l5",
    )
    model = get_peft_model(base, config)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.base_model.heft_interventions.parameters()})
    print(f"interventions: {len(model.base_model.heft_interventions['default'])} modules in {', '.join(dtypes)}")

    cuda = torch.cuda.is_available()
    steps = 2 if cli.fast else None
    args = HeftSFTConfig(
        output_dir=cli.output_dir,
        lora_num_train_epochs=3,
        reft_num_train_epochs=3,
        lora_max_steps=steps,
        reft_max_steps=steps,
        lora_learning_rate=5e-4,
        reft_learning_rate=2e-3,
        per_device_train_batch_size=4 if cli.fast else 8,
        max_length=128 if cli.fast else 1024,
        save_strategy="no",
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=not cli.fast,
        disable_tqdm=True,
        logging_steps=10,
    )
    test = data["test"]
    before = evaluate_generation_accuracy(model, tokenizer, test, choices=CHOICES, max_new_tokens=3)
    trainer = StagedSFTTrainer(model=model, args=args, train_dataset=data["train"], processing_class=tokenizer)
    output = trainer.train()
    model = trainer.model.eval()
    after = evaluate_generation_accuracy(model, tokenizer, test, choices=CHOICES, max_new_tokens=3)
    print(
        f"accuracy before {before['accuracy']:.3f} -> after LoRA + ReFT {after['accuracy']:.3f} "
        f"({output.metrics['lora_train_steps']} + {output.metrics['reft_train_steps']} steps)"
    )

    model.save_pretrained(cli.output_dir)
    reloaded = PeftModel.from_pretrained(quantized_base(path, cli.quantization), cli.output_dir).eval()
    again = evaluate_generation_accuracy(reloaded, tokenizer, test, choices=CHOICES, max_new_tokens=3)
    same = again["predictions"] == after["predictions"]
    print(
        f"adapter saved to {cli.output_dir}; reloaded onto a freshly quantized base: accuracy {again['accuracy']:.3f}, "
        f"same answers: {same}"
    )
    return {"before": before["accuracy"], "after": after["accuracy"], "reloaded": again["accuracy"], "same": same}


if __name__ == "__main__":
    main()
