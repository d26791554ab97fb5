"""Packed and padding-free batches in StagedSFTTrainer: every sequence of a flattened row is trained as if alone.

The reference for each packed sequence is that sequence alone, collated the padded way (an attention mask, the
locations found from it), never the packed code path.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from sft_fixtures import cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer, yes_no_rows
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import peft_heft.tuner.layer as layer_module
from peft_heft import DataCollatorForHeft, PositionSpec, StagedSFTTrainer
from peft_heft.trainer.packing import PROMPT_MASK_COLUMN, check_packed_attention, packed_locations

MAX_LENGTH = 32


def varied_rows() -> Dataset:
    """Prompts of 4 to 13 tokens, one-token answers, and one example longer than a pack (a long completion)."""
    rows = [{"prompt": q + " Answer:", "completion": " " + a} for q, a in yes_no_rows(14, seed=3)]
    rows[3]["prompt"] = "Is it big " + rows[3]["prompt"]  # longer prompts
    rows[5]["prompt"] = "w1 w2 w3 w4 w5 " + rows[5]["prompt"]
    rows.append({"prompt": "Is it big ?", "completion": " " + " ".join(f"w{i % 24}" for i in range(40))})
    return Dataset.from_list(rows)


def packed_trainer(tmp_path, eval_dataset=None, **overrides) -> StagedSFTTrainer:
    args = dict(packing=True, max_length=MAX_LENGTH, per_device_train_batch_size=2, shuffle_dataset=False)
    args.update(overrides)
    return StagedSFTTrainer(
        tiny_sft_model(),
        args=cpu_sft_args(str(tmp_path / "out"), **args),
        train_dataset=varied_rows(),
        eval_dataset=eval_dataset,
        processing_class=tiny_tokenizer(),
        peft_config=sft_heft_config(init_lora_weights=False),  # LoRA B random: LoRA gets gradients
    )


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each sequence of a flattened row, from where position_ids restart."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return [(a, b - a) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over supervised tokens of the next-token cross-entropy (what the mean-reduced loss adds up)."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum")


def alone_batch(trainer, input_ids, labels, prompt_length) -> dict:
    """One sequence collated the padded way: attention mask and locations from it (not the packed path)."""
    config = trainer.model.peft_config["default"]
    padded = DataCollatorForHeft(
        DataCollatorForLanguageModeling(pad_token_id=0), config.position_spec, config.share_intervention_weights
    )
    example = {"input_ids": input_ids, "labels": labels, "heft_prompt_length": prompt_length}
    return padded([example])


@pytest.fixture
def spy(monkeypatch):
    """Records, per decoder layer, the token positions each intervention call writes."""
    calls: list[tuple[int, list[list[int]]]] = []
    original = layer_module.intervene

    def recording(hidden, located, interventions):
        kept = [
            [int(p) for p, keep in zip(row[:, 0], keeps[:, 0], strict=True) if keep]
            for row, keeps in zip(located.index, located.keep, strict=True)
        ]
        calls.append((id(interventions[0]), kept))
        return original(hidden, located, interventions)

    monkeypatch.setattr(layer_module, "intervene", recording)
    return calls


def test_packed_locations_by_hand():
    # sequences of 5 and 3 tokens, prompts of 4 and 2; f1+l1 in two groups
    locations = packed_locations(PositionSpec.parse("f1+l1"), False, [5, 3], [4, 2])
    assert locations.tolist() == [[[0, 5], [3, 6]]]
    # shared weights: one group holding both sides; a sequence with no prompt token gets only -1
    locations = packed_locations(PositionSpec.parse("f2+l1"), True, [4, 6, 2], [4, 0, 2])
    assert locations.tolist() == [[[0, 1, 3, -1, -1, -1, 10, -1, 11]]]


def test_each_packed_sequence_gets_the_loss_positions_and_gradients_it_gets_alone(tmp_path, spy):
    trainer = packed_trainer(tmp_path)
    model = trainer.model
    model.base_model.set_stage("joint")  # LoRA and interventions applied and trainable
    model.eval()  # no dropout; gradients still flow
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert all(PROMPT_MASK_COLUMN in row and "seq_lengths" in row for row in rows)
    packed_rows = [row for row in rows if len(row["seq_lengths"]) >= 3]
    assert packed_rows, "no row packs three sequences: the test would not see a packed row"
    batch = trainer.data_collator(packed_rows[:1])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    pieces = segments(batch["position_ids"])
    assert len(pieces) >= 3
    mask = packed_rows[0][PROMPT_MASK_COLUMN]
    prompt_lengths = [sum(mask[s : s + n]) for s, n in pieces]
    assert len(set(prompt_lengths)) > 1, "the row's sequences all have the same prompt length"

    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "intervention_locations")}
    spy.clear()
    packed_logits = model(**inputs, use_cache=False).logits
    packed_calls = list(spy)
    for (start, length), prompt_length in zip(pieces, prompt_lengths, strict=True):
        labels = batch["labels"].clone()
        outside = torch.ones_like(labels, dtype=torch.bool)
        outside[:, start : start + length] = False
        labels[outside] = -100
        packed_loss = summed_token_loss(packed_logits, labels)
        packed_grads = torch.autograd.grad(packed_loss, params, retain_graph=True)

        ids = batch["input_ids"][0, start : start + length].tolist()
        own_labels = batch["labels"][0, start : start + length].tolist()
        alone = alone_batch(trainer, ids, own_labels, prompt_length)
        spy.clear()
        alone_logits = model(
            input_ids=alone["input_ids"],
            attention_mask=alone["attention_mask"],
            intervention_locations=alone["intervention_locations"],
        ).logits
        alone_loss = summed_token_loss(alone_logits, alone["labels"])
        alone_grads = torch.autograd.grad(alone_loss, params)

        assert packed_logits[0, start : start + length].detach() == pytest.approx(alone_logits[0].detach(), abs=1e-5)
        assert float(packed_loss) == pytest.approx(float(alone_loss), abs=1e-5)
        for packed_grad, alone_grad in zip(packed_grads, alone_grads, strict=True):
            torch.testing.assert_close(packed_grad, alone_grad, atol=1e-5, rtol=1e-4)
        # the positions the interventions wrote: this sequence's slice of the packed call == the call alone
        alone_positions = sorted((owner, p) for owner, rows_ in spy for p in rows_[0])
        packed_positions = sorted(
            (owner, p - start) for owner, rows_ in packed_calls for p in rows_[0] if start <= p < start + length
        )
        assert alone_positions and packed_positions == alone_positions
    # the example longer than a pack was truncated to max_length and trained alone in its row
    lengths = [n for row in rows for n in row["seq_lengths"]]
    assert max(lengths) == MAX_LENGTH


def test_padding_free_per_step_losses_equal_the_padded_run(tmp_path):
    def losses(**overrides):
        trainer = StagedSFTTrainer(
            tiny_sft_model(),
            args=cpu_sft_args(str(tmp_path / "out"), lora_max_steps=3, reft_max_steps=3, **overrides),
            train_dataset=make_dataset("prompt_completion", 32),
            processing_class=tiny_tokenizer(),
            peft_config=sft_heft_config(),
        )
        trainer.train()
        return [(h["stage"], h["loss"]) for h in trainer.stage_log_history if "loss" in h]

    padded = losses()
    padding_free = losses(padding_free=True, max_length=None)
    assert [s for s, _ in padded] == ["lora"] * 3 + ["reft"] * 3
    assert [s for s, _ in padding_free] == [s for s, _ in padded]
    assert [loss for _, loss in padding_free] == pytest.approx([loss for _, loss in padded], rel=1e-5)
    # the ReFT stage moved the loss: a misplaced intervention would show in its steps
    assert padded[3][1] != pytest.approx(padded[2][1], rel=1e-3)


def test_packed_training_runs_both_stages_evaluates_and_saves(tmp_path):
    # the evaluation rows are packed too (eval_packing follows packing)
    trainer = packed_trainer(tmp_path, eval_dataset=varied_rows(), lora_max_steps=2, reft_max_steps=2)
    assert "seq_lengths" in trainer.eval_dataset.column_names
    trainer.train()
    assert [h["stage"] for h in trainer.stage_log_history if "loss" in h] == ["lora"] * 2 + ["reft"] * 2
    evaluated = [h for h in trainer.stage_log_history if "eval_loss" in h]
    assert len(evaluated) >= 2 and all(h["eval_loss"] == h["eval_loss"] for h in evaluated)  # one per stage, no NaN
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_packed_row_without_locations_is_refused():
    from peft import get_peft_model

    model = get_peft_model(tiny_sft_model(), sft_heft_config())
    model.base_model.set_stage("reft")
    ids = torch.tensor([[1, 7, 8, 9, 1, 10, 11]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with pytest.raises(ValueError, match="packed row .* no intervention_locations"):
        model(input_ids=ids, position_ids=positions, use_cache=False)
    with pytest.raises(ValueError, match="packed row"):
        model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
    # one sequence with position_ids, or a mask: not packed
    model(input_ids=ids, position_ids=torch.arange(7).unsqueeze(0), use_cache=False)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def _leaky_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention that ignores the mask it is given (causal over the whole row)."""
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def test_an_attention_that_lets_packed_sequences_mix_is_refused():
    AttentionInterface.register("heft_test_leaky", _leaky_attention)
    model = tiny_sft_model()
    check_packed_attention(model)  # sdpa, no cache: transformers keeps packed sequences apart
    model.set_attn_implementation("heft_test_leaky")
    with pytest.raises(ValueError, match="attn_implementation='heft_test_leaky'.*lets a sequence attend"):
        check_packed_attention(model)


def test_packing_options_that_would_mix_sequences_are_refused(tmp_path):
    with pytest.raises(ValueError, match="eval_packing=True with packing=False and padding_free=False"):
        packed_trainer(tmp_path, packing=False, eval_packing=True)
    with pytest.raises(ValueError, match="padding_side='left' has no meaning with padding_free=True"):
        StagedSFTTrainer(
            tiny_sft_model(),
            args=cpu_sft_args(str(tmp_path / "out"), padding_free=True, max_length=None),
            train_dataset=varied_rows(),
            processing_class=tiny_tokenizer(),
            peft_config=sft_heft_config(),
            padding_side="left",
        )
