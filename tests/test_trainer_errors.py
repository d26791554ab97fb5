"""StagedSFTTrainer's early, clear errors: each names the problem and the fix (the tests assert both pieces)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import warnings

import pytest
from datasets import Dataset
from sft_fixtures import Crash, CrashAt, cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer

from peft_heft import HeftConfig, StagedSFTTrainer
from peft_heft.trainer.checkpoints import MARKER_NAME, checkpoint_problem, complete_checkpoints, read_marker

warnings.filterwarnings("ignore", category=FutureWarning)


def peft_config(**overrides) -> HeftConfig:
    return sft_heft_config(**overrides)


def make_trainer(output_dir, data=None, config=None, callbacks=None, tokenizer="tiny", model=None, **arg_overrides):
    return StagedSFTTrainer(
        model if model is not None else tiny_sft_model(),
        args=cpu_sft_args(str(output_dir), **arg_overrides),
        train_dataset=data if data is not None else make_dataset("prompt_completion", 32),
        processing_class=tiny_tokenizer() if tokenizer == "tiny" else tokenizer,
        peft_config=config or peft_config(),
        callbacks=callbacks,
    )


def assert_pieces(error: pytest.ExceptionInfo, *pieces: str) -> None:
    message = str(error.value)
    missing = [p for p in pieces if p not in message]
    assert not missing, f"{missing} not in: {message}"


# ------------------------------------------------------------------ 1. dataset format
SFT_FORMAT_PIECES = ("'text'", "'messages'", "'prompt' + 'completion'", "'conversations'", "'input_ids'")


def test_dataset_in_no_sft_format_lists_every_format_and_the_fixes(tmp_path):
    data = Dataset.from_list([{"question": "w1 w2 ?", "answer": "yes"}] * 4)
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", data=data)
    assert_pieces(error, "columns ['question', 'answer']", *SFT_FORMAT_PIECES, "rename_column", "formatting_func")
    # eval data in no format is named as such, too
    with pytest.raises(ValueError) as error:
        StagedSFTTrainer(
            tiny_sft_model(),
            args=cpu_sft_args(str(tmp_path / "out")),
            train_dataset=make_dataset("prompt_completion", 8),
            eval_dataset=data,
            processing_class=tiny_tokenizer(),
            peft_config=peft_config(),
        )
    assert_pieces(error, "The eval dataset has columns ['question', 'answer']")


def test_preference_data_is_named_with_the_rename_to_completion(tmp_path):
    data = Dataset.from_list([{"prompt": "w1 w2 ?", "chosen": " yes", "rejected": " no"}] * 4)
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", data=data)
    assert_pieces(
        error, "'prompt' column but no 'completion'", "preference data", "rename_column('chosen', 'completion')"
    )
    implicit = Dataset.from_list([{"chosen": "w1 yes", "rejected": "w1 no"}] * 4)  # no prompt column
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", data=implicit)
    assert_pieces(error, "preference data", "'chosen' as 'messages'", *SFT_FORMAT_PIECES)


def test_custom_text_field_and_formatting_func_are_accepted_and_named(tmp_path):
    data = Dataset.from_list([{"body": "w1 w2 ? Answer: yes"}] * 8)
    trainer = make_trainer(tmp_path / "out", data=data, dataset_text_field="body")
    assert "input_ids" in trainer.train_dataset.column_names
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", data=data.rename_column("body", "other"), dataset_text_field="body")
    assert_pieces(error, "dataset_text_field, now 'body'", "columns ['other']")
    # a formatting function builds the text, so any columns go
    odd = Dataset.from_list([{"q": "w1 w2 ?", "a": "yes"}] * 8)
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=cpu_sft_args(str(tmp_path / "out"), completion_only_loss=False),
        train_dataset=odd,
        processing_class=tiny_tokenizer(),
        peft_config=peft_config(),
        formatting_func=lambda row: f"{row['q']} Answer: {row['a']}",
    )
    assert len(trainer.train_dataset) == 8


# ------------------------------------------------------------------ 2. empty datasets
def test_empty_train_dataset_is_named_not_a_stop_iteration(tmp_path):
    empty = make_dataset("prompt_completion", 8).filter(lambda row: False)
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", data=empty)
    assert_pieces(error, "train_dataset is empty (0 rows)", "nothing to train on", "filter")
    assert not isinstance(error.value.__cause__, StopIteration)


def test_empty_eval_dataset_is_named_with_eval_dataset_none_as_the_fix(tmp_path):
    for eval_dataset, name in (
        (make_dataset("prompt_completion", 4).select([]), "eval_dataset is empty"),
        ({"held_out": make_dataset("prompt_completion", 4).select([])}, "eval_dataset['held_out'] is empty"),
    ):
        with pytest.raises(ValueError) as error:
            StagedSFTTrainer(
                tiny_sft_model(),
                args=cpu_sft_args(str(tmp_path / "out")),
                train_dataset=make_dataset("prompt_completion", 8),
                eval_dataset=eval_dataset,
                processing_class=tiny_tokenizer(),
                peft_config=peft_config(),
            )
        assert_pieces(error, name, "eval_dataset=None")


# ------------------------------------------------------------------ 3. prompts longer than max_length
def test_every_prompt_longer_than_max_length_is_a_clear_error(tmp_path):
    # keep_start keeps only prompt tokens, TRL drops every row (nothing left to learn); before, the prompt-length map
    # of the emptied dataset failed with "Column name ['heft_full_length'] not in the dataset"
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", data=make_dataset("prompt_completion", 8), max_length=3)
    assert_pieces(error, "Every example of the train dataset (8) was dropped", "max_length=3", "Raise max_length")
    assert "heft_full_length" not in str(error.value)


def test_some_prompts_longer_than_max_length_warn_with_the_count(tmp_path, caplog):
    long = {"prompt": " ".join(f"w{i}" for i in range(12)) + " Answer:", "completion": " yes"}
    data = Dataset.from_list([long] * 2 + [{"prompt": "w1 ? Answer:", "completion": " no"}] * 6)
    with caplog.at_level(logging.WARNING, logger="peft_heft.trainer.staged_sft"):
        trainer = make_trainer(tmp_path / "out", data=data, max_length=8)
    assert len(trainer.train_dataset) == 6
    assert "2 of 8 examples of the train dataset were dropped" in caplog.text and "max_length=8" in caplog.text


# ------------------------------------------------------------------ 4. None values
@pytest.mark.parametrize("column", ["prompt", "completion"])
def test_none_prompt_or_completion_names_the_row_and_column(tmp_path, column):
    rows = [{"prompt": f"w{i} ? Answer:", "completion": " yes"} for i in range(10)]
    rows[4][column] = None
    rows[7][column] = None
    data = Dataset.from_list(rows).select([9, 8, 7, 6, 5, 4, 3])  # a view: rows are counted as the trainer sees them
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", data=data)
    assert_pieces(
        error,
        f"Row 2 of the train dataset has {column}=None",
        "2 rows in all: 2, 5",
        f"dataset.filter(lambda row: row[{column!r}] is not None)",
    )


def test_none_text_or_messages_names_the_row_and_column(tmp_path):
    text = Dataset.from_list([{"text": "w1 w2"}, {"text": None}, {"text": "w3"}])
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", data=text)
    assert_pieces(error, "Row 1 of the train dataset has text=None", "row['text'] is not None")
    turns = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "yes"}]
    messages = Dataset.from_list([{"messages": turns}, {"messages": turns}, {"messages": None}])
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", data=messages)
    assert_pieces(error, "Row 2 of the train dataset has messages=None")


# ------------------------------------------------------------------ 5. output_dir
class PreparedData(RuntimeError):
    pass


@pytest.fixture
def no_dataset_preparation(monkeypatch):
    """Fail if the trainer gets as far as preparing data: the output_dir check must come before that work."""

    def refuse(self, *args, **kwargs):
        raise PreparedData("output_dir was not checked before the dataset was prepared")

    monkeypatch.setattr(StagedSFTTrainer, "_prepare_dataset", refuse)


def test_output_dir_that_is_a_file_is_refused_at_construction(tmp_path, no_dataset_preparation):
    path = tmp_path / "results.txt"
    path.write_text("not a folder")
    with pytest.raises(NotADirectoryError) as error:
        make_trainer(path)
    assert_pieces(error, f"output_dir={str(path)!r} is an existing file, not a folder", "Pass the path of a folder")


def test_output_dir_under_a_file_is_refused_at_construction(tmp_path, no_dataset_preparation):
    # the root-proof way to get an output_dir that cannot be written: one of its parents is a file
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError) as error:
        make_trainer(tmp_path / "file" / "run" / "out")
    assert_pieces(error, "cannot be created", f"{tmp_path / 'file'} is a file, not a folder", "parents are folders")


def test_unwritable_output_dir_is_refused_at_construction(tmp_path, monkeypatch, no_dataset_preparation):
    # root writes through any permission bits, so the write probe is made to fail as a read-only folder makes it fail
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError) as error:
        make_trainer(tmp_path / "out")
    assert_pieces(error, "is not writable (Permission denied)", "Pass an output_dir you can write to")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_output_dir_is_refused_for_a_normal_user(tmp_path, no_dataset_preparation):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(PermissionError) as error:
            make_trainer(folder / "out")
        assert_pieces(error, "is not writable", "fix its permissions")
    finally:
        folder.chmod(stat.S_IRWXU)


def test_save_model_into_a_file_is_refused_like_the_constructor_does(tmp_path, monkeypatch):
    from peft_heft import persistence

    (tmp_path / "adapter.bin").write_text("a file")
    (tmp_path / "file").write_text("x")
    args = cpu_sft_args(tmp_path / "out")
    for target, pieces in [
        (
            tmp_path / "adapter.bin",
            ["save_model's output_dir=", "is an existing file, not a folder", "save_model('a-folder')"],
        ),
        (tmp_path / "file" / "sub", ["cannot be created", "is a file, not a folder"]),
    ]:
        with pytest.raises(NotADirectoryError) as error:
            persistence.save_trainer_output(str(target), args, lambda folder: None)
        assert_pieces(error, *pieces)
    assert (tmp_path / "adapter.bin").read_text() == "a file"


# ------------------------------------------------------------------ 6. processing_class
def test_model_built_from_a_config_needs_processing_class(tmp_path):
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", tokenizer=None)
    assert_pieces(error, "processing_class is None", "LlamaForCausalLM", "built from a config", "processing_class=")


def test_model_folder_without_tokenizer_files_needs_processing_class(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_sft_model().save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", tokenizer=None, model=model)
    assert_pieces(error, f"folder {tmp_path / 'model'} holds no tokenizer files", "processing_class=tokenizer")


# ------------------------------------------------------------------ 7. damaged checkpoints
CHECKPOINT_ARGS = dict(lora_max_steps=6, reft_max_steps=4, save_strategy="steps", save_steps=3)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run's output_dir: stage-0-lora/checkpoint-{3,6}, stage-1-reft/checkpoint-{3,4}."""
    out = tmp_path_factory.mktemp("finished") / "out"
    make_trainer(out, **CHECKPOINT_ARGS).train()
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)  # copy2 keeps the markers' mtimes, so the newest checkpoint stays the newest
    return out


def cut_in_half(path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def test_marker_lists_every_file_with_its_size(finished_run):
    checkpoint = finished_run / "stage-1-reft" / "checkpoint-4"
    marker = read_marker(str(checkpoint))
    files = {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.name != MARKER_NAME}
    assert marker["format"] == 2 and marker["files"] == files
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(files)
    assert marker["stage_train_loss"]["steps"] == 4
    assert checkpoint_problem(str(checkpoint), marker) is None


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt"])
def test_resume_from_a_truncated_checkpoint_names_the_broken_file(run_copy, name):
    checkpoint = run_copy / "stage-1-reft" / "checkpoint-4"
    cut_in_half(checkpoint / name)
    trainer = make_trainer(run_copy, **CHECKPOINT_ARGS)
    with pytest.raises(ValueError) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_pieces(error, f"Checkpoint {checkpoint} is damaged: {name} is", "resume_from_checkpoint=True")
    assert_pieces(error, f"The latest whole checkpoint is {run_copy / 'stage-1-reft' / 'checkpoint-3'}")


def test_resume_true_skips_a_truncated_checkpoint_with_a_warning(run_copy, caplog):
    cut_in_half(run_copy / "stage-1-reft" / "checkpoint-4" / "adapter_model.safetensors")
    trainer = make_trainer(run_copy, **CHECKPOINT_ARGS)
    with caplog.at_level(logging.WARNING, logger="peft_heft.trainer.checkpoints"):
        out = trainer.train(resume_from_checkpoint=True)
    assert f"Skipping checkpoint {run_copy / 'stage-1-reft' / 'checkpoint-4'}" in caplog.text
    assert "adapter_model.safetensors is" in caplog.text and "previous complete checkpoint" in caplog.text
    assert out.metrics["reft_train_steps"] == 4  # resumed at reft step 3: one step left
    assert [e["step"] for e in trainer.state.log_history if "loss" in e and e.get("stage") == "reft"][-1] == 4


def test_resume_true_with_every_checkpoint_damaged_lists_them(run_copy):
    for _, _, path in complete_checkpoints(str(run_copy)):
        cut_in_half(os.path.join(path, "optimizer.pt"))
    with pytest.raises(ValueError) as error:
        make_trainer(run_copy, **CHECKPOINT_ARGS).train(resume_from_checkpoint=True)
    assert_pieces(error, "every checkpoint in", "checkpoint-3: optimizer.pt", "resume_from_checkpoint=None")


def test_old_markers_without_a_file_list_still_resume_and_get_content_checks(run_copy):
    for _, _, path in complete_checkpoints(str(run_copy)):
        marker = read_marker(path)
        for key in ("files", "stage_train_loss"):
            marker.pop(key, None)
        marker["format"] = 1
        marker_path = os.path.join(path, MARKER_NAME)
        stamp = os.path.getmtime(marker_path)
        with open(marker_path, "w", encoding="utf-8") as handle:
            json.dump(marker, handle)
        os.utime(marker_path, (stamp, stamp))
    newest = run_copy / "stage-1-reft" / "checkpoint-4"
    # without sizes, a safetensors header, a torch.save zip directory and JSON syntax still show truncation
    for name, piece in (
        ("adapter_model.safetensors", "header describes"),
        ("optimizer.pt", "torch.save archive"),
        ("trainer_state.json", "not valid JSON"),
    ):
        shutil.copy2(newest / name, run_copy / "whole")
        cut_in_half(newest / name)
        problem = checkpoint_problem(str(newest), read_marker(str(newest)))
        assert problem is not None and problem.startswith(name) and piece in problem, problem
        shutil.copy2(run_copy / "whole", newest / name)
        assert checkpoint_problem(str(newest), read_marker(str(newest))) is None
    cut_in_half(newest / "optimizer.pt")
    out = make_trainer(run_copy, **CHECKPOINT_ARGS).train(resume_from_checkpoint=True)  # falls back to checkpoint-3
    assert out.metrics["reft_train_steps"] == 4


def test_checking_a_checkpoint_never_unpickles(finished_run, monkeypatch):
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint check unpickled a file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    for _, _, path in complete_checkpoints(str(finished_run)):
        assert checkpoint_problem(path, read_marker(path)) is None


def test_rewriting_an_old_runs_checkpoint_drops_its_marker_first(run_copy, monkeypatch):
    trainer = make_trainer(run_copy, **CHECKPOINT_ARGS)

    def crash(output_dir):
        raise Crash("power cut while saving")

    monkeypatch.setattr(trainer, "_save_rng_state", crash)
    with pytest.raises(Crash):
        trainer.train()  # a new run into the same output_dir: its first save rewrites stage-0-lora/checkpoint-3
    # the old run's marker would have vouched for a folder holding the new run's half-written files
    assert not (run_copy / "stage-0-lora" / "checkpoint-3" / MARKER_NAME).exists()


# ------------------------------------------------------------------ 8. another adapter configuration
@pytest.mark.parametrize(
    ("overrides", "pieces"),
    [
        (dict(r=8), ["r: checkpoint 4, this run 8"]),
        (dict(intervention_positions="f1+l1"), ["intervention_positions: checkpoint 'f2+l2', this run 'f1+l1'"]),
        (dict(target_modules=["q_proj"]), ["target_modules: checkpoint ['q_proj', 'v_proj'], this run ['q_proj']"]),
        (
            dict(share_intervention_weights=True, intervention_rank=3),
            [
                "intervention_rank: checkpoint 2, this run 3",
                "share_intervention_weights: checkpoint False, this run True",
            ],
        ),
    ],
)
def test_resume_with_another_heft_config_names_the_fields_and_both_values(finished_run, overrides, pieces):
    checkpoint = finished_run / "stage-0-lora" / "checkpoint-3"
    trainer = make_trainer(finished_run, config=peft_config(**overrides), **CHECKPOINT_ARGS)
    with pytest.raises(ValueError) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_pieces(error, f"Checkpoint {checkpoint} was trained with another adapter configuration", *pieces)
    assert_pieces(error, "adapter_config.json", "new output_dir")


def test_same_adapter_written_differently_resumes(run_copy):
    # a set of target modules in another order is the same adapter (the checkpoint's JSON lists them in any order)
    config = peft_config(target_modules={"v_proj", "q_proj"})
    out = make_trainer(run_copy, config=config, **CHECKPOINT_ARGS).train(
        resume_from_checkpoint=str(run_copy / "stage-1-reft" / "checkpoint-3")
    )
    assert out.metrics["reft_train_steps"] == 4
    # [-2, -1] are layers [0, 1] of the 2-layer model: not a difference for the resume check
    from peft_heft.trainer.validation import check_same_adapter

    check_same_adapter(
        str(run_copy / "stage-1-reft" / "checkpoint-3"), peft_config(intervention_layers=[-2, -1]), "default"
    )


# ------------------------------------------------------------------ 9. train_loss of a resumed run
LOSS_KEYS = ("train_loss", "lora_train_loss", "reft_train_loss")


@pytest.mark.parametrize(
    ("crash_stage", "crash_step", "logging_steps"),
    [("lora", 5, 1), ("reft", 4, 1), ("lora", 5, 2)],  # logging_steps=2: the checkpoint at step 3 is between logs
)
def test_resumed_train_loss_equals_the_uninterrupted_runs(tmp_path, crash_stage, crash_step, logging_steps):
    args = dict(lora_max_steps=6, reft_max_steps=5, save_strategy="steps", save_steps=3, warmup_steps=1)
    args["logging_steps"] = logging_steps
    reference = make_trainer(tmp_path / "ref", **args).train()
    with pytest.raises(Crash):
        make_trainer(tmp_path / "run", callbacks=[CrashAt(crash_stage, crash_step)], **args).train()
    resumed_trainer = make_trainer(tmp_path / "run", **args)
    resumed = resumed_trainer.train(resume_from_checkpoint=True)
    for key in LOSS_KEYS:
        assert resumed.metrics[key] == pytest.approx(reference.metrics[key], rel=1e-6, abs=1e-6), key
    assert resumed.training_loss == pytest.approx(reference.training_loss, rel=1e-6, abs=1e-6)
    # the stage's own log entry reports the whole stage's loss too
    logged = [
        e["train_loss"]
        for e in resumed_trainer.state.log_history
        if e.get("stage") == crash_stage and "train_loss" in e
    ]
    assert logged[-1] == pytest.approx(reference.metrics[f"{crash_stage}_train_loss"], rel=1e-6)


def test_train_loss_after_resuming_from_a_stage_ending_checkpoint(tmp_path):
    args = dict(lora_max_steps=6, reft_max_steps=3, save_strategy="steps", save_steps=3, logging_steps=4)
    reference = make_trainer(tmp_path / "ref", **args).train()
    with pytest.raises(Crash):
        make_trainer(tmp_path / "run", callbacks=[CrashAt("reft", 1)], **args).train()
    assert complete_checkpoints(str(tmp_path / "run"))[-1][:2] == (0, 6)  # the LoRA stage's last step
    resumed = make_trainer(tmp_path / "run", **args).train(resume_from_checkpoint=True)
    # logging every 4 steps: the mean of the logged losses (the old estimate) is not the stage's loss; the total is
    for key in LOSS_KEYS:
        assert resumed.metrics[key] == pytest.approx(reference.metrics[key], rel=1e-6, abs=1e-6), key


def test_an_unreadable_marker_counts_as_an_incomplete_checkpoint(run_copy):
    newest = run_copy / "stage-1-reft" / "checkpoint-4"
    (newest / MARKER_NAME).write_text('{"format": 2, "stage_in')
    assert str(newest) not in [c[2] for c in complete_checkpoints(str(run_copy))]
    with pytest.raises(ValueError) as error:
        make_trainer(run_copy, **CHECKPOINT_ARGS).train(resume_from_checkpoint=str(newest))
    assert_pieces(error, f"Checkpoint {newest} is incomplete", "checkpoint-3")


# FSDP1: refused at construction (FSDP2 and DeepSpeed train: tests/test_trainer_sharded.py), before an Accelerator is
# built
def test_fsdp1_from_accelerate_launch_config_is_refused(tmp_path, monkeypatch):
    args = cpu_sft_args(str(tmp_path / "out"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file <fsdp config>` exports
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError) as error:
        StagedSFTTrainer(
            tiny_sft_model(),
            args=args,
            train_dataset=make_dataset("prompt_completion", 8),
            processing_class=tiny_tokenizer(),
            peft_config=peft_config(),
        )
    assert_pieces(
        error, "does not support FSDP version 1 (ACCELERATE_USE_FSDP=true", "FlatParameter", "fsdp_version: 2"
    )


def test_fsdp1_in_training_args_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # HeftSFTConfig(fsdp=...) exports it: restore after
    with pytest.raises(ValueError) as error:
        make_trainer(tmp_path / "out", fsdp=True, fsdp_config={"version": 1})
    assert_pieces(error, "does not support FSDP version 1 (args.fsdp is set)", "FlatParameter", "fsdp_version: 2")


def test_accelerate_flags_set_to_false_are_not_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert make_trainer(tmp_path / "out").args.fsdp in (False, None, "", [])
