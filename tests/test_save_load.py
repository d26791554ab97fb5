"""Serialization: safetensors round trips, strict loading, other bases refused, hub push at the API boundary."""

import json
import os

import pytest
import torch
from conftest import clone, heft_config, left_padded_batch, randomize_interventions, tiny_llama
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_heft import HeftConfig


def trained_model(base=None, **overrides):
    base = tiny_llama() if base is None else base
    model = get_peft_model(base, heft_config(**overrides))
    model.base_model.set_stage("reft")
    randomize_interventions(model)
    return model.eval()


def logits(model, ids, mask, stage=None):
    """Logits; ``stage`` first puts the model in that stage (kernels differ by ~1e-8 with requires_grad flags)."""
    if stage is not None:
        model.base_model.set_stage(stage)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_save_writes_config_and_safetensors_only(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HEFT"
    assert config["base_model_hidden_size"] == 32 and config["base_model_num_layers"] == 4
    from peft import LoraConfig

    heft_fields = set(HeftConfig.__dataclass_fields__) - set(LoraConfig.__dataclass_fields__)
    assert len(heft_fields) == 12  # the intervention fields, the base shape, and saved_settings (the save's record)
    for field in heft_fields | {"r", "lora_alpha", "target_modules", "use_dora"}:
        assert field in config, field
    weights = load_file(tmp_path / "adapter_model.safetensors")
    reft_keys = sorted(k for k in weights if "heft_interventions" in k)
    assert reft_keys == sorted(
        f"base_model.heft_interventions.layer{layer}_{side}.{param}"
        for layer in (1, 3)
        for side in ("first", "last")
        for param in ("learned_source.weight", "learned_source.bias", "rotate_layer.parametrizations.weight.original")
    )
    assert any(".lora_A.weight" in k for k in weights)
    assert not any(".default." in k for k in weights)  # adapter name is not part of the file


def test_reload_gives_identical_logits_and_applies_both_parts(tmp_path):
    base = tiny_llama()
    model = trained_model(clone(base))
    ids, mask, _ = left_padded_batch()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clone(base), tmp_path).eval()
    assert loaded.base_model.stage == "frozen"
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(logits(loaded, ids, mask), logits(model, ids, mask, stage="frozen"))
    trainable = PeftModel.from_pretrained(clone(base), tmp_path, is_trainable=True).eval()
    assert trainable.base_model.stage == "joint"
    assert torch.equal(logits(trainable, ids, mask), logits(model, ids, mask, stage="joint"))


def test_reload_with_low_cpu_mem_usage(tmp_path):
    base = tiny_llama()
    model = trained_model(clone(base))
    ids, mask, _ = left_padded_batch()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clone(base), tmp_path, low_cpu_mem_usage=True).eval()
    assert torch.equal(logits(loaded, ids, mask), logits(model, ids, mask, stage="frozen"))


def test_load_adapter_as_second_adapter_and_switch(tmp_path):
    base = tiny_llama()
    first = trained_model(clone(base))
    first.save_pretrained(tmp_path / "a")
    second = trained_model(clone(base), intervention_positions="l3", intervention_layers=[0])
    with torch.no_grad():
        for p in second.base_model.heft_interventions.parameters():
            p.mul_(-1.5)
    second.save_pretrained(tmp_path / "b")
    ids, mask, _ = left_padded_batch()
    model = PeftModel.from_pretrained(clone(base), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.eval()
    assert torch.equal(logits(model, ids, mask), logits(first, ids, mask, stage="frozen"))
    model.set_adapter("b")
    assert torch.equal(logits(model, ids, mask), logits(second, ids, mask, stage="frozen"))


def test_auto_peft_model_loads_base_from_config(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    loaded_base = type(base).from_pretrained(tmp_path / "base")
    model = get_peft_model(loaded_base, heft_config())
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    model.base_model.set_stage("reft")
    randomize_interventions(model)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids, mask, _ = left_padded_batch()
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert torch.equal(logits(auto, ids, mask), logits(model, ids, mask, stage="frozen"))


def _rewrite(path, change):
    weights = load_file(path)
    change(weights)
    save_file(weights, path)


def test_a_path_to_adapter_config_json_names_the_folder_to_pass(tmp_path):
    trained_model().save_pretrained(tmp_path)
    file = str(tmp_path / "adapter_config.json")
    with pytest.raises(ValueError) as error:
        HeftConfig.from_pretrained(file)
    message = str(error.value)
    assert f"{file!r} is a file" in message and f"PeftModel.from_pretrained(base_model, {str(tmp_path)!r})" in message
    # PeftModel.from_pretrained reads the file's peft_type in PEFT's own code, before any HEFT code runs, and says the
    # same for every PEFT method. A plugin cannot change that without patching PEFT (docs/saving-loading.md says to
    # pass the folder): this pins upstream's message, so that we notice when PEFT improves it.
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json' at '.*adapter_config.json'"):
        PeftModel.from_pretrained(tiny_llama(), file)


def test_missing_intervention_weight_is_an_error(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    key = "base_model.heft_interventions.layer3_last.learned_source.weight"
    _rewrite(tmp_path / "adapter_model.safetensors", lambda w: w.pop(key))
    with pytest.raises(ValueError, match="missing 1 weight"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_lora_weight_is_an_error(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _rewrite(tmp_path / "adapter_model.safetensors", lambda w: w.pop(key))
    with pytest.raises(ValueError, match="missing 1 weight"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_unexpected_intervention_weight_is_an_error(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    extra = "base_model.heft_interventions.layer2_first.learned_source.weight"
    _rewrite(tmp_path / "adapter_model.safetensors", lambda w: w.__setitem__(extra, torch.zeros(2, 32)))
    with pytest.raises(ValueError, match="1 unexpected LoRA or intervention weight"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_adapter_for_another_base_is_refused(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden size 32 and 4 decoder layers.*hidden size 64 and 4 layers"):
        PeftModel.from_pretrained(tiny_llama(hidden=64), tmp_path)
    with pytest.raises(ValueError, match="hidden size 32 and 2 layers"):
        PeftModel.from_pretrained(tiny_llama(layers=2), tmp_path)


def test_corrupt_weights_file_is_an_error(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a readable safetensors file .*truncated"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_weights_file_names_the_folder(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has adapter_config.json but no adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_pickled_weights_are_refused_without_unpickling(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="peft-heft loads safetensors only"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_saved_file_is_not_changed_by_loading(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    config_before = (tmp_path / "adapter_config.json").read_text()
    PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert (tmp_path / "adapter_config.json").read_text() == config_before


class _FakeHub:
    """Stands in for huggingface_hub.HfApi at the network boundary: commits land in a local folder."""

    def __init__(self, root):
        self.root = root
        self.commits = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, **kwargs):
        pass

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        target = self.root / repo_id
        target.mkdir(parents=True, exist_ok=True)
        for op in operations:
            dest = target / op.path_in_repo
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = op.path_or_fileobj
            dest.write_bytes(open(src, "rb").read() if isinstance(src, str) else src.read())
        self.commits.append((repo_id, sorted(op.path_in_repo for op in operations), commit_message))
        return "commit"


def test_push_to_hub_uploads_a_folder_that_reloads(tmp_path, monkeypatch):
    import huggingface_hub
    import transformers.utils.hub as hub

    fake = _FakeHub(tmp_path / "remote")
    monkeypatch.setattr(hub, "hf_api", lambda: fake)

    load_card = huggingface_hub.ModelCard.load

    def no_card(repo_id_or_path, *args, **kwargs):  # no card on the (fake) Hub yet; local files load as usual
        if os.path.exists(repo_id_or_path):
            return load_card(repo_id_or_path, *args, **kwargs)
        raise huggingface_hub.errors.EntryNotFoundError("no README yet")

    monkeypatch.setattr(huggingface_hub.ModelCard, "load", no_card)
    base = tiny_llama()
    model = trained_model(clone(base))
    model.push_to_hub("user/heft-adapter")
    assert fake.commits and fake.commits[0][0] == "user/heft-adapter"
    uploaded = fake.commits[0][1]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(uploaded)
    folder = tmp_path / "remote" / "user" / "heft-adapter"
    assert PeftConfig.from_pretrained(folder).peft_type == "HEFT"
    # model.push_to_hub uploads transformers' card, as for any PEFT method: peft-heft patches nothing upstream (the
    # trainers' push_to_hub and update_model_card write the HEFT section)
    assert "peft-heft: begin" not in (folder / "README.md").read_text()
    ids, mask, _ = left_padded_batch()
    reloaded = PeftModel.from_pretrained(clone(base), folder).eval()
    assert torch.equal(logits(reloaded, ids, mask), logits(model, ids, mask, stage="frozen"))


@pytest.mark.parametrize(
    "lora_options",
    [
        {"use_dora": True},
        {"use_rslora": True, "lora_dropout": 0.1},
        {"modules_to_save": ["lm_head"]},
        {"layers_to_transform": [0, 2], "target_modules": ["q_proj", "v_proj", "o_proj"]},
    ],
)
def test_lora_options_train_save_and_reload(tmp_path, lora_options):
    base = tiny_llama()
    model = get_peft_model(clone(base), heft_config(**lora_options))
    model.base_model.set_stage("lora")
    ids, mask, _ = left_padded_batch()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        opt.step()
        opt.zero_grad()
    model.base_model.set_stage("reft")
    randomize_interventions(model)
    model.eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    want = logits(model, ids, mask, stage="frozen")
    assert (want - base_logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(clone(base), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids, mask), want, atol=1e-6, rtol=1e-5)
