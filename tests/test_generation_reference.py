"""Generation checked against independent references, on the transformers release installed (5.24 passes the KV
cache as ``cache=`` and no ``cache_position``; older releases as ``past_key_values``): a manual greedy loop that
recomputes the whole sequence with the prompt's locations, cache vs no cache, chunked prefill, a static cache, a
missing attention mask, each row alone vs the batch, beams, threads, and backbone calls."""

import threading

import pytest
import torch
from conftest import heft_config, left_padded_batch, randomize_interventions, tiny_llama
from peft import get_peft_model

from peft_heft import compute_locations

GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def reft_model(seed: int = 3, **overrides):
    model = get_peft_model(tiny_llama(), heft_config(**overrides))
    model.base_model.set_stage("reft")
    randomize_interventions(model, seed=seed)
    return model.eval()


def manual_greedy(model, ids, mask, steps):
    """Greedy decoding by hand: every step recomputes the whole sequence, with the prompt's locations given
    explicitly and position ids from the mask (as generate() makes them for left padding)."""
    config = model.peft_config["default"]
    locations = compute_locations(config.position_spec, mask, ids.shape[0], ids.shape[1], False)
    seq, full_mask = ids, mask
    for _ in range(steps):
        position_ids = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
        logits = model(
            input_ids=seq, attention_mask=full_mask, position_ids=position_ids, intervention_locations=locations
        ).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        full_mask = torch.cat([full_mask, torch.ones_like(nxt)], dim=1)
    return seq


@torch.no_grad()
def test_cache_equals_no_cache_equals_manual_full_recompute_loop():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    cached = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **GREEDY)
    manual = manual_greedy(model, ids, mask, GREEDY["max_new_tokens"])
    assert torch.equal(cached, manual)
    assert torch.equal(uncached, manual)
    # the interventions decide the tokens here, so the loop above is a real reference
    model.base_model.set_stage("lora")
    assert not torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), manual)


@torch.no_grad()
def test_chunked_prefill_equals_one_prefill():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    whole = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    for chunk in (1, 2, 4):
        chunked = model.generate(input_ids=ids, attention_mask=mask, prefill_chunk_size=chunk, **GREEDY)
        assert torch.equal(chunked, whole), chunk


@torch.no_grad()
def test_static_cache_equals_dynamic_cache():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    dynamic = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    static = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **GREEDY)
    assert torch.equal(static, dynamic)


@torch.no_grad()
def test_missing_attention_mask_is_inferred_from_padding_like_transformers():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    with_mask = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    without = model.generate(input_ids=ids, **GREEDY)
    assert torch.equal(without, with_mask)
    positional = model.generate(ids, **GREEDY)
    assert torch.equal(positional, with_mask)


@torch.no_grad()
def test_missing_attention_mask_without_padding_uses_every_token():
    model = reft_model()
    ids, _, rows = left_padded_batch()
    row = rows[0][None]
    assert torch.equal(
        model.generate(input_ids=row, **GREEDY),
        model.generate(input_ids=row, attention_mask=torch.ones_like(row), **GREEDY),
    )


@torch.no_grad()
def test_batched_left_padded_rows_equal_each_row_alone_with_sampling_free_beams():
    model = reft_model()
    ids, mask, rows = left_padded_batch()
    beam = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    batched = model.generate(input_ids=ids, attention_mask=mask, **beam)
    assert batched.shape[0] == 2 * len(rows)
    width = ids.shape[1]
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **beam)
        assert torch.equal(alone[:, len(row) :], batched[2 * i : 2 * i + 2, width:]), i
    model.base_model.set_stage("lora")
    assert not torch.equal(model.generate(input_ids=ids, attention_mask=mask, **beam), batched)


@torch.no_grad()
def test_num_return_sequences_with_sampling_repeats_each_prompt_locations():
    model = reft_model()
    ids, mask, rows = left_padded_batch()
    sample = dict(max_new_tokens=4, do_sample=True, num_return_sequences=2, pad_token_id=0, top_k=0)
    torch.manual_seed(0)
    got = model.generate(input_ids=ids, attention_mask=mask, **sample)
    # the same draws, made by hand: each prompt repeated twice, one row each
    torch.manual_seed(0)
    repeated = model.generate(
        input_ids=ids.repeat_interleave(2, 0),
        attention_mask=mask.repeat_interleave(2, 0),
        **{**sample, "num_return_sequences": 1},
    )
    assert torch.equal(got, repeated)


def test_two_threads_generating_at_once_each_get_what_they_get_alone():
    model = reft_model()
    ids, mask, rows = left_padded_batch()
    inputs = [(ids, mask), (rows[2][None], torch.ones(1, len(rows[2]), dtype=torch.long))]
    with torch.no_grad():
        alone = [
            model.generate(input_ids=i, attention_mask=m, max_new_tokens=24, do_sample=False, pad_token_id=0)
            for i, m in inputs
        ]
    results: dict[int, list] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def work(k):
        i, m = inputs[k]
        barrier.wait()
        with torch.no_grad():
            for _ in range(4):
                results[k].append(
                    model.generate(input_ids=i, attention_mask=m, max_new_tokens=24, do_sample=False, pad_token_id=0)
                )

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        assert len(results[k]) == 4
        for out in results[k]:
            assert torch.equal(out, alone[k])


@torch.no_grad()
def test_backbone_call_after_forward_of_another_shape_plans_its_own_call():
    model = reft_model()
    ids, mask, rows = left_padded_batch()
    backbone = model.base_model.model.model
    full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # a backbone call alone, of another shape, right after: it must use its own mask, not the last plan
    row = rows[1][None]
    alone = backbone(input_ids=row, attention_mask=torch.ones_like(row)).last_hidden_state
    via_model = model(input_ids=row, attention_mask=torch.ones_like(row), output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(alone, via_model)
    # and the same row inside the padded batch gives the same states at its real tokens
    torch.testing.assert_close(full.hidden_states[-1][1, -len(rows[1]) :], via_model[0], atol=1e-5, rtol=1e-5)
    model.base_model.set_stage("lora")
    plain = backbone(input_ids=row, attention_mask=torch.ones_like(row)).last_hidden_state
    assert (plain - alone).abs().max() > 1e-3


@torch.no_grad()
def test_backbone_call_with_explicit_locations_of_previous_call_does_not_leak():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    locations = torch.full((3, 2, 2), -1)
    locations[:, 0, 0] = ids.shape[1] - 1
    model(input_ids=ids, attention_mask=mask, intervention_locations=locations)
    # the next call gives no locations: it must use its own mask, not the explicit ones of the call before
    a = model(input_ids=ids, attention_mask=mask).logits
    b = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b)
    c = model(input_ids=ids, attention_mask=mask, intervention_locations=locations).logits
    assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize(
    "locations, message",
    [
        ([[[2, 2], [5, -1]]], "names position 2 more than once in row 0"),
        ([[[2, 3], [3, -1]]], "names position 3 more than once in row 0"),
        ([[[2, 3], [5, 9]]], "contains position 9, but the sequence has 9 tokens"),
        ([[[2, 3], [5, -2]]], "may only contain token positions >= 0, or -1"),
        ([[[2.0, 3.0], [5.0, 6.0]]], "must hold integer token positions"),
        ([[2, 3, 5]], "expected (batch=1, groups=2, n)"),
    ],
)
def test_bad_explicit_locations_are_refused(locations, message):
    model = reft_model()
    ids = torch.arange(3, 12)[None]
    with pytest.raises((ValueError, TypeError)) as info:
        model(input_ids=ids, intervention_locations=locations)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "shape, message",
    [((0, 5), "no rows"), ((2, 0), "no tokens")],
)
def test_empty_inputs_are_refused_with_the_shape(shape, message):
    model = reft_model()
    with pytest.raises(ValueError) as info:
        model(input_ids=torch.zeros(shape, dtype=torch.long))
    assert message in str(info.value) and str(shape) in str(info.value)
    with pytest.raises(ValueError, match="at least one row with at least one token"):
        model.generate(input_ids=torch.zeros(shape, dtype=torch.long), max_new_tokens=2)


def test_attention_mask_of_another_length_is_refused():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    with pytest.raises(ValueError) as info:
        model(input_ids=ids, attention_mask=mask[:, 1:])
    text = str(info.value)
    assert "attention_mask has shape (3, 8)" in text and "must have shape (3, 9)" in text
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 8\)"):
        model.generate(input_ids=ids, attention_mask=mask[:, 1:], max_new_tokens=2, pad_token_id=0)


def test_repeated_generation_and_forward_leave_no_state_behind():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(before, after, atol=0, rtol=0)
