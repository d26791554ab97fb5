"""Device maps and offload: each intervened layer uses positions and interventions on its own (execution) device.

CPU and disk offload (accelerate) run here: the offloaded layers' weights are on ``meta`` between forwards, and the
interventions must still be real tensors on the layer's execution device. Layers split over two GPUs need a machine
with two of them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import heft_config, left_padded_batch, randomize_interventions, tiny_llama
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from peft_heft.tuner.layer import Located

OFFLOADED = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


def reference(**overrides):
    """The adapter on the plain in-memory model, in the 'frozen' stage, and its outputs on a left-padded batch."""
    model = get_peft_model(tiny_llama(), heft_config(**overrides))
    randomize_interventions(model)
    model.base_model.set_stage("frozen")
    ids, mask, _ = left_padded_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return model, dict(input_ids=ids, attention_mask=mask), logits


def load_offloaded(path, how, folder):
    if how == "device_map":
        return AutoModelForCausalLM.from_pretrained(path, device_map=OFFLOADED, offload_folder=folder)
    # max_memory leaves room for the embeddings and layer 0 only: accelerate puts the rest on disk
    return AutoModelForCausalLM.from_pretrained(
        path, device_map="auto", max_memory={"cpu": 110_000}, offload_folder=folder
    )


@pytest.mark.parametrize("how", ["device_map", "max_memory"])
def test_interventions_on_disk_offloaded_layers_are_real_and_match_the_in_memory_model(tmp_path, saved_llama, how):
    # LoRA only on layer 0 (PEFT creates LoRA weights of an offloaded layer on meta); interventions on layers 1 and 3
    ref, batch, expected = reference(layers_to_transform=[0])
    base = load_offloaded(saved_llama, how, tmp_path / "offload")
    assert base.hf_device_map["model.layers.0"] == "cpu" and base.hf_device_map["model.layers.1"] == "disk"
    assert base.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    model = get_peft_model(base, heft_config(layers_to_transform=[0]))
    devices = {p.device for p in model.base_model.heft_interventions.parameters()}
    assert devices == {torch.device("cpu")}  # the offloaded layers' execution device, not meta
    set_peft_model_state_dict(model, get_peft_model_state_dict(ref))
    model.base_model.set_stage("frozen")
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_saved_adapter_onto_disk_offloaded_base_with_a_device_map(tmp_path, saved_llama):
    ref, batch, expected = reference()
    ref.save_pretrained(tmp_path / "adapter")
    base = load_offloaded(saved_llama, "device_map", tmp_path / "offload")
    # PEFT re-dispatches an offloaded model when it loads an adapter; the interventions are small: keep them on the
    # execution device (PEFT's default device_map="auto" cannot re-dispatch disk-offloaded weights on a CPU machine)
    device_map = {"base_model.model." + name: device for name, device in OFFLOADED.items()}
    device_map["base_model.heft_interventions"] = "cpu"
    model = PeftModel.from_pretrained(
        base, tmp_path / "adapter", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert {p.device.type for p in model.base_model.heft_interventions.parameters()} == {"cpu"}
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_accelerate_offload_of_the_whole_heft_model(tmp_path, how):
    import accelerate

    ref, batch, expected = reference()
    model = copy.deepcopy(ref)
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device="cpu")
    else:
        accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    assert model.base_model.model.model.layers[1].self_attn.q_proj.base_layer.weight.device.type == "meta"
    with torch.no_grad():
        got = model(**batch).logits
        tokens = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        expected_tokens = ref.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(tokens, expected_tokens)


def test_positions_are_copied_to_another_device_once_and_not_on_their_own():
    index = torch.zeros(2, 3, 4, dtype=torch.long)
    located = Located(index=index, keep=torch.ones(2, 3, 1, dtype=torch.bool), split=[3])
    assert located.on(torch.device("cpu")) is located  # the common single-device path: no copy, no cache
    moved = located.on(torch.device("meta"))
    assert moved.index.device.type == "meta" and moved.keep.device.type == "meta" and moved.split == [3]
    assert located.on(torch.device("meta")) is moved and not located.moved.get(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (layers split over devices)")
def test_layers_split_over_two_gpus_match_the_single_device_model(tmp_path, saved_llama):
    ref, batch, expected = reference()
    split = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 0,
        "model.layers.2": 1,
        "model.layers.3": 1,
        "model.norm": 1,
        "model.rotary_emb": 0,
        "lm_head": 1,
    }
    base = AutoModelForCausalLM.from_pretrained(saved_llama, device_map=split)
    model = get_peft_model(base, heft_config())
    interventions = model.base_model.heft_interventions["default"]
    assert {p.device for p in interventions["layer1_first"].parameters()} == {torch.device("cuda:0")}
    assert {p.device for p in interventions["layer3_last"].parameters()} == {torch.device("cuda:1")}
    set_peft_model_state_dict(model, get_peft_model_state_dict(ref))
    model.base_model.set_stage("frozen")
    cuda_batch = {k: v.to("cuda:0") for k, v in batch.items()}
    with torch.no_grad():
        got = model(**cuda_batch).logits.cpu()
        cached = model.generate(**cuda_batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        uncached = model.generate(**cuda_batch, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(cached, uncached)


def test_execution_device_of_an_offloaded_layer_comes_from_accelerate_hooks():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from peft_heft.tuner.placement import execution_device

    model = tiny_llama()
    assert execution_device(model, model.model.layers[2], "lora_") == torch.device("cpu")  # its weights' device
    model = tiny_llama().to("meta")
    layer = model.model.layers[2]
    assert execution_device(model, layer, "lora_") is None  # nothing known: torch's default device
    add_hook_to_module(model.model, AlignDevicesHook(execution_device="cpu"))  # an ancestor's hook
    assert execution_device(model, layer, "lora_") == torch.device("cpu")
    add_hook_to_module(layer.mlp.up_proj, AlignDevicesHook(execution_device="meta"))  # "meta" says nothing
    assert execution_device(model, layer, "lora_") == torch.device("cpu")
