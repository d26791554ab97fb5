"""PEFT's multi-adapter operations with HEFT: each works (numbers checked) or is refused (message checked).

docs/heft-method.md's operations table names the test of each row.
"""

from __future__ import annotations

import pytest
import torch
from conftest import clone, heft_config, left_padded_batch, randomize_interventions, tiny_llama
from peft import PeftModel, get_peft_model, inject_adapter_in_model

from peft_heft.tuner.layer import refuse_data_parallel_replica

B_OVERRIDES = dict(intervention_layers=[0, 2], intervention_positions="l3", r=2, target_modules=["q_proj"])


def two_adapter_model(base=None, b_stage="reft"):
    """Adapter "default" (stage reft) and "b" (another config, stage ``b_stage``), both with visible interventions."""
    model = get_peft_model(clone(base) if base is not None else tiny_llama(), heft_config())
    model.add_adapter("b", heft_config(**B_OVERRIDES))
    randomize_interventions(model)
    tuner = model.base_model
    tuner.set_stage("reft")
    model.set_adapter("b")
    tuner.set_stage(b_stage)
    model.set_adapter("default")
    return model.eval()


def logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def each_alone(model, ids, mask):
    """The logits of the whole batch with each adapter active alone, and with adapters disabled."""
    outs = {}
    for adapter in model.peft_config:
        model.set_adapter(adapter)
        outs[adapter] = logits(model, ids, mask)
    with model.disable_adapter():
        outs["__base__"] = logits(model, ids, mask)
    model.set_adapter("default")
    return outs


# ---------------------------------------------------------------- adapter_names= (mixed batch)
@pytest.mark.parametrize("b_stage", ["reft", "lora"])
def test_adapter_names_routes_each_rows_interventions_to_its_adapter(b_stage):
    model = two_adapter_model(b_stage=b_stage)
    ids, mask, rows = left_padded_batch(lengths=(9, 6, 4, 8))
    alone = each_alone(model, ids, mask)
    assert (alone["b"] - alone["default"]).abs().max() > 1e-3
    names = ["b", "__base__", "default", "b"]
    mixed = logits(model, ids, mask, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=1e-5)
    for row, (name, tokens) in enumerate(zip(names, rows, strict=True)):  # each row alone, unpadded
        if name == "__base__":
            with model.disable_adapter():
                single = logits(model, tokens[None], None)[0]
        else:
            model.set_adapter(name)
            single = logits(model, tokens[None], None)[0]
        torch.testing.assert_close(mixed[row, -len(tokens) :], single, atol=1e-4, rtol=1e-4)
    model.set_adapter("default")
    # the call's routes did not stick: the active adapter runs alone again
    torch.testing.assert_close(logits(model, ids, mask), alone["default"], atol=0, rtol=0)


def test_adapter_names_with_an_inactive_adapter_and_no_interventions_active():
    model = two_adapter_model()
    ids, mask, _ = left_padded_batch()
    alone = each_alone(model, ids, mask)
    model.base_model.set_stage("lora")  # the active adapter applies no interventions; "b" (stage reft) still does
    mixed = logits(model, ids, mask, adapter_names=["b", "b", "__base__"])
    torch.testing.assert_close(mixed[:2], alone["b"][:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], alone["__base__"][2], atol=1e-5, rtol=1e-5)


def test_generate_with_adapter_names_matches_each_adapter_alone():
    model = two_adapter_model()
    ids, mask, _ = left_padded_batch()
    names = ["default", "b", "__base__"]
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    want = model.generate(input_ids=ids, **kwargs)
            else:
                model.set_adapter(name)
                want = model.generate(input_ids=ids, **kwargs)
            assert torch.equal(mixed[row], want[row]), name
    model.set_adapter("default")
    with torch.no_grad():
        beams = model.generate(input_ids=ids, adapter_names=names, num_beams=2, **kwargs)
        model.set_adapter("b")
        want = model.generate(input_ids=ids, num_beams=2, **kwargs)
    assert torch.equal(beams[1], want[1])  # PEFT repeats the names per beam; the interventions follow


def test_adapter_names_refusals_are_peft_messages():
    model = two_adapter_model()
    ids, mask, _ = left_padded_batch()
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["b"])
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["b", "nope", "b"])
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["b", "b", "b"])


# ---------------------------------------------------------------- add_weighted_adapter
def test_add_weighted_adapter_is_refused_before_building_anything():
    model = two_adapter_model()
    before = set(model.peft_config), set(model.base_model.heft_interventions)
    with pytest.raises(ValueError, match="cannot combine HEFT adapters .* not linear in its orthonormal rotation"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", combination_type="linear")
    assert (set(model.peft_config), set(model.base_model.heft_interventions)) == before
    same = get_peft_model(tiny_llama(), heft_config())
    same.add_adapter("other", heft_config())  # same config: PEFT's own checks pass, so only HEFT's refusal stops it
    with pytest.raises(ValueError, match="nothing was added"):
        same.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix")
    assert set(same.peft_config) == {"default", "other"} and "mix" not in same.base_model.heft_interventions


# ---------------------------------------------------------------- stage per adapter
def _train_step(model, ids, mask):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("is_trainable", [False, True])
def test_stage_is_per_adapter_load_and_activate_a_second_adapter_after_training(tmp_path, is_trainable):
    base = tiny_llama()
    saved = get_peft_model(clone(base), heft_config(**B_OVERRIDES))
    randomize_interventions(saved, seed=7)
    saved.save_pretrained(tmp_path / "b")
    b_alone = PeftModel.from_pretrained(clone(base), tmp_path / "b").eval()

    model = get_peft_model(clone(base), heft_config())
    tuner = model.base_model
    tuner.set_stage("reft")
    ids, mask, _ = left_padded_batch()
    _train_step(model, ids, mask)
    a_logits = logits(model, ids, mask)
    a_trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    model.load_adapter(tmp_path / "b", adapter_name="b", is_trainable=is_trainable)
    assert tuner.stage == "reft"  # loading does not touch the active adapter
    model.set_adapter("b")
    assert tuner.stage == ("joint" if is_trainable else "frozen")
    torch.testing.assert_close(logits(model, ids, mask), logits(b_alone, ids, mask), atol=0, rtol=0)
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        want = b_alone.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if is_trainable:
        assert any(".b." in n and "heft_interventions" in n for n in trainable)
        assert any(".b." in n and "lora_" in n for n in trainable)
    assert all(".b." in n for n in trainable)

    model.set_adapter("default")
    assert tuner.stage == "reft"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == a_trainable
    torch.testing.assert_close(logits(model, ids, mask), a_logits, atol=0, rtol=0)


def test_new_adapter_starts_in_lora_stage_and_delete_adapter_restores_the_remaining_one():
    model = two_adapter_model()
    ids, mask, _ = left_padded_batch()
    default_logits = logits(model, ids, mask)
    model.add_adapter("c", heft_config())
    model.set_adapter("c")
    assert model.base_model.stage == "lora"
    model.set_adapter("default")
    model.delete_adapter("b")
    model.delete_adapter("c")
    assert model.base_model.stage == "reft" and set(model.base_model.heft_interventions) == {"default"}
    torch.testing.assert_close(logits(model, ids, mask), default_logits, atol=0, rtol=0)


def test_enable_disable_adapter_layers_keep_the_stage():
    base = tiny_llama()
    model = two_adapter_model(base)
    ids, mask, _ = left_padded_batch()
    want = logits(model, ids, mask)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.base_model.disable_adapter_layers()
    torch.testing.assert_close(logits(model, ids, mask), logits(base, ids, mask), atol=1e-5, rtol=1e-5)
    model.base_model.enable_adapter_layers()
    torch.testing.assert_close(logits(model, ids, mask), want, atol=0, rtol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_set_requires_grad_covers_lora_and_interventions():
    model = two_adapter_model()
    model.set_requires_grad("b", requires_grad=True)
    b_params = {n: p.requires_grad for n, p in model.named_parameters() if ".b." in n}
    assert b_params and all(b_params.values())
    assert any("heft_interventions.b." in n for n in b_params)
    model.set_requires_grad(["b"], requires_grad=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".b." in n and "lora_" in n)
    reft = sum(p.numel() for p in model.base_model.heft_interventions["b"].parameters())
    before = model.get_nb_trainable_parameters()[0]
    model.set_requires_grad("b")
    assert model.get_nb_trainable_parameters()[0] == before + lora + reft


# ---------------------------------------------------------------- saving selected adapters
def test_save_pretrained_selected_adapters_reloads_that_adapter(tmp_path):
    base = tiny_llama()
    model = two_adapter_model(base)
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    assert (tmp_path / "b" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    ids, mask, _ = left_padded_batch()
    model.set_adapter("b")
    want = logits(model, ids, mask)
    model.base_model.set_stage("frozen")
    frozen = logits(model, ids, mask)
    loaded = PeftModel.from_pretrained(clone(base), tmp_path / "b").eval()
    torch.testing.assert_close(logits(loaded, ids, mask), frozen, atol=0, rtol=0)
    torch.testing.assert_close(want, frozen, atol=0, rtol=0)  # reft and frozen apply the same parts


# ---------------------------------------------------------------- PEFT's own refusals
def test_hotswap_mixed_model_and_inject_adapter_in_model_are_refused_by_peft(tmp_path):
    from peft.utils.hotswap import hotswap_adapter

    model = two_adapter_model()
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    with pytest.raises(ValueError, match="Hotswapping only supports LORA but HEFT was passed"):
        hotswap_adapter(model, str(tmp_path), adapter_name="default")
    with pytest.raises(ValueError, match="'HEFT' is not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_llama(), heft_config(), mixed=True)
    with pytest.raises(ValueError, match="`inject_adapter_in_model` does not support PeftType.HEFT"):
        inject_adapter_in_model(heft_config(), tiny_llama())
    with pytest.raises(ValueError, match="`inject_adapter_in_model` does not support PeftType.HEFT"):
        tiny_llama().load_adapter(str(tmp_path))  # transformers' integration goes through inject_adapter_in_model


# ---------------------------------------------------------------- DataParallel
def _replica_of(model):
    """What torch.nn.parallel.replicate makes of a module tree (GPU-only there), built with the same nn.Module hook."""
    replica = model._replicate_for_data_parallel()
    replica._modules = dict(replica._modules)
    replica._modules["base_model"] = model.base_model._replicate_for_data_parallel()
    return replica


def test_data_parallel_replica_is_refused_with_ddp_advice():
    model = two_adapter_model()
    ids, mask, _ = left_padded_batch()
    message = "cannot run under torch.nn.DataParallel.*`accelerate launch` or `torchrun"
    with pytest.raises(RuntimeError, match=message):
        _replica_of(model)(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match=message):
        refuse_data_parallel_replica(model.base_model._replicate_for_data_parallel())
    refuse_data_parallel_replica(model.base_model)  # the model itself is not a replica
    # DataParallel without GPUs (or with one) runs the module itself: that works and equals the model
    torch.testing.assert_close(
        logits(torch.nn.DataParallel(model), ids, mask), logits(model, ids, mask), atol=0, rtol=0
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DataParallel replicates only across >= 2 GPUs")
def test_data_parallel_on_two_gpus_is_refused():
    model = two_adapter_model().cuda()
    ids, mask, _ = left_padded_batch(lengths=(9, 6, 4, 8))
    with pytest.raises(RuntimeError, match="cannot run under torch.nn.DataParallel"):
        torch.nn.DataParallel(model, device_ids=[0, 1])(input_ids=ids.cuda(), attention_mask=mask.cuda())


def test_staged_trainer_refuses_several_gpus_in_one_process(tmp_path, monkeypatch):
    """transformers' Trainer wraps the model in DataParallel when one process sees several GPUs: refused up front."""
    from sft_fixtures import cpu_sft_args, make_dataset, tiny_sft_model, tiny_tokenizer

    from peft_heft import HeftSFTConfig, StagedSFTTrainer

    args = cpu_sft_args(str(tmp_path / "out"))
    monkeypatch.setattr(HeftSFTConfig, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="would wrap the model in torch.nn.DataParallel.*`accelerate launch`"):
        StagedSFTTrainer(
            tiny_sft_model(),
            args=args,
            train_dataset=make_dataset("prompt_completion", 8),
            processing_class=tiny_tokenizer(),
            peft_config=heft_config(intervention_layers=[0]),
        )


def test_load_adapter_with_low_cpu_mem_usage_gives_the_same_logits(tmp_path):
    base = tiny_llama()
    saved = get_peft_model(clone(base), heft_config(**B_OVERRIDES))
    randomize_interventions(saved, seed=5)
    saved.save_pretrained(tmp_path / "b")
    ids, mask, _ = left_padded_batch()
    want = logits(PeftModel.from_pretrained(clone(base), tmp_path / "b").eval(), ids, mask)
    model = get_peft_model(clone(base), heft_config())
    model.load_adapter(tmp_path / "b", adapter_name="b", low_cpu_mem_usage=True)
    model.set_adapter("b")
    assert not any(p.device.type == "meta" for p in model.parameters())
    torch.testing.assert_close(logits(model.eval(), ids, mask), want, atol=0, rtol=0)


def test_operations_table_names_existing_tests():
    """docs/heft-method.md's table of PEFT operations: every row names a test that exists."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "heft-method.md").read_text(encoding="utf-8")
    table = page.split("## PEFT operations", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 25
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].split()[0].rstrip(",:") in ("works", "refused"), row
        named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", cells[2])
        assert named, row
        for path, name in named:
            assert re.search(rf"^def {name}\(", (root / path).read_text(encoding="utf-8"), re.MULTILINE), (path, name)
