"""The FAQ quotes real error messages: each one is raised here and compared with the page's text.

Every error quoted in docs/faq.md (a bold code span starting with ``SomeError:``) needs a trigger below, so a
reworded message or a new FAQ entry without a trigger fails this test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import heft_config, tiny_llama
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from sft_fixtures import cpu_sft_args, make_dataset, tiny_sft_model, tiny_tokenizer

import peft_heft
from peft_heft import HeftSFTConfig, LoreftIntervention, StagedSFTTrainer

FAQ = Path(__file__).resolve().parents[1] / "docs" / "faq.md"
# **`Error: text`** or **``Error: text with `code` inside``**
QUOTE = re.compile(r"^\*\*(`{1,2})([A-Za-z]+Error: .+?)\1\*\*", re.MULTILINE)


def faq_quotes() -> dict[str, str]:
    """The quoted messages, keyed by their first 60 characters."""
    return {text[:60]: text for _, text in QUOTE.findall(FAQ.read_text(encoding="utf-8"))}


def assert_quote_matches(quote: str, raised: BaseException) -> None:
    """The quote's fixed pieces (between `...`, `[...]`, `(...)`) appear in the real message, in order."""
    name, _, quoted = quote.partition(": ")
    assert type(raised).__name__ == name, f"FAQ says {name}, code raises {type(raised).__name__}"
    message = raised.args[0] if isinstance(raised, KeyError) and raised.args else str(raised)
    message = repr(message) if isinstance(raised, KeyError) else message
    position = 0
    for piece in re.split(r"\[\.\.\.\]|\(\.\.\.\)|\.\.\.", quoted):
        piece = piece.strip()
        if not piece:
            continue
        found = message.find(piece, position)
        assert found >= 0, f"FAQ text {piece!r} is not in the real message {message!r}"
        position = found + len(piece)


def raised_by(action) -> BaseException:
    try:
        action()
    except BaseException as error:  # noqa: BLE001 - the error is what we compare
        return error
    raise AssertionError("expected an error, none was raised")


def saved_adapter(folder: Path) -> Path:
    model = get_peft_model(tiny_llama(), heft_config())
    model.save_pretrained(folder)
    return folder


class StateDictOverride(LoreftIntervention):
    """Like pyreft's interventions: returns its own state_dict, which hides its weights from PEFT."""

    def state_dict(self, *args, **kwargs):
        return {}


def _trainer(tmp_path: Path, args=None, **overrides):
    return StagedSFTTrainer(
        tiny_sft_model(),
        args=args if args is not None else cpu_sft_args(str(tmp_path / "out"), **overrides),
        train_dataset=make_dataset("prompt_completion", 8),
        processing_class=tiny_tokenizer(),
        peft_config=heft_config(intervention_layers=[0]),
    )


def trigger(key: str, tmp_path: Path, monkeypatch) -> BaseException:
    """Raise the error a FAQ entry quotes, with the values the entry shows."""
    if key.startswith("ValueError: Your setup doesn't support bf"):
        if torch.cuda.is_available():
            pytest.skip("bf16 works on this machine's GPU: the CPU-only error cannot be raised")
        return raised_by(lambda: HeftSFTConfig(output_dir=str(tmp_path), report_to="none"))
    if key.startswith("TypeError: StagedSFTTrainer needs args=H"):
        from trl import SFTConfig

        return raised_by(lambda: _trainer(tmp_path, args=SFTConfig(str(tmp_path), use_cpu=True, bf16=False)))
    if key.startswith("ValueError: intervention_layers contains"):
        return raised_by(lambda: get_peft_model(tiny_llama(layers=4), heft_config(intervention_layers=[7])))
    if key.startswith("ValueError: intervention_rank=64 is large"):
        return raised_by(lambda: get_peft_model(tiny_llama(hidden=32), heft_config(intervention_rank=64)))
    if key.startswith("ValueError: Unknown intervention_positions"):
        return raised_by(lambda: heft_config(intervention_positions="first7"))
    if key.startswith("ValueError: Unknown intervention_type 'fo"):
        return raised_by(lambda: heft_config(intervention_type="foo"))
    if key.startswith("ValueError: This HEFT adapter was made fo"):
        folder = saved_adapter(tmp_path / "adapter")
        return raised_by(lambda: PeftModel.from_pretrained(tiny_llama(hidden=64), folder))
    if key.startswith("FileNotFoundError: ... has adapter_confi"):
        folder = saved_adapter(tmp_path / "adapter")
        (folder / "adapter_model.safetensors").unlink()
        return raised_by(lambda: PeftModel.from_pretrained(tiny_llama(), folder))
    if key.startswith("ValueError: .../adapter_model.safetensor"):
        folder = saved_adapter(tmp_path / "adapter")
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        return raised_by(lambda: PeftModel.from_pretrained(tiny_llama(), folder))
    if key.startswith("ValueError: merge_and_unload() cannot fol"):
        model = get_peft_model(tiny_llama(), heft_config())
        model.base_model.set_stage("frozen")
        return raised_by(model.merge_and_unload)
    if key.startswith("ValueError: StagedSFTTrainer does not support packing"):
        return raised_by(lambda: _trainer(tmp_path, packing=True, packing_strategy="bfd_split"))
    if key.startswith("ValueError: stage_order ['lora', 'lora']"):
        return raised_by(lambda: cpu_sft_args(str(tmp_path), stage_order=["lora", "lora"]))
    if key.startswith("ValueError: Unknown stage 'both' in stage"):
        return raised_by(lambda: cpu_sft_args(str(tmp_path), stage_order=["both"]))
    if key.startswith("ValueError: Unknown HEFT stage 'both'; us"):
        model = get_peft_model(tiny_llama(), heft_config())
        return raised_by(lambda: model.base_model.set_stage("both"))
    if key.startswith("ValueError: Adapter 'default' was loaded "):
        model = PeftModel.from_pretrained(tiny_llama(), saved_adapter(tmp_path / "adapter"))
        return raised_by(lambda: model.base_model.set_stage("reft"))
    if key.startswith("ValueError: Cannot save adapter 'default'"):
        monkeypatch.setitem(peft_heft.tuner.interventions.INTERVENTION_TYPES, "state_dict_override", StateDictOverride)
        model = get_peft_model(tiny_llama(), heft_config(intervention_type="state_dict_override"))
        return raised_by(lambda: model.save_pretrained(tmp_path / "adapter"))
    if key.startswith("ModuleNotFoundError: The embedded Hugging"):
        import peft_heft.assets.model as assets_model

        monkeypatch.setenv("PEFT_HEFT_CACHE", str(tmp_path / "empty-cache"))
        monkeypatch.setattr(assets_model, "embedded_gguf_path", lambda: None)
        return raised_by(assets_model.embedded_model_dir)
    if key.startswith('KeyError: "This is a HEFT adapter (peft'):
        import _peft_heft_autoload

        monkeypatch.setenv("PEFT_HEFT_NO_AUTOLOAD", "1")
        return raised_by(lambda: _peft_heft_autoload.HeftNotRegistered.from_pretrained(str(tmp_path)))
    if key.startswith("SettingsMismatchError: .../adapter_config"):
        import json

        folder = saved_adapter(tmp_path / "adapter")
        config = json.loads((folder / "adapter_config.json").read_text())
        config["intervention_positions"] = "f3+l3"
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return raised_by(lambda: PeftModel.from_pretrained(tiny_llama(), folder))
    if key.startswith("ValueError: attention_mask has shape (3, "):
        model = get_peft_model(tiny_llama(), heft_config())
        model.base_model.set_stage("reft")
        ids = torch.arange(3, 30).reshape(3, 9)
        return raised_by(lambda: model(input_ids=ids, attention_mask=torch.ones(3, 8, dtype=torch.long)))
    if key.startswith("ValueError: intervention_locations names "):
        model = get_peft_model(tiny_llama(), heft_config())
        model.base_model.set_stage("reft")
        ids = torch.arange(3, 12)[None]
        return raised_by(lambda: model(input_ids=ids, intervention_locations=[[[2, 2], [5, -1]]]))
    if key.startswith("ValueError: add_weighted_adapter() cannot"):
        model = get_peft_model(tiny_llama(), heft_config())
        model.add_adapter("other", heft_config())
        return raised_by(lambda: model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix"))
    if key.startswith("RuntimeError: HEFT models cannot run unde"):
        from peft_heft.tuner.layer import refuse_data_parallel_replica

        model = get_peft_model(tiny_llama(), heft_config())
        return raised_by(lambda: refuse_data_parallel_replica(model.base_model._replicate_for_data_parallel()))
    if key.startswith("ValueError: StagedSFTTrainer sees 2 GPUs "):
        monkeypatch.setattr(HeftSFTConfig, "n_gpu", property(lambda self: 2))
        return raised_by(lambda: _trainer(tmp_path))
    if key.startswith("ValueError: StagedSFTTrainer does not support FSDP"):
        monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # HeftSFTConfig(fsdp=...) exports it
        return raised_by(lambda: _trainer(tmp_path, fsdp=True, fsdp_config={"version": 1}))
    if key.startswith("ValueError: `inject_adapter_in_model` does"):
        model = get_peft_model(tiny_llama(), heft_config())
        model.save_pretrained(tmp_path / "adapter")
        return raised_by(lambda: tiny_llama().load_adapter(str(tmp_path / "adapter")))
    raise AssertionError(f"docs/faq.md quotes an error this test cannot raise yet; add a trigger: {key!r}")


@pytest.mark.parametrize("key", sorted(faq_quotes()))
def test_faq_error_messages_are_the_real_ones(key, tmp_path, monkeypatch):
    quote = faq_quotes()[key]
    assert_quote_matches(quote, trigger(key, tmp_path, monkeypatch))


def test_faq_key_error_without_registration(tmp_path, monkeypatch):
    """`KeyError: 'HEFT'`: what PEFT raises when HEFT is not registered in the process."""
    assert "**`KeyError: 'HEFT'`" in FAQ.read_text(encoding="utf-8")
    folder = saved_adapter(tmp_path / "adapter")
    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, "HEFT")
    error = raised_by(lambda: PeftModel.from_pretrained(tiny_llama(), folder))
    assert isinstance(error, KeyError) and error.args == ("HEFT",)


def test_faq_quotes_are_found():
    assert len(faq_quotes()) >= 17  # the parser must keep seeing the entries (a format change would hide them)
