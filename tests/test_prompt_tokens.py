"""Where a forward call without ``intervention_locations`` intervenes: the prompt read from ``labels`` (leading
-100) or from ``intervention_prompt_lengths``, else the whole input; each compared with explicit locations computed
independently on the prompt tokens, for left and right padding."""

import warnings

import pytest
import torch
from conftest import VOCAB, heft_config, left_padded_batch, randomize_interventions, right_padded, tiny_llama
from peft import get_peft_model

from peft_heft import compute_locations, prompt_tokens
from peft_heft.tuner.positions import PositionSpec

PROMPT_LENGTHS = [5, 2, 3]  # real prompt tokens of the rows of left_padded_batch() (9, 6 and 4 real tokens)


def reft_model(positions="f2+l2"):
    model = get_peft_model(tiny_llama(), heft_config(intervention_positions=positions))
    model.base_model.set_stage("reft")
    randomize_interventions(model)
    return model.eval()


def prompt_locations(mask, lengths, positions="f2+l2"):
    """Locations of the spec on the first ``lengths[i]`` real tokens of each row, computed by hand."""
    prompt_mask = torch.zeros_like(mask)
    for i, n in enumerate(lengths):
        real = mask[i].nonzero().flatten()
        prompt_mask[i, real[:n]] = 1
    return compute_locations(PositionSpec.parse(positions), prompt_mask, mask.shape[0], mask.shape[1], False)


def labels_after_prompt(ids, mask, lengths):
    labels = ids.masked_fill(mask == 0, -100)
    for i, n in enumerate(lengths):
        real = mask[i].nonzero().flatten()
        labels[i, real[:n]] = -100
    return labels


@pytest.fixture(autouse=True)
def fresh_warnings():
    prompt_tokens._WARNED.clear()
    yield
    prompt_tokens._WARNED.clear()


def padded_batches():
    ids, mask, rows = left_padded_batch()
    yield "left", ids, mask
    yield "right", *right_padded(rows)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_labels_put_the_interventions_on_the_prompt(side):
    model = reft_model()
    _, ids, mask = next(b for b in padded_batches() if b[0] == side)
    labels = labels_after_prompt(ids, mask, PROMPT_LENGTHS)
    explicit = model(input_ids=ids, attention_mask=mask, intervention_locations=prompt_locations(mask, PROMPT_LENGTHS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clear prompt: no warning
        from_labels = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(from_labels.logits, explicit.logits, rtol=0, atol=0)
    # and the loss is the model's own loss on those labels, with those interventions
    again = model(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        intervention_locations=prompt_locations(mask, PROMPT_LENGTHS),
    )
    assert float(from_labels.loss) == float(again.loss)
    # the rule decides the output: the whole row as prompt gives other logits
    whole = model(input_ids=ids, attention_mask=mask)
    assert (whole.logits - explicit.logits).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_prompt_lengths_keyword_equals_explicit_locations(side):
    model = reft_model("f1+l3")
    _, ids, mask = next(b for b in padded_batches() if b[0] == side)
    expected = model(
        input_ids=ids, attention_mask=mask, intervention_locations=prompt_locations(mask, PROMPT_LENGTHS, "f1+l3")
    )
    got = model(input_ids=ids, attention_mask=mask, intervention_prompt_lengths=torch.tensor(PROMPT_LENGTHS))
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    # a list works too, and the keyword beats the labels (it is the more explicit of the two)
    labels = labels_after_prompt(ids, mask, [1, 1, 1])
    got = model(input_ids=ids, attention_mask=mask, labels=labels, intervention_prompt_lengths=PROMPT_LENGTHS)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)


@torch.no_grad()
def test_generate_with_prompt_lengths_pins_those_tokens():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = model.generate(
        input_ids=ids, attention_mask=mask, intervention_locations=prompt_locations(mask, PROMPT_LENGTHS), **gen
    )
    got = model.generate(input_ids=ids, attention_mask=mask, intervention_prompt_lengths=PROMPT_LENGTHS, **gen)
    assert torch.equal(got, expected)
    assert not torch.equal(got, model.generate(input_ids=ids, attention_mask=mask, **gen))


@torch.no_grad()
def test_labels_without_a_prompt_use_the_whole_row_and_warn_once():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)  # plain language modeling: every real token supervised
    whole = model(input_ids=ids, attention_mask=mask)
    with pytest.warns(UserWarning, match="cannot see the prompt"):
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, whole.logits, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        model(input_ids=ids, attention_mask=mask, labels=labels)


@torch.no_grad()
def test_row_without_any_label_is_all_prompt():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    labels = labels_after_prompt(ids, mask, PROMPT_LENGTHS)
    labels[1] = -100  # nothing supervised in row 1 (e.g. its answer was truncated away)
    lengths = [PROMPT_LENGTHS[0], int(mask[1].sum()), PROMPT_LENGTHS[2]]
    expected = model(input_ids=ids, attention_mask=mask, intervention_locations=prompt_locations(mask, lengths))
    got = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)


@torch.no_grad()
def test_batch_without_mask_warns_once_single_row_does_not():
    model = reft_model()
    ids = torch.randint(3, VOCAB, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids[:1])
    with pytest.warns(UserWarning, match="without an attention_mask"):
        model(input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=ids)


@torch.no_grad()
def test_bad_prompt_hints_are_refused_with_the_fix():
    model = reft_model()
    ids, mask, _ = left_padded_batch()
    locations = prompt_locations(mask, PROMPT_LENGTHS)
    with pytest.raises(ValueError, match="either intervention_locations or intervention_prompt_lengths"):
        model(
            input_ids=ids, attention_mask=mask, intervention_locations=locations, intervention_prompt_lengths=[1] * 3
        )
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        model(input_ids=ids, attention_mask=mask, intervention_prompt_lengths=[1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        model(input_ids=ids, attention_mask=mask, intervention_prompt_lengths=[1, -1, 2])
    with pytest.raises(TypeError, match="integer token counts"):
        model(input_ids=ids, attention_mask=mask, intervention_prompt_lengths=[1.5, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"intervention_prompt_lengths\[2\] is 5, but row 2 has only 4 real"):
        model(input_ids=ids, attention_mask=mask, intervention_prompt_lengths=[1, 1, 5])
    with pytest.raises(ValueError, match="either intervention_locations or intervention_prompt_lengths"):
        model.generate(
            input_ids=ids, attention_mask=mask, intervention_locations=locations, intervention_prompt_lengths=1
        )


@torch.no_grad()
def test_labels_with_a_cache_are_refused():
    model = reft_model()
    ids = torch.randint(3, VOCAB, (1, 8))
    out = model(input_ids=ids[:, :5], use_cache=True)
    labels = ids[:, 5:].clone()
    with pytest.raises(ValueError, match="cannot tell HEFT where the prompt is"):
        model(input_ids=ids[:, 5:], labels=labels, past_key_values=out.past_key_values, use_cache=True)
