"""QLoRA: HEFT on a bitsandbytes 4-bit (nf4, fp4) or 8-bit base, on CPU (bitsandbytes >= 0.50 has a CPU backend).

The interventions are created in the compute dtype on the layer's device (never the quantized weights' uint8/int8),
both stages train through StagedSFTTrainer, cached generation matches uncached, and a saved adapter reloads onto a
freshly quantized base with the same logits. Also: float32 interventions on half-precision hidden states.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import heft_config, left_padded_batch, randomize_interventions, tiny_llama
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from sft_fixtures import cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer

from peft_heft import HeftCallback, StagedSFTTrainer
from peft_heft.tuner.interventions import build_intervention
from peft_heft.tuner.layer import intervene, locate

warnings.filterwarnings("ignore", category=FutureWarning)

QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def quantization_config(kind: str):
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_compute_dtype": torch.float32} if kind != "int8" else {}
    return BitsAndBytesConfig(**QUANTIZATIONS[kind], **extra)


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-base")
    # hidden 64: bitsandbytes' CPU 4-bit inference kernel (AVX512-BF16 machines) needs in_features >= its blocksize 64
    tiny_sft_model(hidden=64).save_pretrained(path)
    return path


def load_quantized(path, kind: str):
    """The tiny model quantized on load; skips when bitsandbytes cannot quantize on this platform."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization_config(kind), device_map="cpu"
        )
        model.train()  # in eval mode, bitsandbytes would repack the 4-bit weights for its CPU inference kernel
        with torch.no_grad():
            model(torch.tensor([[1, 7, 8]]))  # the backend must run the quantized matmul, not only load
        model.eval()
    except (ImportError, NotImplementedError, RuntimeError) as error:  # the base alone: bitsandbytes' own limits
        pytest.skip(f"bitsandbytes cannot run {kind} on this platform: {error}")
    return model


def quantized_weight_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for n, p in model.named_parameters() if "proj" in n and "lora_" not in n}


class Snapshots(HeftCallback):
    def __init__(self):
        self.reft = {}

    def on_stage_begin(self, args, state, control, stage=None, model=None, **kwargs):
        self.reft[(stage, "begin")] = intervention_weights(model)

    def on_stage_end(self, args, state, control, stage=None, model=None, **kwargs):
        self.reft[(stage, "end")] = intervention_weights(model)


def intervention_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "heft_interventions" in n}


def changed(before, after) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
def test_qlora_trains_both_stages_generates_and_reloads(tmp_path, saved_base, kind):
    base = load_quantized(saved_base, kind)
    assert quantized_weight_dtypes(base) <= {torch.uint8, torch.int8}
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, sft_heft_config())
    tuner = model.base_model
    params = list(tuner.heft_interventions.parameters())
    assert params and {p.dtype for p in params} == {torch.float32} and {p.device.type for p in params} == {"cpu"}

    snapshots = Snapshots()
    trainer = StagedSFTTrainer(
        model,
        args=cpu_sft_args(str(tmp_path / "out"), lora_max_steps=3, reft_max_steps=3),
        train_dataset=make_dataset("prompt_completion", 24),
        processing_class=tiny_tokenizer(),
        callbacks=[snapshots],
    )
    trainer.train()
    reft = snapshots.reft
    assert not changed(reft[("lora", "begin")], reft[("lora", "end")]), "interventions moved in the LoRA stage"
    assert changed(reft[("reft", "begin")], reft[("reft", "end")]), "interventions did not train in the ReFT stage"

    model = trainer.model.eval()
    model.base_model.set_stage("frozen")
    tok = tiny_tokenizer()
    prompts = tok(["w1 w2 w3 ? Answer:", "w20 w5 ?"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        cached = model.generate(**prompts, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(**prompts, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)

    out = tmp_path / "adapter"
    model.save_pretrained(out)
    loaded = PeftModel.from_pretrained(load_quantized(saved_base, kind), out).eval()
    # TRL's SFTTrainer casts a quantized model's trainable adapter weights to bf16 (QLoRA's recipe): LoRA trained in
    # bf16 and was saved so; PEFT loads it into float32 LoRA layers (exactly, bf16 values are float32 values), and the
    # interventions, created in float32, stayed float32 throughout.
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert {p.dtype for p in lora.values()} == {torch.bfloat16}
    assert {p.dtype for n, p in model.named_parameters() if "heft_interventions" in n} == {torch.float32}
    loaded_weights = dict(loaded.named_parameters())
    for name, param in lora.items():
        assert torch.equal(loaded_weights[name], param.float())
        param.data = param.data.float()  # compare in the loaded model's precision
    assert quantized_weight_dtypes(loaded) <= {torch.uint8, torch.int8}
    with torch.no_grad():
        expected = model(**prompts).logits
        got = loaded(**prompts).logits
        with model.disable_adapter():
            assert not torch.allclose(expected, model(**prompts).logits)  # the adapter does act
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_interventions_on_half_precision_hidden_match_a_float32_reference(dtype):
    from peft_heft.tuner.config import HeftConfig
    from peft_heft.tuner.positions import compute_locations

    torch.manual_seed(0)
    hidden = torch.randn(3, 9, 32).to(dtype)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    spec = HeftConfig(target_modules=["q_proj"], intervention_positions="f2+l2").position_spec
    located = locate(compute_locations(spec, mask, 3, 9, False, None), 0, 9, 32)
    mods = [
        build_intervention("loreft", hidden_size=32, rank=4, dropout=0.0, dtype=torch.float32, device=None)
        for _ in range(2)
    ]
    with torch.no_grad():
        for m in mods:
            m.learned_source.weight.normal_(0, 0.5)
        got = intervene(hidden, located, mods)
        reference = intervene(hidden.float(), located, mods)  # everything in float32
        # the change computed in float32 from the same inputs, cast to the hidden dtype, added in it (as PEFT's LoRA)
        delta = (reference - hidden.float()).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, hidden + delta, atol=0, rtol=0)
    torch.testing.assert_close(got.float(), reference, atol=1e-2, rtol=1e-2)
    touched = (reference != hidden.float()).any(-1)
    assert touched.sum() == 12  # f2+l2: 4 positions in each row, the left-padded one included
    assert torch.equal(got[~touched], hidden[~touched])  # other positions bit for bit untouched


def test_half_precision_base_keeps_float32_interventions_and_matches_float32_model():
    reference = get_peft_model(tiny_llama(), heft_config())
    randomize_interventions(reference)
    reference.base_model.set_stage("frozen")
    half = get_peft_model(tiny_llama(dtype=torch.bfloat16), heft_config())
    assert {p.dtype for p in half.base_model.heft_interventions.parameters()} == {torch.float32}
    half.load_state_dict(reference.state_dict())  # the same LoRA and intervention weights
    half.base_model.set_stage("frozen")
    ids, mask, _ = left_padded_batch()
    batch = dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        expected, got = reference(**batch).logits, half(**batch).logits
        with reference.disable_adapter(), half.disable_adapter():
            base, half_base = reference(**batch).logits, half(**batch).logits
    assert got.dtype == torch.bfloat16
    assert (expected - base).abs().max() > 0.1  # the adapter changes the outputs
    # HEFT on the bf16 base is as close to the float32 model as the bf16 base is to the float32 base
    assert (got.float() - expected).abs().max() <= 3 * (half_base.float() - base).abs().max() + 1e-2


def test_staged_trainer_wraps_a_quantized_base_given_a_heft_config(tmp_path, saved_base):
    base = load_quantized(saved_base, "nf4")
    trainer = StagedSFTTrainer(
        base,
        args=cpu_sft_args(str(tmp_path / "out"), lora_max_steps=2, reft_max_steps=2),
        train_dataset=make_dataset("prompt_completion", 16),
        processing_class=tiny_tokenizer(),
        peft_config=sft_heft_config(),  # TRL prepares the k-bit model and wraps it
    )
    output = trainer.train()
    assert output.metrics["lora_train_steps"] == 2 and output.metrics["reft_train_steps"] == 2
    interventions = list(trainer.model.base_model.heft_interventions.parameters())
    assert interventions and {p.dtype for p in interventions} == {torch.float32}


# ------------------------------------------------------------------- bitsandbytes' one-way CPU inference repacking
def repacked_layers(model) -> int:
    return sum(
        bool(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False))
        for m in model.modules()
    )


def repacking_cpu() -> bool:
    """Whether bitsandbytes repacks 4-bit weights for CPU inference here (AVX512-BF16 CPUs)."""
    from bitsandbytes.nn import Linear4bit

    layer = Linear4bit(64, 64, compute_dtype=torch.float32)
    return bool(getattr(layer, "support_avx512bf16_for_cpu", False))


def lora_grad_norm(model, batch) -> float:
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    return float(torch.stack([g.float().norm() for g in grads]).norm()) if grads else 0.0


def repack(model) -> None:
    """What any evaluation or generate() does first: an eval-mode forward without gradients."""
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 7, 8, 9]]))


def test_bitsandbytes_cpu_repacking_still_cuts_lora_gradients(saved_base):
    """The upstream behaviour HEFT works around: fails (and the workaround can go) once bitsandbytes fixes it."""
    from peft import LoraConfig

    base = load_quantized(saved_base, "nf4")
    if not repacking_cpu():
        pytest.skip("bitsandbytes does not repack 4-bit weights for inference on this CPU (no AVX512-BF16)")
    assert repacked_layers(base) == 0
    repack(base)
    assert repacked_layers(base) > 0
    model = get_peft_model(
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    batch = tiny_tokenizer()(["w1 w2 w3 ? Answer: yes"], return_tensors="pt")
    assert lora_grad_norm(model, batch) == 0.0  # silently no gradient through the repacked layers


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_heft_keeps_4bit_layers_trainable_through_no_grad_evaluations(tmp_path, saved_base, kind):
    base = prepare_model_for_kbit_training(load_quantized(saved_base, kind), use_gradient_checkpointing=False)
    model = get_peft_model(base, sft_heft_config(init_lora_weights=False))
    repack(model)  # HEFT turned bitsandbytes' repacking off when it was built
    assert repacked_layers(model) == 0
    batch = tiny_tokenizer()(["w1 w2 w3 ? Answer: yes"], return_tensors="pt")
    assert lora_grad_norm(model, batch) > 0

    trainer = StagedSFTTrainer(
        model,
        args=cpu_sft_args(str(tmp_path / "out"), lora_max_steps=3, reft_max_steps=3, per_device_eval_batch_size=8),
        train_dataset=make_dataset("prompt_completion", 24),
        eval_dataset=make_dataset("prompt_completion", 8, seed=1),
        processing_class=tiny_tokenizer(),
    )
    trainer.evaluate()  # a no-grad evaluation in eval mode
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    assert repacked_layers(trainer.model) == 0
    lora_grads = [e["grad_norm"] for e in trainer.stage_log_history if e.get("stage") == "lora" and "grad_norm" in e]
    assert lora_grads and min(lora_grads) > 0
    moved = [n for n, p in trainer.model.named_parameters() if "lora_" in n and not torch.equal(p, lora_before[n])]
    assert len(moved) == len(lora_before)  # every LoRA tensor trained (none sits behind a gradient-less layer)

    # reloaded for inference onto a freshly quantized base: the same kernel, the same logits
    model = trainer.model.eval()
    for param in (p for n, p in model.named_parameters() if "lora_" in n):
        param.data = param.data.float()
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    loaded = PeftModel.from_pretrained(load_quantized(saved_base, kind), out).eval()
    batch = tiny_tokenizer()(["w1 w2 w3 ? Answer:", "w20 w5 ?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got, expected = loaded(**batch).logits, model(**batch).logits
    assert repacked_layers(loaded) == 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_trainable_heft_adapter_on_an_already_repacked_base_is_refused(tmp_path, saved_base):
    if not repacking_cpu():
        pytest.skip("bitsandbytes does not repack 4-bit weights for inference on this CPU (no AVX512-BF16)")
    base = load_quantized(saved_base, "nf4")
    repack(base)
    with pytest.raises(
        ValueError, match=r"4-bit layers of the base model \(e\.g\. model\.layers\.0\..*\) were repacked"
    ):
        get_peft_model(base, sft_heft_config())
    # nor loaded for inference: PEFT would read state_dict(), which converts the weights back lossily
    adapter = tmp_path / "adapter"
    get_peft_model(load_quantized(saved_base, "nf4"), sft_heft_config()).save_pretrained(adapter)
    with pytest.raises(ValueError, match="were repacked"):
        PeftModel.from_pretrained(base, adapter)


def test_bitsandbytes_converts_repacked_weights_back_lossily(saved_base):
    """Why a repacked base is refused rather than converted back (fails once bitsandbytes converts back exactly)."""
    if not repacking_cpu():
        pytest.skip("bitsandbytes does not repack 4-bit weights for inference on this CPU (no AVX512-BF16)")
    base = load_quantized(saved_base, "nf4")
    x = torch.tensor([[1, 7, 8, 9, 10]])
    base.train()
    with torch.no_grad():
        exact = base(x).logits
    repack(base)
    base.state_dict()  # bitsandbytes' way back to the canonical layout
    assert repacked_layers(base) == 0
    base.train()
    with torch.no_grad():
        again = base(x).logits
    assert (again - exact).abs().max() > 1e-3
