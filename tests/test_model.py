"""HeftModel behaviour: stages, gradients, padding, generation, merging, multiple adapters, bad input."""

import copy

import pytest
import torch
from conftest import (
    ARCHITECTURES,
    VOCAB,
    clone,
    heft_config,
    left_padded_batch,
    randomize_interventions,
    right_padded,
    tiny_llama,
)
from peft import LoraConfig, get_peft_model

from peft_heft import HeftModel
from peft_heft.tuner.interventions import LoreftIntervention


def make(base=None, **overrides):
    base = tiny_llama() if base is None else base
    model = get_peft_model(base, heft_config(**overrides))
    model.eval()
    return model


def reft_model(**overrides):
    model = make(**overrides)
    model.base_model.set_stage("reft")
    randomize_interventions(model)
    model.eval()
    return model


def test_get_peft_model_builds_lora_layers_and_interventions():
    model = make()
    assert isinstance(model.base_model, HeftModel)
    modules = model.base_model.heft_interventions["default"]
    assert sorted(modules.keys()) == ["layer1_first", "layer1_last", "layer3_first", "layer3_last"]
    assert all(isinstance(m, LoreftIntervention) for m in modules.values())
    assert model.peft_config["default"].base_model_hidden_size == 32
    assert model.peft_config["default"].base_model_num_layers == 4
    lora_names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert len(lora_names) == 8  # q_proj and v_proj in 4 layers


def test_lora_stage_equals_plain_peft_lora_and_reft_stage_changes_output():
    base = tiny_llama()
    heft = get_peft_model(clone(base), heft_config()).eval()
    lora = get_peft_model(
        clone(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    lora.load_state_dict({k: v for k, v in heft.state_dict().items() if "heft_interventions" not in k}, strict=False)
    ids, mask, _ = left_padded_batch()
    out_heft = heft(input_ids=ids, attention_mask=mask).logits
    out_lora = lora(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out_heft, out_lora)
    heft.base_model.set_stage("reft")
    randomize_interventions(heft)
    out_reft = heft(input_ids=ids, attention_mask=mask).logits
    assert (out_reft - out_lora).abs().max() > 1e-3


def _hand_computed_logits(model, ids, mask, positions_per_row):
    """Apply the LoReFT formula by hand with a plain hook at the given positions, interventions switched off."""
    tuner = model.base_model
    decoder_layers = tuner.model.model.layers
    modules = tuner.heft_interventions["default"]
    handles = []
    for layer in (1, 3):

        def hook(mod, args, out, layer=layer):
            out = out.clone()
            for row, (firsts, lasts) in enumerate(positions_per_row):
                for group, positions in (("first", firsts), ("last", lasts)):
                    m = modules[f"layer{layer}_{group}"]
                    R = m.rotate_layer.weight.T  # (r, d)
                    W, b = m.learned_source.weight, m.learned_source.bias
                    for p in positions:
                        h = out[row, p]
                        out[row, p] = h + R.T @ (W @ h + b - R @ h)
            return out

        handles.append(decoder_layers[layer].register_forward_hook(hook))
    tuner.set_stage("lora")
    try:
        return model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
        tuner.set_stage("reft")


def test_reft_stage_matches_closed_form_at_expected_positions():
    model = reft_model()
    ids, mask, rows = left_padded_batch(lengths=(9, 6, 3))
    width = ids.shape[1]
    expected_positions = []
    for n in (9, 6, 3):
        start = width - n
        k = min(2, n // 2)
        expected_positions.append(([start + i for i in range(k)], [start + n - k + i for i in range(k)]))
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = _hand_computed_logits(model, ids, mask, expected_positions)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_left_right_padding_and_single_rows_agree():
    model = reft_model()
    ids, mask, rows = left_padded_batch()
    r_ids, r_mask = right_padded(rows)
    with torch.no_grad():
        left = model(input_ids=ids, attention_mask=mask).logits
        right = model(input_ids=r_ids, attention_mask=r_mask).logits
        for i, row in enumerate(rows):
            single = model(input_ids=row[None]).logits[0]
            n = len(row)
            torch.testing.assert_close(left[i, -n:], single, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(right[i, :n], single, atol=1e-4, rtol=1e-4)


def test_explicit_locations_override_the_mask():
    model = reft_model()
    ids, mask, _ = left_padded_batch(lengths=(8, 8, 8))
    locs = torch.tensor([[[0, 1], [6, 7]]] * 3)
    with torch.no_grad():
        derived = model(input_ids=ids, attention_mask=mask).logits
        explicit = model(input_ids=ids, attention_mask=mask, intervention_locations=locs).logits
        other = model(
            input_ids=ids, attention_mask=mask, intervention_locations=torch.tensor([[[2, 3], [4, -1]]] * 3)
        ).logits
    torch.testing.assert_close(derived, explicit)
    assert (other - derived).abs().max() > 1e-4
    with pytest.raises(ValueError, match="has 8 tokens"):
        model(input_ids=ids, attention_mask=mask, intervention_locations=torch.tensor([[[0, 9], [1, 2]]] * 3))
    with pytest.raises(ValueError, match="expected \\(batch=3, groups=2"):
        model(input_ids=ids, attention_mask=mask, intervention_locations=torch.tensor([[0, 1]] * 3))


def _grads(model):
    return {n: p.grad is not None and p.grad.abs().sum().item() > 0 for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", ["lora", "reft", "joint", "frozen"])
def test_gradients_reach_only_the_current_stage(stage):
    model = make()
    randomize_interventions(model)
    model.base_model.set_stage(stage)
    model.train()
    ids, mask, _ = left_padded_batch()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    is_lora = lambda n: "lora_" in n  # noqa: E731
    is_reft = lambda n: "heft_interventions" in n  # noqa: E731
    expected = {
        "lora": {n for n, _ in model.named_parameters() if is_lora(n)},
        "reft": {n for n, _ in model.named_parameters() if is_reft(n)},
        "joint": {n for n, _ in model.named_parameters() if is_lora(n) or is_reft(n)},
        "frozen": set(),
    }[stage]
    assert trainable == expected
    if stage == "frozen":
        return
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    got = {n for n, has in _grads(model).items() if has}
    assert got == expected


def test_set_stage_switches_in_place_without_copying():
    model = make()
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    for stage in ("lora", "reft", "joint", "frozen", "lora"):
        model.base_model.set_stage(stage)
    assert params_before == {n: p.data_ptr() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="Unknown HEFT stage 'warmup'"):
        model.base_model.set_stage("warmup")


def test_reft_then_lora_order_can_keep_interventions_applied():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        with_reft = model(input_ids=ids, attention_mask=mask).logits
        model.base_model.set_stage("lora", apply_interventions=True)
        kept = model(input_ids=ids, attention_mask=mask).logits
        model.base_model.set_stage("lora")
        dropped = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(with_reft, kept)
    assert (with_reft - dropped).abs().max() > 1e-4


def test_disable_adapter_equals_base_model():
    base = tiny_llama()
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
    model = get_peft_model(clone(base), heft_config()).eval()
    model.base_model.set_stage("reft")
    randomize_interventions(model)
    with torch.no_grad():
        with model.disable_adapter():
            got = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want)
    assert (after - want).abs().max() > 1e-3


def test_generation_cache_vs_no_cache_and_batched_vs_single():
    model = reft_model()
    ids, mask, rows = left_padded_batch()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
        width = ids.shape[1]
        for i, row in enumerate(rows):
            single = model.generate(
                input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **kwargs
            )
            assert torch.equal(single[0, len(row) :], cached[i, width:])
        # the interventions matter for what is generated (otherwise the checks above prove nothing)
        model.base_model.set_stage("lora")
        plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert not torch.equal(plain, cached)


def test_generation_intervenes_on_prompt_only():
    """The first generated token's logits equal a forward pass over the prompt."""
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        forward = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(out.logits[0], forward, atol=1e-5, rtol=1e-5)


def test_beam_search_and_multiple_return_sequences_run_with_repeated_locations():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        beams = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=3,
            num_beams=2,
            num_return_sequences=2,
            do_sample=False,
            pad_token_id=0,
        )
        greedy2 = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        greedy1 = model.generate(
            input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    assert beams.shape[0] == 6
    assert torch.equal(greedy1[0], greedy2[0])


def test_merge_adapter_keeps_interventions_and_logits():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        model.merge_adapter()
        merged = model(input_ids=ids, attention_mask=mask).logits
        model.unmerge_adapter()
        unmerged = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unmerged, before, atol=1e-5, rtol=1e-4)


def test_merge_and_unload_refuses_with_active_interventions():
    model = reft_model()
    with pytest.raises(ValueError, match="cannot fold HEFT's ReFT interventions"):
        model.merge_and_unload()
    assert "default" in model.base_model.heft_interventions  # nothing was dropped


def test_merge_and_unload_in_lora_stage_merges_lora_and_warns():
    base = tiny_llama()
    model = get_peft_model(clone(base), heft_config()).eval()
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    with pytest.warns(UserWarning, match="dropped"):
        merged = model.merge_and_unload()
    assert type(merged) is type(base)
    assert not merged._forward_hooks and not merged._forward_pre_hooks
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_unload_returns_exact_base_model():
    base = tiny_llama()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
    model = get_peft_model(base, heft_config())
    model.base_model.set_stage("reft")
    restored = model.unload()
    assert set(restored.state_dict()) == set(reference)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in reference.items())
    hooks = [m for m in restored.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == []
    with torch.no_grad():
        assert torch.equal(restored(input_ids=ids, attention_mask=mask).logits, want)


def test_multiple_adapters_are_isolated():
    model = make()
    model.add_adapter("other", heft_config(intervention_layers=[0], intervention_positions="l3"))
    tuner = model.base_model
    assert sorted(tuner.heft_interventions["other"].keys()) == ["layer0"]
    randomize_interventions(model)
    ids, mask, _ = left_padded_batch()
    tuner.set_stage("reft")
    with torch.no_grad():
        out_default = model(input_ids=ids, attention_mask=mask).logits
    model.set_adapter("other")
    tuner.set_stage("reft")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("heft_interventions.other." in n for n in trainable)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if ".default" in n}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    opt.step()
    model.eval()
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters() if n in snapshot)
    with torch.no_grad():
        out_other = model(input_ids=ids, attention_mask=mask).logits
    assert (out_other - out_default).abs().max() > 1e-4
    model.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, out_default)
    model.delete_adapter("other")
    assert "other" not in tuner.heft_interventions
    status = model.get_model_status()
    assert status.available_adapters == ["default"]


def test_deleting_last_intervening_adapter_removes_hooks():
    model = make(intervention_layers=[2])
    model.add_adapter("b", heft_config(intervention_layers=[0]))
    decoder = model.base_model.model.model.layers
    assert decoder[0]._forward_hooks and decoder[2]._forward_hooks
    model.delete_adapter("b")
    assert not decoder[0]._forward_hooks and decoder[2]._forward_hooks


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_train_and_generate(arch):
    factory, targets = ARCHITECTURES[arch]
    model = get_peft_model(factory(), heft_config(target_modules=targets, intervention_layers=[0, -1]))
    model.base_model.set_stage("reft")
    randomize_interventions(model)
    ids, mask, rows = left_padded_batch()
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "heft_interventions" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False
        )
    assert torch.equal(a, b)


def test_bf16_base_model_with_float32_interventions():
    model = get_peft_model(tiny_llama(dtype=torch.bfloat16), heft_config())
    tuner = model.base_model
    assert all(p.dtype == torch.float32 for p in tuner.heft_interventions.parameters())
    tuner.set_stage("reft")
    randomize_interventions(model)
    ids, mask, _ = left_padded_batch()
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None for p in tuner.heft_interventions.parameters())
    model.eval()
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (3, ids.shape[1] + 3)


def test_gradient_checkpointing_gives_same_gradients():
    ids, mask, _ = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_llama(), heft_config())
        model.base_model.set_stage("joint")
        randomize_interventions(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


def test_inputs_embeds_equals_input_ids():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(a, b)


def test_deepcopy_hooks_follow_the_copy():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.base_model.heft_interventions.parameters():
            p.add_(0.3)
        a = model(input_ids=ids, attention_mask=mask).logits
        b = copied(input_ids=ids, attention_mask=mask).logits
        model.base_model.set_stage("lora")
        c = copied(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(b, c)  # the copy's routing does not follow the original's stage


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"intervention_layers": [4]}, "contains 4, but the model has 4 decoder layers"),
        ({"intervention_layers": [-5]}, "contains -5"),
        ({"intervention_layers": [1, -3]}, "names the same layer twice"),
        ({"intervention_rank": 33}, "larger than the model's hidden size 32"),
    ],
)
def test_bad_layers_and_ranks_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_llama(), heft_config(**overrides))


def test_print_trainable_parameters_counts_stage(capsys):
    model = make()
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    reft = sum(p.numel() for p in model.base_model.heft_interventions.parameters())
    assert model.get_nb_trainable_parameters()[0] == lora
    model.base_model.set_stage("reft")
    assert model.get_nb_trainable_parameters()[0] == reft
    assert reft == 4 * (32 * 2 + 32 * 2 + 2)  # 4 LoReFTs: R (d x r), W (r x d), b (r)


def test_vocab_fixture_is_sane():
    assert VOCAB > 10


def test_token_ids_outside_the_vocabulary_are_named_in_forward_and_generate():
    model = get_peft_model(tiny_llama(), heft_config()).eval()
    vocab = model.get_input_embeddings().num_embeddings
    for ids in (torch.tensor([[1, vocab + 5, 3]]), torch.tensor([[1, -100, 3]])):
        for generate in (False, True):
            with pytest.raises(ValueError) as error:
                model.generate(input_ids=ids, max_new_tokens=2) if generate else model(input_ids=ids)
            message = str(error.value)
            assert f"have {vocab} rows (ids 0 to {vocab - 1})" in message and "resize_token_embeddings" in message
            assert f"ids from {int(ids.min())} to {int(ids.max())}" in message
    with torch.no_grad():  # ids in range are untouched by the check
        assert model(input_ids=torch.tensor([[1, vocab - 1, 3]])).logits.shape == (1, 3, vocab)
