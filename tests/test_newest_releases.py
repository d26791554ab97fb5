"""The newest releases are safe: what transformers 5.25 changed, checked on the pinned and on the newest releases.

1. Caches: hybrid models (linear-attention or convolution layers next to attention layers) generate the same with and
   without the KV cache, their cached length is read from an attention layer, a cache without one (Mamba) is read
   where transformers counts its tokens (5.25) and refused where it does not (5.24), and ``generate()``'s decoding
   steps never convert a tensor to a Python scalar (a host sync per step on GPU; transformers 5.25 answers
   ``Cache.get_seq_length(0)`` of a hybrid model with a tensor, and a static cache's length is one).
2. Hub kernels, on by default in 5.25's ``from_pretrained``: loading offline neither hangs nor changes HEFT's outputs.
3. transformers' own adapter API (``model.load_adapter``, ``AutoModelForCausalLM.from_pretrained(adapter folder)``)
   refuses a HEFT adapter before reading any weight, with PEFT's message, and leaves the model untouched.
4. A HEFT weight missing from ``adapter_model.safetensors`` is reported by name on every loading path.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest
import torch
import transformers
from conftest import VOCAB, heft_config, left_padded_batch, randomize_interventions, tiny_llama
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM, DynamicCache

import peft_heft

_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _model_class(name: str):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def tiny_hybrid(arch: str, seed: int = 0):
    """A tiny decoder built from its config: linear-attention / convolution layers next to attention layers
    (Qwen3-Next, LFM2), or state-space layers only (Mamba)."""
    torch.manual_seed(seed)
    if arch == "qwen3_next":  # gated delta-net layers, then full attention (3:1, as the real model)
        config = _model_class("Qwen3NextConfig")(
            **_SMALL,
            head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
        )
        model = _model_class("Qwen3NextForCausalLM")(config)
    elif arch == "lfm2":  # short convolutions, one attention layer
        config = _model_class("Lfm2Config")(**_SMALL, layer_types=["conv", "full_attention", "conv", "conv"])
        model = _model_class("Lfm2ForCausalLM")(config)
    else:  # mamba: state-space layers only, no attention layer at all
        config = _model_class("MambaConfig")(
            vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=3, pad_token_id=0, bos_token_id=1
        )
        model = _model_class("MambaForCausalLM")(config)
    return model.eval()


_TARGETS = {"qwen3_next": ["q_proj", "v_proj"], "lfm2": ["q_proj", "v_proj"], "mamba": ["in_proj"]}


def hybrid_heft(arch: str, **overrides):
    """HEFT on a tiny hybrid, interventions on its first layer (linear / conv / SSM) and last layer."""
    config = heft_config(target_modules=_TARGETS[arch], intervention_layers=[0, -1], **overrides)
    model = get_peft_model(tiny_hybrid(arch), config)
    model.base_model.set_stage("reft")
    randomize_interventions(model)
    return model.eval()


def _greedy(model, ids, mask, steps, **kwargs):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,  # every row gets all its steps (EOS is masked)
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    scores = torch.stack(out.scores)
    return out.sequences, scores.masked_fill(scores.isinf(), 0.0)  # EOS's -inf from min_new_tokens


# ---------------------------------------------------------------------------------------------------------- 1. caches
@pytest.mark.parametrize("arch", ["qwen3_next", "lfm2", "mamba"])
def test_hybrid_generation_with_cache_equals_without_cache(arch):
    model = hybrid_heft(arch)
    ids, mask, _ = left_padded_batch()
    cached, cached_scores = _greedy(model, ids, mask, 6, use_cache=True)
    recomputed, recomputed_scores = _greedy(model, ids, mask, 6, use_cache=False)
    assert torch.equal(cached, recomputed)
    torch.testing.assert_close(cached_scores, recomputed_scores, atol=1e-4, rtol=1e-4)
    with model.disable_adapter():
        _, base_scores = _greedy(model, ids, mask, 6, use_cache=True)
    assert (cached_scores - base_scores).abs().max() > 1e-2  # the adapter does change what is generated


def _prefix_then_rest(model, ids, prefix, **step_kwargs):
    """Logits of ``ids[:, prefix:]`` computed after a cached forward of ``ids[:, :prefix]``."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :prefix], cache=cache, use_cache=True)
        return model(input_ids=ids[:, prefix:], cache=cache, use_cache=True, **step_kwargs).logits


@pytest.mark.parametrize("arch", ["qwen3_next", "lfm2"])
def test_hybrid_cached_forward_is_positioned_from_an_attention_layer(arch):
    """Outside generate(): the forward after a cached prefix intervenes where the whole sequence at once does (the
    first two positions, all in the prefix), with the attention mask and without one (then only the cache says how
    many tokens came before: read wrong, the new tokens would be taken for the first two)."""
    model = hybrid_heft(arch, intervention_positions="f2")
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, 7:]
    torch.testing.assert_close(_prefix_then_rest(model, ids, 7), whole, atol=1e-5, rtol=1e-5)
    mask = torch.ones(1, 9, dtype=torch.long)
    torch.testing.assert_close(_prefix_then_rest(model, ids, 7, attention_mask=mask), whole, atol=1e-5, rtol=1e-5)


def _counts_linear_layers(model) -> bool:
    """Whether this transformers counts the tokens of a cache without attention layers (>= 5.25; 5.24 refuses)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), cache=cache, use_cache=True)
    try:
        return int(cache.get_seq_length()) == 3
    except ValueError:
        return False


def test_forward_continuing_a_cache_without_attention_layer_uses_its_count_or_is_refused():
    """Mamba's cache has no attention layer. Where transformers counts its tokens (5.25), a forward continuing it
    intervenes where the whole sequence does; where it does not (5.24), HEFT refuses with what to do instead of
    failing inside transformers or taking the new token for the first one. generate() works on both (above)."""
    model = hybrid_heft("mamba", intervention_positions="f2")
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, 8:]
    if _counts_linear_layers(model):
        torch.testing.assert_close(_prefix_then_rest(model, ids, 8), whole, atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(ValueError, match="cannot tell how many tokens the DynamicCache.*no attention layer"):
            _prefix_then_rest(model, ids, 8)


_HEFT_DIR = os.path.dirname(peft_heft.__file__) + os.sep
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TO_PYTHON = {"__int__", "__index__", "__bool__", "__float__", "item", "tolist"}


class _HeftScalarReads(TorchFunctionMode):
    """Records every conversion of a tensor to a Python scalar whose caller (the first frame outside torch) is
    peft_heft's code: on GPU each one waits for the device (a host sync)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _TO_PYTHON:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(_HEFT_DIR):
                where = f"{os.path.relpath(frame.f_code.co_filename, _HEFT_DIR)}:{frame.f_lineno}"
                self.reads[f"{func.__name__} in {frame.f_code.co_name} ({where})"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["dynamic", "static", "qwen3_next", "mamba"])
def test_decoding_steps_read_no_tensor_into_python(kind):
    """HEFT's work per decoding step is nothing, not even a look at the cache: the Python-scalar reads of a
    generate() call do not grow with the number of new tokens, whatever the cache's length is made of (shapes for
    dynamic caches; a tensor for static ones, for a hybrid model's ``get_seq_length()`` and for a cache without
    attention layers in transformers 5.25)."""
    if kind in ("qwen3_next", "mamba"):
        model, extra = hybrid_heft(kind), {}
    else:
        model = get_peft_model(tiny_llama(), heft_config())
        model.base_model.set_stage("reft")
        randomize_interventions(model)
        model.eval()
        extra = {"cache_implementation": "static"} if kind == "static" else {}
    ids, mask, _ = left_padded_batch()
    reads = []
    for steps in (2, 7):
        with _HeftScalarReads() as recorder:
            _greedy(model, ids, mask, steps, **extra)
        reads.append(recorder.reads)
    assert reads[0] == reads[1], f"per-step reads: {dict(reads[1] - reads[0])}"


# ------------------------------------------------------------------------------------------------------- 2. hub kernels
def _within(seconds: float, function):
    """``function()``'s result, failing the test if it has not returned after ``seconds`` (a hang, e.g. a download
    that waits for a network that is not there): it runs in a daemon thread that is abandoned then."""
    result: dict = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"did not return within {seconds} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _base_and_adapter(tmp_path):
    from sft_fixtures import tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # the adapter records this folder as its base
    model = get_peft_model(base, heft_config())
    model.base_model.set_stage("reft")
    randomize_interventions(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def _heft_logits(base, adapter_folder):
    """Logits of the HEFT adapter on ``base``, before and after a train()/eval() round trip (transformers 5.25
    re-applies kernels when the mode changes)."""
    model = PeftModel.from_pretrained(base, adapter_folder).eval()
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).logits
        model.train()
        model.eval()
        second = model(input_ids=ids, attention_mask=mask).logits
    return first, second


def test_hub_kernels_at_their_default_neither_hang_nor_change_heft_outputs(tmp_path, monkeypatch):
    """transformers 5.25 loads with ``use_kernels`` on unless ``USE_HUB_KERNELS=NO`` (5.24: off). On CPU the default
    mapping has no kernel to fetch: loading returns at once and HEFT's logits equal those of a load without kernels,
    also after train()/eval(). HEFT's own loader passes nothing about kernels: it gets transformers' default, and
    ``use_kernels=False`` reaches from_pretrained."""
    from peft_heft.assets import load_model_and_tokenizer

    base_folder, adapter_folder = _base_and_adapter(tmp_path)
    default = _within(60, lambda: AutoModelForCausalLM.from_pretrained(base_folder))
    without = AutoModelForCausalLM.from_pretrained(base_folder, use_kernels=False)
    monkeypatch.setenv("USE_HUB_KERNELS", "NO")
    disabled = AutoModelForCausalLM.from_pretrained(base_folder)
    monkeypatch.delenv("USE_HUB_KERNELS")
    assert not without.use_kernels and not disabled.use_kernels
    want, _ = _heft_logits(without, adapter_folder)
    for base in (default, disabled):
        for logits in _heft_logits(base, adapter_folder):
            torch.testing.assert_close(logits, want, atol=0, rtol=0)
    heft_default, _ = _within(60, lambda: load_model_and_tokenizer(str(base_folder)))
    assert heft_default.use_kernels == default.use_kernels  # transformers' default, not decided by HEFT
    heft_without, _ = load_model_and_tokenizer(str(base_folder), use_kernels=False)
    assert not heft_without.use_kernels


_OFFLINE_KERNELS_SCRIPT = """
import json, sys, time
started = time.monotonic()
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
import peft_heft
imported = time.monotonic()
base_folder, adapter_folder = sys.argv[1], sys.argv[2]
ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
report = {"import_s": imported - started}
for label, kwargs in (("default", {}), ("off", {"use_kernels": False})):
    begin = time.monotonic()
    base = AutoModelForCausalLM.from_pretrained(base_folder, **kwargs)
    report[label + "_load_s"] = time.monotonic() - begin
    report[label + "_use_kernels"] = bool(base.use_kernels)
    model = PeftModel.from_pretrained(base, adapter_folder).eval()
    with torch.no_grad():
        report[label] = model(input_ids=ids).logits.tolist()
print(json.dumps(report))
"""


@pytest.mark.slow
def test_offline_process_loads_with_default_hub_kernels_in_bounded_time(tmp_path):
    """A fresh process with ``HF_HUB_OFFLINE=1`` (what a machine without the Hub runs): from_pretrained with kernels
    at their default returns, and HEFT's logits equal those without kernels."""
    base_folder, adapter_folder = _base_and_adapter(tmp_path)
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(_OFFLINE_KERNELS_SCRIPT))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("USE_HUB_KERNELS", None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(script), str(base_folder), str(adapter_folder)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["default_load_s"] < 30 and time.monotonic() - started < 240
    assert report["default"] == report["off"] and not report["off_use_kernels"]


# -------------------------------------------------------------------------------------- 3. transformers' adapter API
_PEFT_REFUSAL = r"`inject_adapter_in_model` does not support PeftType.HEFT because it uses shared state"


def _logits(model):
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_transformers_adapter_api_refuses_heft_before_touching_the_model(tmp_path):
    """transformers' ``load_adapter`` (and ``from_pretrained`` of an adapter folder, which calls it) injects adapter
    layers with PEFT's ``inject_adapter_in_model``, which refuses tuners with state of their own (HEFT's
    interventions) before reading any weight: the model is left as it was. The way to load: ``PeftModel``."""
    base_folder, adapter_folder = _base_and_adapter(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    before = _logits(model)
    with pytest.raises(ValueError, match=_PEFT_REFUSAL):
        model.load_adapter(str(adapter_folder))
    with pytest.raises(ValueError, match=_PEFT_REFUSAL):
        model.load_adapter(str(adapter_folder), adapter_name="heft")
    assert not any("lora_" in name for name, _ in model.named_modules())
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match=_PEFT_REFUSAL):
        AutoModelForCausalLM.from_pretrained(adapter_folder)
    # add_adapter: transformers asks for peft >= 0.22 first (MIN_PEFT_VERSION, unreleased), then PEFT refuses HEFT
    from transformers.integrations.peft import MIN_PEFT_VERSION
    from transformers.utils.peft_utils import check_peft_version

    try:
        check_peft_version(min_version=MIN_PEFT_VERSION)
        refusal = _PEFT_REFUSAL
    except ValueError:
        refusal = re.escape(
            f"The version of PEFT you are using is not compatible, please use a version >= {MIN_PEFT_VERSION}"
        )
    with pytest.raises(ValueError, match=refusal):
        model.add_adapter(heft_config())
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), adapter_folder)
    assert (_logits(loaded) - before).abs().max() > 1e-3  # the remedy loads the adapter


# ---------------------------------------------------------------------------------- 4. missing weights on every path
_MISSING = "base_model.heft_interventions.layer3_last.learned_source.weight"


def _load_default(base, folder):
    return PeftModel.from_pretrained(base, folder)


def _load_second(base, folder, **kwargs):
    model = PeftModel.from_pretrained(base, folder.parent / "complete", adapter_name="first")
    model.load_adapter(folder, adapter_name="second", **kwargs)
    return model


def _set_state_dict(base, folder):
    model = get_peft_model(base, heft_config())
    return set_peft_model_state_dict(model, load_peft_weights(str(folder)))


_LOADERS = {
    "PeftModel.from_pretrained": _load_default,
    "PeftModel.from_pretrained(low_cpu_mem_usage)": lambda b, f: PeftModel.from_pretrained(
        b, f, low_cpu_mem_usage=True
    ),
    "PeftModel.from_pretrained(is_trainable)": lambda b, f: PeftModel.from_pretrained(b, f, is_trainable=True),
    "AutoPeftModelForCausalLM.from_pretrained": lambda b, f: AutoPeftModelForCausalLM.from_pretrained(f),
    "PeftModel.load_adapter": _load_second,
    "PeftModel.load_adapter(low_cpu_mem_usage)": lambda b, f: _load_second(b, f, low_cpu_mem_usage=True),
    "PeftModel.load_adapter(is_trainable), as Trainer resumes": lambda b, f: _load_second(b, f, is_trainable=True),
    "set_peft_model_state_dict(load_peft_weights)": _set_state_dict,
}


@pytest.mark.parametrize("path", list(_LOADERS))
def test_missing_intervention_weight_is_reported_on_every_peft_loading_path(tmp_path, path):
    base_folder, complete = _base_and_adapter(tmp_path)
    complete = complete.rename(tmp_path / "complete")
    folder = tmp_path / "incomplete"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), complete).save_pretrained(folder)
    weights = load_file(folder / "adapter_model.safetensors")
    weights.pop(_MISSING)
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    base = AutoModelForCausalLM.from_pretrained(base_folder)
    with pytest.raises(ValueError, match=rf"missing 1 weight\(s\) from the file: {re.escape(_MISSING)}\."):
        _LOADERS[path](base, folder)


def test_missing_intervention_weight_on_the_transformers_path_is_refused_before_loading(tmp_path):
    """transformers' adapter API never gets to the weights of a HEFT adapter (3.), complete or not."""
    base_folder, folder = _base_and_adapter(tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    weights.pop(_MISSING)
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=_PEFT_REFUSAL):
        AutoModelForCausalLM.from_pretrained(base_folder).load_adapter(str(folder))
    with pytest.raises(ValueError, match=_PEFT_REFUSAL):
        AutoModelForCausalLM.from_pretrained(folder)


def test_every_missing_weight_is_named_as_the_file_names_it(tmp_path):
    base_folder, folder = _base_and_adapter(tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    gone = sorted(k for k in weights if "layer3_last" in k or "layers.1.self_attn.q_proj.lora_A" in k)
    for key in gone:
        weights.pop(key)
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 4 weight\(s\) from the file: ") as info:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), folder)
    assert len(gone) == 4 and all(key in str(info.value) for key in gone)
