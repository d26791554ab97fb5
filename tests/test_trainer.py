"""StagedSFTTrainer: stages, optimizers, collator positions, resume, atomic saves and input checks."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from sft_fixtures import Crash, CrashAt, cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer

from peft_heft import HeftCallback, HeftConfig, HeftSFTConfig, StagedSFTTrainer
from peft_heft.trainer.checkpoints import MARKER_NAME, complete_checkpoints

warnings.filterwarnings("ignore", category=FutureWarning)


def sft_args(tmp_path, **overrides) -> HeftSFTConfig:
    return cpu_sft_args(str(tmp_path / "out"), **overrides)


def peft_config(**overrides) -> HeftConfig:
    return sft_heft_config(**overrides)


def make_trainer(tmp_path, kind="prompt_completion", n=32, callbacks=None, args=None, config=None, **kwargs):
    return StagedSFTTrainer(
        tiny_sft_model(),
        args=args or sft_args(tmp_path),
        train_dataset=make_dataset(kind, n),
        processing_class=tiny_tokenizer(),
        peft_config=config or peft_config(),
        callbacks=callbacks,
        **kwargs,
    )


def split_params(model):
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    reft = {n: p.detach().clone() for n, p in model.named_parameters() if "heft_interventions" in n}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n not in lora and n not in reft}
    return lora, reft, base


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


class Recorder(HeftCallback):
    def __init__(self):
        self.events, self.snapshots, self.optimizer_sets, self.lrs = [], {}, {}, {}

    def on_stage_begin(self, args, state, control, stage=None, model=None, **kwargs):
        self.events.append(("begin", stage, kwargs["stage_index"], kwargs["num_stages"]))
        self.snapshots[(stage, "begin")] = split_params(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        stage = self.events[-1][1]
        self.optimizer_sets[stage] = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.lrs[stage] = {g.get("initial_lr", g["lr"]) for g in optimizer.param_groups}
        self.trainable = getattr(self, "trainable", {})
        self.trainable[stage] = {id(p) for p in model.parameters() if p.requires_grad}

    def on_stage_end(self, args, state, control, stage=None, model=None, metrics=None, **kwargs):
        self.events.append(("end", stage, sorted(metrics)))
        self.snapshots[(stage, "end")] = split_params(model)


def test_each_stage_changes_only_its_own_parameters(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callbacks=[recorder])
    trainer.train()
    for stage, moves in (("lora", (True, False)), ("reft", (False, True))):
        (lora0, reft0, base0), (lora1, reft1, base1) = (
            recorder.snapshots[(stage, "begin")],
            recorder.snapshots[(stage, "end")],
        )
        assert (changed(lora0, lora1), changed(reft0, reft1)) == moves, stage
        assert not changed(base0, base1), f"base weights moved in stage {stage}"
    # the stage boundary copies nothing: the LoRA trained in stage 1 is what stage 2 starts from
    assert not changed(recorder.snapshots[("lora", "end")][0], recorder.snapshots[("reft", "begin")][0])


def test_optimizer_per_stage_is_exactly_the_trainable_set_with_its_learning_rate(tmp_path):
    recorder = Recorder()
    args = sft_args(tmp_path, lora_learning_rate=3e-3, reft_learning_rate=7e-3)
    trainer = make_trainer(tmp_path, callbacks=[recorder], args=args)
    trainer.train()
    model = trainer.model
    lora_ids = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    reft_ids = {id(p) for n, p in model.named_parameters() if "heft_interventions" in n}
    assert recorder.optimizer_sets["lora"] == lora_ids == recorder.trainable["lora"]
    assert recorder.optimizer_sets["reft"] == reft_ids == recorder.trainable["reft"]
    assert recorder.lrs == {"lora": {3e-3}, "reft": {7e-3}}


def test_joint_and_reversed_stage_orders(tmp_path):
    recorder = Recorder()
    args = sft_args(tmp_path, stage_order=["joint"], joint_max_steps=3)
    trainer = make_trainer(tmp_path, callbacks=[recorder], args=args)
    out = trainer.train()
    model = trainer.model
    both = {id(p) for n, p in model.named_parameters() if "lora_" in n or "heft_interventions" in n}
    assert recorder.optimizer_sets["joint"] == both
    assert out.global_step == 3 and out.metrics["joint_train_steps"] == 3

    class Logits(Recorder):
        """Logits on one fixed batch when the ReFT stage ends and when the LoRA stage begins (LoRA still zero)."""

        batch = {"input_ids": torch.arange(3, 11).view(1, 8), "attention_mask": torch.ones(1, 8, dtype=torch.long)}

        def __init__(self):
            super().__init__()
            self.logits = {}

        def _record(self, key, model):
            with torch.no_grad():
                self.logits[key] = model(**self.batch).logits

        def on_stage_begin(self, args, state, control, stage=None, model=None, **kwargs):
            super().on_stage_begin(args, state, control, stage=stage, model=model, **kwargs)
            self._record((stage, "begin"), model)

        def on_stage_end(self, args, state, control, stage=None, model=None, **kwargs):
            super().on_stage_end(args, state, control, stage=stage, model=model, **kwargs)
            self._record((stage, "end"), model)

    recorder = Logits()
    trainer = make_trainer(tmp_path, callbacks=[recorder], args=sft_args(tmp_path, stage_order=["reft", "lora"]))
    trainer.train()
    assert [e[1] for e in recorder.events if e[0] == "begin"] == ["reft", "lora"]
    lora0, reft0, _ = recorder.snapshots[("lora", "begin")]
    lora1, reft1, _ = recorder.snapshots[("lora", "end")]
    assert changed(lora0, lora1) and not changed(reft0, reft1)
    # The LoRA stage trains on top of the trained interventions: its starting model (LoRA B still zero) is exactly
    # the model the ReFT stage ended with, not the base model without interventions.
    torch.testing.assert_close(recorder.logits[("lora", "begin")], recorder.logits[("reft", "end")], rtol=0, atol=0)
    with trainer.model.disable_adapter():
        base = trainer.model(**Logits.batch).logits.detach()
    assert (recorder.logits[("lora", "begin")] - base).abs().max() > 1e-3


def test_loss_decreases_in_each_stage(tmp_path):
    args = sft_args(tmp_path, lora_max_steps=30, reft_max_steps=30, lora_learning_rate=2e-2, reft_learning_rate=5e-2)
    trainer = make_trainer(tmp_path, n=64, args=args)
    trainer.train()
    for stage in ("lora", "reft"):
        losses = [e["loss"] for e in trainer.state.log_history if e.get("stage") == stage and "loss" in e]
        assert len(losses) == 30
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < first - 0.05, (stage, first, last)


def test_metrics_logs_events_and_progress_label(tmp_path):
    recorder = Recorder()
    args = sft_args(tmp_path, disable_tqdm=False)
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=args,
        train_dataset=make_dataset("prompt_completion", 32),
        eval_dataset=make_dataset("prompt_completion", 8, seed=5),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config(),
        callbacks=[recorder],
    )
    out = trainer.train()
    for stage in ("lora", "reft"):
        for key in ("train_runtime", "train_loss", "eval_loss", "train_steps"):
            assert f"{stage}_{key}" in out.metrics
        assert any(e.get("stage") == stage and "eval_loss" in e for e in trainer.state.log_history)
    assert out.global_step == 12 and out.metrics["train_steps"] == 12
    expected = (out.metrics["lora_train_loss"] * 6 + out.metrics["reft_train_loss"] * 6) / 12
    assert out.training_loss == pytest.approx(expected)
    assert [e[:2] for e in recorder.events] == [("begin", "lora"), ("end", "lora"), ("begin", "reft"), ("end", "reft")]
    assert recorder.events[0][2:] == (0, 2)
    from peft_heft.trainer.callbacks import StageProgressCallback

    progress = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, StageProgressCallback)]
    assert len(progress) == 1 and progress[0].stage_label == "HEFT 2/2 reft"


def test_merge_lora_before_reft_trains_the_same_interventions(tmp_path):
    results = {}
    for merge in (False, True):
        trainer = make_trainer(tmp_path, args=sft_args(tmp_path, merge_lora_before_reft=merge))
        trainer.train()
        _, reft, _ = split_params(trainer.model)
        results[merge] = (reft, trainer.state.log_history)
        merged = any(getattr(m, "merged", False) for m in trainer.model.modules() if hasattr(m, "merged_adapters"))
        assert merged is merge
    for key in results[False][0]:
        torch.testing.assert_close(results[True][0][key], results[False][0][key], atol=1e-4, rtol=1e-3)
    # the saved adapter is the same either way: LoRA A/B, not merged weights
    assert "base_layer" not in " ".join(results[True][0])


def test_load_best_model_at_end_keeps_each_stage_and_its_trainable_set(tmp_path):
    args = sft_args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        lora_max_steps=8,
        reft_max_steps=8,
        greater_is_better=True,
    )  # "best" = highest eval loss = the first checkpoint, never the last
    recorder = Recorder()
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=args,
        train_dataset=make_dataset("prompt_completion", 32),
        eval_dataset=make_dataset("prompt_completion", 8, seed=5),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config(),
        callbacks=[recorder],
    )
    out = trainer.train()
    assert trainer.model.stage == "reft"
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("heft_interventions" in n for n in trainable)
    assert recorder.optimizer_sets["reft"] == {id(p) for n, p in trainer.model.named_parameters() if n in trainable}
    # the stage-end metrics are those of the best checkpoint of each stage
    for stage in ("lora", "reft"):
        evals = [e["eval_loss"] for e in trainer.state.log_history if e.get("stage") == stage and "eval_loss" in e]
        assert evals.index(max(evals)) == 0 and out.metrics[f"{stage}_eval_loss"] == pytest.approx(max(evals))
    # the reft stage started from the LoRA stage's best checkpoint (step 2), not its last step
    best_lora = load_file(tmp_path / "out" / "stage-0-lora" / "checkpoint-2" / "adapter_model.safetensors")
    lora_at_reft_begin = recorder.snapshots[("reft", "begin")][0]
    assert len(lora_at_reft_begin) == len([k for k in best_lora if "lora_" in k])
    for name, value in lora_at_reft_begin.items():
        key = next(k for k in best_lora if k.replace(".weight", "") in name.replace(".default", ""))
        torch.testing.assert_close(value, best_lora[key], atol=0, rtol=0)


# ------------------------------------------------------------------ collator positions
def _collated(tmp_path, kind, padding_side="right", rows=(0, 1, 2), **arg_overrides):
    trainer = make_trainer(tmp_path, kind=kind, args=sft_args(tmp_path, **arg_overrides), padding_side=padding_side)
    examples = [trainer.train_dataset[i] for i in rows]
    return trainer, examples, trainer.data_collator(examples)


@pytest.mark.parametrize("kind", ["prompt_completion", "conversational_prompt_completion", "messages", "text"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_positions_match_hand_computed_prompt_positions(tmp_path, kind, padding_side):
    trainer, examples, batch = _collated(tmp_path, kind, padding_side)
    tok = trainer.processing_class
    width = batch["input_ids"].shape[1]
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        # hand-computed prompt: the tokens generate() would see at inference
        if kind == "prompt_completion":
            prompt_ids = tok(example["prompt"])["input_ids"]
        elif kind == "conversational_prompt_completion":
            prompt_ids = tok.apply_chat_template(
                example["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        elif kind == "messages":
            prompt_ids = tok.apply_chat_template(
                example["messages"][:1], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        else:
            prompt_ids = ids
        assert ids[: len(prompt_ids)] == prompt_ids
        p = len(prompt_ids)
        k = min(2, p // 2)
        offset = width - len(ids) if padding_side == "left" else 0
        firsts = [offset + i for i in range(k)] + [-1] * (2 - k)
        lasts = [offset + p - k + i for i in range(k)] + [-1] * (2 - k)
        assert batch["intervention_locations"][row].tolist() == [firsts, lasts], (kind, row)
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][real].tolist() == ids
        if kind in ("prompt_completion", "conversational_prompt_completion"):
            # completion-only loss: the intervened prompt tokens carry no loss
            labels = batch["labels"][row]
            assert (labels[offset : offset + p] == -100).all() and (
                labels[offset + p : offset + len(ids)] != -100
            ).all()


def test_collator_with_assistant_only_loss_and_keep_end_truncation(tmp_path):
    trainer, examples, batch = _collated(tmp_path, "messages", assistant_only_loss=True)
    for row, example in enumerate(examples):
        labels = batch["labels"][row][: len(example["input_ids"])]
        p = example["heft_prompt_length"]
        assert (labels[:p] == -100).all() and (labels[p:] != -100).all()
    # keep_end cuts the head of each example: the prompt count shrinks by what was cut
    trainer, examples, batch = _collated(tmp_path, "prompt_completion", max_length=6, truncation_mode="keep_end")
    trainer_full, examples_full, _ = _collated(tmp_path, "prompt_completion")
    for ex, ex_full in zip(examples, examples_full, strict=True):
        cut = len(ex_full["input_ids"]) - 6
        assert ex["input_ids"] == ex_full["input_ids"][cut:]
        assert ex["heft_prompt_length"] == max(0, ex_full["heft_prompt_length"] - cut)


def test_collator_keep_start_truncation_clips_prompt(tmp_path):
    _, examples, batch = _collated(tmp_path, "text", max_length=5)
    for ex in examples:
        assert len(ex["input_ids"]) == 5 and ex["heft_prompt_length"] == 5
    assert batch["intervention_locations"][0].tolist() == [[0, 1], [3, 4]]


def test_pretokenized_dataset_uses_completion_mask(tmp_path):
    from datasets import Dataset

    data = Dataset.from_list([{"input_ids": [1, 8, 9, 10, 33, 34, 31, 2], "completion_mask": [0] * 6 + [1, 1]}] * 4)
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=sft_args(tmp_path, completion_only_loss=True),
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        peft_config=peft_config(),
    )
    example = trainer.train_dataset[0]
    assert example["heft_prompt_length"] == 6
    assert example["labels"] == [-100] * 6 + [31, 2]
    batch = trainer.data_collator([example])
    assert batch["intervention_locations"][0].tolist() == [[0, 1], [4, 5]]
    # without completion_mask, leading -100 labels mark the prompt; unmasked labels mean the whole sequence
    data = Dataset.from_list(
        [
            {"input_ids": [1, 8, 9, 10, 33, 34, 31, 2], "labels": [-100] * 5 + [34, 31, 2]},
            {"input_ids": [1, 8, 9, 10, 33, 34, 31, 2], "labels": [1, 8, 9, 10, 33, 34, 31, 2]},
        ]
    )
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=sft_args(tmp_path),
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        peft_config=peft_config(),
    )
    assert trainer.train_dataset["heft_prompt_length"] == [5, 8]


# ------------------------------------------------------------------ saving / resuming
def test_final_save_reloads_with_identical_logits(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    out = str(tmp_path / "final")
    trainer.save_model(out)
    assert not [n for n in os.listdir(out) if n.startswith(".heft-save-")]
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loaded = PeftModel.from_pretrained(tiny_sft_model(), out).eval()
    with torch.no_grad():
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "intervention_locations")}
        expected = model(**kwargs).logits
        got = loaded(**kwargs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _adapter_weights(trainer):
    return {
        k: v.detach().clone()
        for k, v in trainer.model.named_parameters()
        if v.requires_grad or "lora_" in k or "heft_interventions" in k
    }


@pytest.mark.parametrize("crash_stage", ["lora", "reft"])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, crash_stage):
    def args(sub):
        return sft_args(
            tmp_path / sub,
            lora_max_steps=8,
            reft_max_steps=8,
            save_strategy="steps",
            save_steps=3,
            save_total_limit=2,
            warmup_steps=2,
        )

    reference = make_trainer(tmp_path, args=args("ref"))
    reference.train()
    expected = _adapter_weights(reference)

    crashed = make_trainer(tmp_path, args=args("run"), callbacks=[CrashAt(crash_stage, 5)])
    with pytest.raises(Crash):
        crashed.train()
    found = complete_checkpoints(str(tmp_path / "run" / "out"))
    assert found[-1][0] == (0 if crash_stage == "lora" else 1) and found[-1][1] == 3

    resumed = make_trainer(tmp_path, args=args("run"))
    out = resumed.train(resume_from_checkpoint=True)
    got = _adapter_weights(resumed)
    assert got.keys() == expected.keys()
    for key in expected:  # same CPU kernels, same data order, restored optimizer/scheduler/RNG: equal to 1e-6
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    assert out.metrics["lora_train_steps"] == 8 and out.metrics["reft_train_steps"] == 8
    assert {e["stage"] for e in resumed.state.log_history if "stage" in e} == {"lora", "reft"}
    # save_total_limit=2 keeps two complete checkpoints per stage
    assert len([c for c in complete_checkpoints(str(tmp_path / "run" / "out")) if c[0] == 1]) == 2


def test_resume_from_the_checkpoint_that_ends_a_stage_starts_the_next_stage(tmp_path):
    def args(sub):  # constant LR: an extra step in the finished stage would change the weights
        return sft_args(
            tmp_path / sub,
            lora_max_steps=6,
            reft_max_steps=4,
            save_strategy="steps",
            save_steps=3,
            lr_scheduler_type="constant",
        )

    reference = make_trainer(tmp_path, args=args("ref"))
    reference.train()
    crashed = make_trainer(tmp_path, args=args("run"), callbacks=[CrashAt("reft", 1)])
    with pytest.raises(Crash):
        crashed.train()
    assert complete_checkpoints(str(tmp_path / "run" / "out"))[-1][:2] == (0, 6)
    resumed = make_trainer(tmp_path, args=args("run"))
    out = resumed.train(resume_from_checkpoint="true")  # as given on the command line
    assert out.metrics["lora_train_steps"] == 6 and out.metrics["reft_train_steps"] == 4
    expected, got = _adapter_weights(reference), _adapter_weights(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


def test_resume_true_picks_the_newest_run_not_the_furthest_stage(tmp_path):
    args = sft_args(tmp_path, lora_max_steps=3, reft_max_steps=3, save_strategy="steps", save_steps=3)
    make_trainer(tmp_path, args=args).train()  # a finished run: stage-1-reft/checkpoint-3
    crashed = make_trainer(
        tmp_path,
        args=sft_args(tmp_path, lora_max_steps=6, reft_max_steps=3, save_strategy="steps", save_steps=3),
        callbacks=[CrashAt("lora", 4)],
    )
    with pytest.raises(Crash):
        crashed.train()  # rewrites stage-0-lora/checkpoint-3, newer than the old run's stage-1 checkpoint
    newest = complete_checkpoints(str(tmp_path / "out"))[-1]
    assert newest[:2] == (0, 3)


def test_interrupted_checkpoint_save_is_never_resumed(tmp_path, monkeypatch):
    args = sft_args(tmp_path, lora_max_steps=6, reft_max_steps=2, save_strategy="steps", save_steps=3)
    trainer = make_trainer(tmp_path, args=args)
    original = trainer._save_rng_state
    calls = {"n": 0}

    def crash_on_second(output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash("power cut while saving")
        return original(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", crash_on_second)
    with pytest.raises(Crash):
        trainer.train()
    stage_dir = tmp_path / "out" / "stage-0-lora"
    assert (stage_dir / "checkpoint-6").is_dir() and not (stage_dir / "checkpoint-6" / MARKER_NAME).exists()
    assert [c[1] for c in complete_checkpoints(str(tmp_path / "out"))] == [3]
    fresh = make_trainer(tmp_path, args=args)
    with pytest.raises(ValueError, match="incomplete.*checkpoint-3"):
        fresh.train(resume_from_checkpoint=str(stage_dir / "checkpoint-6"))
    out = fresh.train(resume_from_checkpoint=True)  # picks checkpoint-3
    assert out.metrics["lora_train_steps"] == 6


def test_final_save_replaces_previous_save_atomically(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    before = load_file(out / "adapter_model.safetensors")
    # A crash while writing the new weights leaves the earlier save untouched
    import peft_heft.persistence as persistence

    monkeypatch.setattr(persistence, "fsync_tree", lambda folder: (_ for _ in ()).throw(Crash("disk gone")))
    with pytest.raises(Crash):
        trainer.save_model(str(out))
    assert (out / "adapter_config.json").exists()
    after = load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not [n for n in os.listdir(out) if n.startswith(".heft-save-")]


def test_resume_refuses_other_stage_order(tmp_path):
    args = sft_args(tmp_path, lora_max_steps=3, reft_max_steps=1, save_strategy="steps", save_steps=3)
    make_trainer(tmp_path, args=args).train()
    other = make_trainer(tmp_path, args=sft_args(tmp_path, stage_order=["joint"], joint_max_steps=2))
    with pytest.raises(ValueError, match="stage_order"):
        other.train(resume_from_checkpoint=True)


# ------------------------------------------------------------------ bad input
def test_bad_input_is_refused_before_training(tmp_path):
    tok, data = tiny_tokenizer(), make_dataset("prompt_completion", 8)
    with pytest.raises(TypeError, match="must be a HeftConfig"):
        StagedSFTTrainer(
            tiny_sft_model(),
            args=sft_args(tmp_path),
            train_dataset=data,
            processing_class=tok,
            peft_config=LoraConfig(target_modules=["q_proj"]),
        )
    lora_model = get_peft_model(tiny_sft_model(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already wrapped in a PEFT LORA adapter"):
        StagedSFTTrainer(lora_model, args=sft_args(tmp_path), train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="needs peft_config=HeftConfig"):
        StagedSFTTrainer(tiny_sft_model(), args=sft_args(tmp_path), train_dataset=data, processing_class=tok)
    for strategy in ("bfd_split", "wrapped"):
        with pytest.raises(ValueError, match=f"does not support packing_strategy='{strategy}'"):
            StagedSFTTrainer(
                tiny_sft_model(),
                args=sft_args(tmp_path, packing=True, packing_strategy=strategy),
                train_dataset=data,
                processing_class=tok,
                peft_config=peft_config(),
            )
    model = tiny_sft_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fresh optimizer"):
        StagedSFTTrainer(
            model,
            args=sft_args(tmp_path),
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config(),
            optimizers=(opt, None),
        )
    from trl import SFTConfig

    with pytest.raises(TypeError, match="HeftSFTConfig"):
        StagedSFTTrainer(
            tiny_sft_model(),
            args=SFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none"),
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config(),
        )
    with pytest.raises(ValueError, match="No training example keeps any prompt token"):
        StagedSFTTrainer(
            tiny_sft_model(),
            args=sft_args(tmp_path, max_length=2, truncation_mode="keep_end"),
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config(),
        )
    with pytest.raises(ValueError, match="intervention_layers"):
        StagedSFTTrainer(
            tiny_sft_model(),
            args=sft_args(tmp_path),
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config(intervention_layers=[5]),
        )


def test_heft_sft_config_validation(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="Unknown stage 'lorra'"):
        HeftSFTConfig(**base, stage_order=["lorra", "reft"])
    with pytest.raises(ValueError, match="Stage 'reft' would train 0"):
        HeftSFTConfig(**base, reft_num_train_epochs=0)
    with pytest.raises(ValueError, match="lora_max_steps=-3"):
        HeftSFTConfig(**base, lora_max_steps=-3)
    with pytest.raises(ValueError, match="repeats a stage"):
        HeftSFTConfig(**base, stage_order=["lora", "lora"])
    # an unlisted stage may keep zero epochs; a listed one falls back to the shared options
    args = HeftSFTConfig(**base, stage_order=["reft"], lora_num_train_epochs=0, num_train_epochs=2, learning_rate=1e-3)
    assert args.stage_options("reft") == {
        "num_train_epochs": 2,
        "max_steps": -1,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
    }
    assert HeftSFTConfig(**base, stage_order="reft, lora").stage_order == ["reft", "lora"]
