"""TRL's fused LM head scores only the labelled positions on CPU under HEFT's trainers, with the same loss."""

from __future__ import annotations

import logging

import pytest
import torch
import trl.trainer.utils as trl_utils
from sft_fixtures import cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer

from peft_heft import StagedSFTTrainer
from peft_heft.trainer import labelled_lm_head
from peft_heft.trainer.labelled_lm_head import is_supported, labelled_positions_only, score_labelled_positions_only


def _trainer(tmp_path, stage="lora"):
    trainer = StagedSFTTrainer(
        tiny_sft_model(),
        args=cpu_sft_args(str(tmp_path)),
        train_dataset=make_dataset("conversational_prompt_completion", n=16),
        processing_class=tiny_tokenizer(),
        peft_config=sft_heft_config(),
    )
    trainer._apply_stage(stage)
    return trainer


def _batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


class _RowCounter:
    """Records how many hidden-state rows TRL's chunked log-prob function projects per call."""

    def __init__(self, monkeypatch):
        self.rows: list[int] = []
        original = trl_utils._ChunkedLogProbFunction.apply

        def apply(hidden, *args):
            self.rows.append(hidden.shape[0])
            return original(hidden, *args)

        monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", apply)


def _loss_and_grads(trainer, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def test_installed_trl_decides_compaction_with_the_switched_binding():
    # fails on a TRL release that changes how add_fused_lm_head picks the positions: then the speed-up is off
    assert is_supported()


@pytest.mark.parametrize("stage", ["lora", "reft"])
def test_same_loss_gradients_and_metrics_as_trls_full_projection(tmp_path, monkeypatch, stage):
    trainer = _trainer(tmp_path, stage)
    base = trainer.model.get_base_model()
    wrapped = base.forward
    assert getattr(wrapped, "_peft_heft_labelled_positions_only", False)
    inputs = _batch(trainer)
    counter = _RowCounter(monkeypatch)

    compact_loss, compact_grads, compact_metrics = _loss_and_grads(trainer, inputs)
    base.forward = wrapped.__wrapped__  # TRL's own fused forward: every position
    full_loss, full_grads, full_metrics = _loss_and_grads(trainer, inputs)
    base.forward = wrapped

    labels = inputs["labels"][:, 1:]
    labelled = int((labels != -100).sum())
    assert counter.rows == [labelled, labels.numel()]
    assert labelled < labels.numel() / 2  # the prompt is most of each row: the work saved is real
    torch.testing.assert_close(compact_loss, full_loss, rtol=0, atol=1e-6)
    assert compact_grads.keys() == full_grads.keys() and compact_grads
    for name in full_grads:
        torch.testing.assert_close(compact_grads[name], full_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert compact_metrics.keys() == full_metrics.keys()
    assert full_metrics.pop("num_tokens") == [2 * compact_metrics.pop("num_tokens")[0]]  # a running count
    assert {"entropy", "mean_token_accuracy"} <= full_metrics.keys()
    for key in full_metrics:
        assert compact_metrics[key] == pytest.approx(full_metrics[key], abs=1e-6), key


def test_the_switch_is_scoped_to_the_call(tmp_path, monkeypatch):
    original = trl_utils._use_triton
    cpu = torch.device("cpu")
    assert original(cpu) is False
    with labelled_positions_only():
        assert trl_utils._use_triton(cpu) is True
        with labelled_positions_only():  # re-entrant
            assert trl_utils._use_triton(cpu) is True
        assert trl_utils._use_triton(cpu) is True
        assert trl_utils._use_triton(torch.device("meta")) is original(torch.device("meta"))
    assert trl_utils._use_triton is original
    with pytest.raises(RuntimeError, match="boom"), labelled_positions_only():
        raise RuntimeError("boom")
    assert trl_utils._use_triton is original

    trainer = _trainer(tmp_path)
    trainer.compute_loss(trainer.model, dict(_batch(trainer)))
    assert trl_utils._use_triton is original  # restored after a training forward


def test_plain_trl_sft_trainer_in_the_same_process_is_unchanged(tmp_path, monkeypatch):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    heft = _trainer(tmp_path / "heft")
    plain = SFTTrainer(
        tiny_sft_model(),
        args=SFTConfig(output_dir=str(tmp_path / "plain"), report_to="none", use_cpu=True, bf16=False, max_length=64),
        train_dataset=make_dataset("conversational_prompt_completion", n=16),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    counter = _RowCounter(monkeypatch)
    inputs = _batch(plain)
    heft.compute_loss(heft.model, dict(_batch(heft)))
    plain.compute_loss(plain.model, dict(inputs))
    assert counter.rows[1] == inputs["labels"][:, 1:].numel()  # TRL's own choice for a trainer that is not HEFT's


def test_an_unrecognised_trl_keeps_trls_behaviour_and_warns(monkeypatch, caplog):
    model = tiny_sft_model()
    trl_utils.add_fused_lm_head(model)
    fused = model.forward
    monkeypatch.delattr(trl_utils, "_use_triton")
    is_supported.cache_clear()
    labelled_lm_head._warn_unsupported.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=labelled_lm_head.logger.name):
            labelled_lm_head.logger.addHandler(caplog.handler)
            try:
                assert score_labelled_positions_only(model) is False
            finally:
                labelled_lm_head.logger.removeHandler(caplog.handler)
        assert model.forward is fused
        assert "scores every position (slower, same loss)" in caplog.text
    finally:
        monkeypatch.undo()
        is_supported.cache_clear()
        labelled_lm_head._warn_unsupported.cache_clear()
    assert is_supported()


def test_wrapping_twice_or_a_model_without_trls_head():
    model = tiny_sft_model()
    assert score_labelled_positions_only(model) is False  # no fused forward set: nothing to wrap
    assert "forward" not in model.__dict__
    trl_utils.add_fused_lm_head(model)
    assert score_labelled_positions_only(model) is True
    once = model.forward
    assert score_labelled_positions_only(model) is True
    assert model.forward is once


def test_dpo_policy_and_reference_score_only_the_completion(tmp_path, monkeypatch):
    from test_dpo import completion_logps, dpo_args, preference_rows

    from peft_heft import HeftDPOTrainer

    trainer = HeftDPOTrainer(
        tiny_sft_model(),
        args=dpo_args(tmp_path, max_steps=1),
        train_dataset=preference_rows(8),
        processing_class=tiny_tokenizer(),
        peft_config=sft_heft_config(),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    counter = _RowCounter(monkeypatch)
    trainer.model.eval()
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    completion = batch["completion_mask"][:, 1:]
    assert counter.rows == [int(completion.sum())] and counter.rows[0] < completion.numel() / 2
    # the same log-probs as the full logits of the reference ("ref" adapter), computed without TRL's head
    trainer.model.set_adapter("ref")
    direct = completion_logps(trainer.model, batch)
    trainer.model.set_adapter("default")
    torch.testing.assert_close(torch.cat([chosen, rejected]), direct, atol=1e-5, rtol=0)
