"""The trainer's public per-stage API: `train_stage`, `completed_stages`, `stage`, and the user's `args` left alone."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from sft_fixtures import cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer

from peft_heft import HeftCallback, StagedSFTTrainer
from peft_heft.trainer.checkpoints import MARKER_NAME
from peft_heft.trainer.config import derived_arguments

PACKAGE = Path(__file__).resolve().parent.parent / "peft_heft"


def make_trainer(args, callbacks=None) -> StagedSFTTrainer:
    return StagedSFTTrainer(
        tiny_sft_model(),
        args=args,
        train_dataset=make_dataset("prompt_completion", 32),
        processing_class=tiny_tokenizer(),
        peft_config=sft_heft_config(),
        callbacks=callbacks,
    )


def as_json(args) -> str:
    return args.to_json_string()


class WatchArgs(HeftCallback):
    """Records, at every step, the user's args (as JSON), what `trainer.args` is, and the stage's own values."""

    def __init__(self, user_args) -> None:
        self.user_args, self.seen = user_args, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append((as_json(self.user_args), args is self.user_args, args.max_steps, args.learning_rate))


def test_training_never_changes_the_users_args(tmp_path):
    args = cpu_sft_args(str(tmp_path / "out"), lora_max_steps=3, reft_max_steps=2, reft_learning_rate=5e-3)
    args.save_total_limit = 2  # the stage's copy drops it; the user's object must keep it
    before = as_json(args)
    watch = WatchArgs(args)
    trainer = make_trainer(args, callbacks=[watch])
    assert as_json(args) == before and trainer.args is args
    trainer.train()
    assert as_json(args) == before
    assert trainer.args is args and trainer.stage is None and trainer.stage_index is None
    # during each stage the trainer ran on its own copy, with the stage's schedule; the user's object never moved
    assert {seen[0] for seen in watch.seen} == {before}
    assert not any(seen[1] for seen in watch.seen)
    assert [(s[2], s[3]) for s in watch.seen] == [(3, 1e-2)] * 3 + [(2, 5e-3)] * 2
    assert args.max_steps == -1 and args.learning_rate != 1e-2 and args.save_total_limit == 2


def test_derived_arguments_copy_without_touching_the_accelerator(tmp_path):
    args = cpu_sft_args(str(tmp_path / "out"))
    trainer = make_trainer(args)
    copy = derived_arguments(args, learning_rate=0.5)
    assert copy is not args and copy.learning_rate == 0.5 and args.learning_rate != 0.5
    assert trainer.accelerator.state.mixed_precision == "no"  # dataclasses.replace would have reset this state
    with pytest.raises(TypeError, match="no option 'not_an_option'"):
        derived_arguments(args, not_an_option=1)


def test_train_stage_by_stage_equals_train(tmp_path):
    whole = make_trainer(cpu_sft_args(str(tmp_path / "a"), lora_max_steps=3, reft_max_steps=3))
    out = whole.train()
    staged = make_trainer(cpu_sft_args(str(tmp_path / "b"), lora_max_steps=3, reft_max_steps=3))
    lora = staged.train_stage("lora")
    assert set(staged.completed_stages) == {"lora"} and lora.global_step == 3
    reft = staged.train_stage("reft")
    assert reft.global_step == 3 and reft.training_loss == pytest.approx(out.metrics["reft_train_loss"])
    a, b = whole.model.state_dict(), staged.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert staged.combined_output().metrics["train_steps"] == out.metrics["train_steps"] == 6
    copied = staged.completed_stages
    copied["lora"]["train_loss"] = -1.0  # a copy: what the trainer recorded stays
    assert staged.completed_stages["lora"]["train_loss"] != -1.0


def test_train_stage_refuses_unknown_stages_and_bool_resume(tmp_path):
    trainer = make_trainer(cpu_sft_args(str(tmp_path / "out"), lora_max_steps=1, reft_max_steps=1))
    with pytest.raises(ValueError, match="not in args.stage_order"):
        trainer.train_stage("joint")
    with pytest.raises(TypeError, match="train\\(resume_from_checkpoint=True\\)"):
        trainer.train_stage("lora", resume_from_checkpoint=True)  # type: ignore[arg-type]


def test_stage_args_overrides_apply_to_the_copy_only(tmp_path):
    args = cpu_sft_args(str(tmp_path / "out"), lora_max_steps=2, reft_max_steps=2)
    before = as_json(args)
    watch = WatchArgs(args)
    trainer = make_trainer(args, callbacks=[watch])
    trainer.train_stage("lora", args_overrides={"lora_learning_rate": 3e-3})
    assert [s[3] for s in watch.seen] == [3e-3, 3e-3]
    assert as_json(args) == before and trainer.args is args


def test_checkpoint_marker_and_rotation_after_the_save(tmp_path):
    """The marker is written after Trainer's save (on_save), and rotation keeps save_total_limit complete ones."""
    args = cpu_sft_args(str(tmp_path / "out"), lora_max_steps=4, reft_max_steps=1, save_strategy="steps", save_steps=1)
    args.save_total_limit = 2
    make_trainer(args).train()
    stage = tmp_path / "out" / "stage-0-lora"
    kept = sorted(os.listdir(stage))
    assert kept == ["checkpoint-3", "checkpoint-4"]
    for name in kept:
        marker = json.loads((stage / name / MARKER_NAME).read_text())
        assert marker["stage"] == "lora" and marker["files"]
        assert not [f for f in os.listdir(stage / name) if ".tmp" in f]


# ------------------------------------------------------------------ layout rules of the package
def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_search_and_cli_use_only_the_trainers_public_api():
    for name in ("trainer/search.py", "cli.py"):
        tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"))
        private = [
            f"{name}:{node.lineno} trainer.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "trainer"
            and node.attr.startswith("_")
        ]
        assert not private, private


def test_staged_sft_does_not_import_the_search():
    tree = ast.parse((PACKAGE / "trainer" / "staged_sft.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert "search" not in (node.module or ""), node.module
        if isinstance(node, ast.Import):
            assert not any("search" in alias.name for alias in node.names)
    assert not hasattr(StagedSFTTrainer, "search_fine_stage")


def test_trainer_exports_are_one_list():
    import peft_heft
    import peft_heft.trainer

    assert list(peft_heft.trainer.__all__) == list(peft_heft._TRAINER_EXPORTS)
    for name in peft_heft.trainer.__all__:
        assert getattr(peft_heft, name) is getattr(peft_heft.trainer, name)
