"""`HeftDPOTrainer`: TRL's DPO on a HEFT adapter, with the interventions on the prompt of both sequences."""

from __future__ import annotations

import math
import re

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from sft_fixtures import sft_heft_config, tiny_sft_model, tiny_tokenizer, yes_no_rows
from test_examples import run_example, skip_without_embedded_assets

import peft_heft.tuner.positions as heft_positions_module
from peft_heft import HeftDPOConfig, HeftDPOTrainer, PositionSpec, compute_locations

SPEC = PositionSpec.parse("f2+l2")


def dpo_args(output_dir, **overrides) -> HeftDPOConfig:
    """Quick CPU settings: logging every step, no saving, no gradient checkpointing (TRL turns it on by default)."""
    kwargs = dict(
        output_dir=str(output_dir),
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        max_length=64,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        beta=0.1,
    )
    kwargs.update(overrides)
    return HeftDPOConfig(**kwargs)


def preference_rows(n: int = 16, seed: int = 0) -> Dataset:
    """Prompt = the yes/no question, chosen = the right answer, rejected = the wrong one."""
    rows = yes_no_rows(n, seed)
    flip = {"yes": "no", "no": "yes"}
    return Dataset.from_list(
        [{"prompt": q + " Answer:", "chosen": " " + a, "rejected": " " + flip[a]} for q, a in rows]
    )


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """A saved HEFT adapter whose LoRA and interventions both change the outputs (the "SFT" starting point)."""
    folder = tmp_path_factory.mktemp("sft-adapter")
    model = get_peft_model(tiny_sft_model(), sft_heft_config(init_lora_weights=False))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.base_model.heft_interventions.named_parameters():
            if "rotate_layer" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(folder)
    return folder


def load_trainable(folder):
    return PeftModel.from_pretrained(tiny_sft_model(), folder, is_trainable=True)


def adapter_tensors(model, adapter: str = "default") -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's LoRA and intervention tensors, copied."""
    out: dict[str, dict[str, torch.Tensor]] = {"lora": {}, "reft": {}}
    for name, p in model.named_parameters():
        if f".{adapter}." not in name:
            continue
        kind = "reft" if "heft_interventions" in name else "lora" if "lora_" in name else None
        if kind is not None:
            out[kind][name] = p.detach().clone()
    return out


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in before if not torch.equal(before[name], after[name])]


class LocationSpy:
    """Records every `compute_locations` call a HEFT forward makes: its prompt mask and the locations it returns."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        original = heft_positions_module.compute_locations

        def spy(spec, mask, batch, total_len, share, device):
            locations = original(spec, mask, batch, total_len, share, device)
            self.calls.append((mask.clone(), locations.clone()))
            return locations

        monkeypatch.setattr(heft_positions_module, "compute_locations", spy)


class RecordingCollator:
    """TRL's collator, optionally turned into left-padded prompts ([pad][prompt][completion][pad]); keeps batches."""

    def __init__(self, inner, left_pad_prompts: bool):
        self.inner, self.left_pad_prompts, self.batches = inner, left_pad_prompts, []

    def __call__(self, examples):
        batch = self.inner(examples)
        if self.left_pad_prompts:
            batch = left_pad(batch, [len(e["prompt_ids"]) for e in examples] * 2)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch

    @staticmethod
    def prompt_lengths(batch) -> list[int]:
        return [int(n) for n in (batch["attention_mask"].bool() & (batch["completion_mask"] == 0)).sum(dim=1)]


def left_pad(batch, prompt_lengths):
    """Shift each row right so that all prompts end in the same column (prompts left-padded, completions after)."""
    width = max(prompt_lengths)
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    total = ids.shape[1] + width - min(prompt_lengths)
    out = {k: torch.zeros(ids.shape[0], total, dtype=v.dtype) for k, v in batch.items()}
    for row, n in enumerate(prompt_lengths):
        shift = width - n
        for key, value in (("input_ids", ids), ("attention_mask", mask), ("completion_mask", completion)):
            out[key][row, shift : shift + value.shape[1]] = value[row]
    return out


def expected_locations(batch, left_padded: bool) -> list[list[int]]:
    """f2+l2 of each row's prompt, by hand: its first two and last two prompt tokens, as absolute positions."""
    rows = []
    real = batch["attention_mask"].bool()
    for row, n in enumerate(RecordingCollator.prompt_lengths(batch)):
        start = int(real[row].long().argmax()) if left_padded else 0
        rows.append([start, start + 1, start + n - 2, start + n - 1])
    return rows


# ---------------------------------------------------------------------------------------------- (a) locations
@pytest.mark.parametrize("left_padded", [False, True], ids=["right-padded", "left-padded-prompts"])
def test_interventions_sit_on_the_prompt_of_chosen_and_rejected_rows(left_padded, sft_adapter, tmp_path, monkeypatch):
    trainer = HeftDPOTrainer(
        load_trainable(sft_adapter),
        args=dpo_args(tmp_path, max_steps=2, per_device_train_batch_size=4),
        train_dataset=preference_rows(8),
        processing_class=tiny_tokenizer(),
    )
    collator = RecordingCollator(trainer.data_collator, left_pad_prompts=left_padded)
    trainer.data_collator = collator
    spy = LocationSpy(monkeypatch)
    trainer.train()

    assert len(collator.batches) == 2
    # each step: the policy forward and the reference forward, each computing the locations once
    assert len(spy.calls) == 2 * len(collator.batches)
    for step, batch in enumerate(collator.batches):
        lengths = RecordingCollator.prompt_lengths(batch)
        assert len(set(lengths)) > 1  # prompts of several lengths: padding matters
        # chosen rows then rejected rows of the same prompts, with completions of their own
        assert lengths[:4] == lengths[4:]
        assert not torch.equal(batch["input_ids"][:4], batch["input_ids"][4:])
        if left_padded:
            assert (batch["attention_mask"][:, 0] == 0).any()
        want = expected_locations(batch, left_padded)
        prompt_mask = batch["attention_mask"].bool() & (batch["completion_mask"] == 0)
        for mask, locations in spy.calls[2 * step : 2 * step + 2]:
            assert torch.equal(mask, prompt_mask)  # the prompt HEFT read from the labels
            assert locations.reshape(locations.shape[0], -1).tolist() == want
            explicit = compute_locations(SPEC, prompt_mask, *prompt_mask.shape, False, prompt_mask.device)
            assert torch.equal(locations, explicit)


# ---------------------------------------------------------------------------------------------- (b) stages
@pytest.mark.parametrize(
    "stage, gradient_checkpointing",
    [("reft", True), ("lora", False), ("joint", False)],
    ids=["reft-gradient-checkpointing", "lora", "joint"],
)
def test_only_the_chosen_stage_changes(stage, gradient_checkpointing, sft_adapter, tmp_path):
    model = load_trainable(sft_adapter)
    start = adapter_tensors(model)
    args = dpo_args(tmp_path, heft_stage=stage, gradient_checkpointing=gradient_checkpointing)
    trainer = HeftDPOTrainer(model, args=args, train_dataset=preference_rows(16), processing_class=tiny_tokenizer())
    reference_start = adapter_tensors(model, "ref")
    trainer.train()
    after, reference_after = adapter_tensors(model), adapter_tensors(model, "ref")

    for kind in ("lora", "reft"):
        moved = changed(start[kind], after[kind])
        if kind == stage or stage == "joint":
            assert moved, f"{stage} stage: no {kind} tensor changed"
        else:
            assert not moved, f"{stage} stage changed {kind} tensors: {moved[:3]}"
        # the reference is the starting adapter, copied, and never trained
        assert reference_start[kind].keys() == {n.replace(".default.", ".ref.") for n in start[kind]}
        for name, value in start[kind].items():
            assert torch.equal(reference_start[kind][name.replace(".default.", ".ref.")], value)
        assert not changed(reference_start[kind], reference_after[kind])
    tuner = model.base_model
    assert model.active_adapter == "default"
    assert tuner._stage_of("default") == (stage, True)  # the interventions are applied in every stage
    assert tuner._stage_of("ref") == ("frozen", True)


# ---------------------------------------------------------------------------------------------- (c) the loss falls
def test_dpo_loss_falls_on_a_tiny_preference_set(sft_adapter, tmp_path):
    trainer = HeftDPOTrainer(
        load_trainable(sft_adapter),
        args=dpo_args(tmp_path, max_steps=30, learning_rate=2e-2, beta=0.5),
        train_dataset=preference_rows(16),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    # the reference is the starting adapter: the first step's policy equals it, so the loss is exactly log 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[-1] < 0.5 * losses[0] and sum(losses[-5:]) / 5 < 0.25, losses


# ---------------------------------------------------------------------------------------------- (d) save and reload
def test_saved_adapter_reloads_with_equal_logits(sft_adapter, tmp_path):
    model = load_trainable(sft_adapter)
    trainer = HeftDPOTrainer(
        model, args=dpo_args(tmp_path / "run"), train_dataset=preference_rows(16), processing_class=tiny_tokenizer()
    )
    trainer.train()
    out = tmp_path / "dpo-adapter"
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_args.json").is_file()
    assert not (out / "ref").exists() and not (out / "training_args.bin").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".heft-save-")]

    reloaded = PeftModel.from_pretrained(tiny_sft_model(), out)
    assert list(reloaded.peft_config) == ["default"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model.eval()
    with torch.no_grad():
        trained = model(**inputs, labels=labels).logits
        again = reloaded(**inputs, labels=labels).logits
        start = PeftModel.from_pretrained(tiny_sft_model(), sft_adapter)(**inputs, labels=labels).logits
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=0)
    assert (trained - start).abs().max() > 1e-3  # DPO changed the adapter that was saved


# ---------------------------------------------------------------------------------------------- (e) reference
def completion_logps(model, batch) -> torch.Tensor:
    """Sum of the completion tokens' log-probs, with the interventions on the prompt given explicitly."""
    prompt_lengths = RecordingCollator.prompt_lengths(batch)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            intervention_prompt_lengths=torch.tensor(prompt_lengths),
        ).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["input_ids"][:, 1:]
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(dim=1)


@pytest.mark.parametrize("precompute", [False, True], ids=["on-the-fly", "precomputed"])
def test_reference_log_probs_are_the_starting_adapters(precompute, sft_adapter, tmp_path):
    trainer = HeftDPOTrainer(
        load_trainable(sft_adapter),
        args=dpo_args(tmp_path, precompute_ref_log_probs=precompute, max_steps=4),
        train_dataset=preference_rows(8),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    rows = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer.data_collator(rows)
    starting = PeftModel.from_pretrained(tiny_sft_model(), sft_adapter).eval()
    direct = completion_logps(starting, batch)
    base = completion_logps(tiny_sft_model().eval(), batch)
    trainer.model.eval()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), direct, atol=1e-4, rtol=0)
    if precompute:
        stored = torch.tensor([row["ref_chosen_logps"] for row in rows] + [row["ref_rejected_logps"] for row in rows])
        torch.testing.assert_close(stored, direct, atol=1e-4, rtol=0)
    policy = completion_logps(trainer.model, batch)
    assert (policy - direct).abs().max() > 1e-3  # the policy moved away from the reference
    assert (base - direct).abs().max() > 1e-3  # and the reference is not the base model


def test_new_adapter_gets_its_starting_point_as_reference(tmp_path):
    trainer = HeftDPOTrainer(
        tiny_sft_model(),
        args=dpo_args(tmp_path, max_steps=2),
        train_dataset=preference_rows(8),
        processing_class=tiny_tokenizer(),
        peft_config=sft_heft_config(),
    )
    assert set(trainer.model.peft_config) == {"default", "ref"}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # not the base model: its interventions start random
    assert trainer.model.base_model._stage_of("default") == ("reft", True)


# ---------------------------------------------------------------------------------------------- (f) bad input
def test_bad_input_is_refused_with_the_fix(sft_adapter, tmp_path):
    data, tok = preference_rows(8), tiny_tokenizer()
    with pytest.raises(ValueError, match="heft_stage='frozen'.*'reft'"):
        dpo_args(tmp_path, heft_stage="frozen")
    with pytest.raises(ValueError, match="peft_config must be a HeftConfig"):
        HeftDPOTrainer(
            tiny_sft_model(),
            args=dpo_args(tmp_path),
            train_dataset=data,
            processing_class=tok,
            peft_config=LoraConfig(target_modules=["q_proj"]),
        )
    lora = get_peft_model(tiny_sft_model(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT LORA adapter, not HEFT"):
        HeftDPOTrainer(lora, args=dpo_args(tmp_path), train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="no peft_config was given.*is_trainable=True"):
        HeftDPOTrainer(tiny_sft_model(), args=dpo_args(tmp_path), train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="loaded for inference.*is_trainable=True"):
        frozen = PeftModel.from_pretrained(tiny_sft_model(), sft_adapter)
        HeftDPOTrainer(frozen, args=dpo_args(tmp_path), train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="active adapter is 'sft'.*without adapter_name"):
        named = PeftModel.from_pretrained(tiny_sft_model(), sft_adapter, adapter_name="sft", is_trainable=True)
        HeftDPOTrainer(named, args=dpo_args(tmp_path), train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="padding_free=True is not supported"):
        HeftDPOTrainer(
            load_trainable(sft_adapter),
            args=dpo_args(tmp_path, padding_free=True),
            train_dataset=data,
            processing_class=tok,
        )
    with pytest.raises(ValueError, match="sync_ref_model=True is not supported"):
        HeftDPOTrainer(
            load_trainable(sft_adapter),
            args=dpo_args(tmp_path, sync_ref_model=True),
            train_dataset=data,
            processing_class=tok,
        )
    with pytest.raises(ValueError, match="already a HEFT PeftModel and a peft_config"):
        HeftDPOTrainer(
            load_trainable(sft_adapter),
            args=dpo_args(tmp_path),
            train_dataset=data,
            processing_class=tok,
            peft_config=sft_heft_config(),
        )
    with_ref = load_trainable(sft_adapter)
    with_ref.load_adapter(str(sft_adapter), adapter_name="ref")
    with pytest.raises(ValueError, match="already has an adapter named 'ref'.*delete_adapter"):
        HeftDPOTrainer(with_ref, args=dpo_args(tmp_path), train_dataset=data, processing_class=tok)


# ---------------------------------------------------------------------------------------------- the example
@pytest.mark.slow  # about 2 minutes of CPU on 1 thread (SmolLM2: SFT 2 + 2 steps, DPO 3 steps, 3 evaluations)
def test_dpo_example_fast_mode(tmp_path):
    skip_without_embedded_assets()
    out = run_example("dpo_rotten_tomatoes.py", "--fast", "--output_dir", str(tmp_path / "run"), tmp_path=tmp_path)
    found = dict(re.findall(r"\[(before DPO|after DPO)\] preference accuracy ([0-9.]+) .*classification", out))
    assert set(found) == {"before DPO", "after DPO"}, out[-3000:]
    losses = re.search(r"DPO loss first ([0-9.]+) -> last ([0-9.]+)", out)
    assert losses and float(losses[1]) == pytest.approx(math.log(2), abs=1e-3), out[-3000:]
    reloaded = re.search(r"reloaded adapter: preference accuracy ([0-9.]+)", out)
    assert reloaded and reloaded[1] == found["after DPO"], out[-3000:]
    assert (tmp_path / "run" / "dpo" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "dpo" / "ref").exists()


def test_trl_dpo_still_switches_padding_free_off(tmp_path):
    """HeftDPOTrainer refuses padding_free=True because TRL's DPOTrainer ignores it (it pads anyway, with a warning).
    The day TRL brings padding-free DPO back this fails: support it then, as StagedSFTTrainer does (interventions on
    each sequence's prompt in the flattened row)."""
    from trl import DPOConfig, DPOTrainer

    model = get_peft_model(tiny_sft_model(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    args = DPOConfig(
        str(tmp_path), report_to="none", use_cpu=True, bf16=False, max_length=64, padding_free=True, max_steps=1
    )
    trainer = DPOTrainer(model, args=args, train_dataset=preference_rows(8), processing_class=tiny_tokenizer())
    assert trainer.padding_free is False
