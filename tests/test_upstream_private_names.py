"""Each private upstream name peft-heft still relies on (docs/design.md lists them, with why): a test that fails the
day upstream renames or changes it, so a release never breaks HEFT silently."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType


def test_register_peft_method_still_needs_an_enum_member():
    """registration.py's enum shim exists because PEFT refuses names outside PeftType. When this fails, PEFT accepts
    new names: drop `_add_enum_member` (see docs/design.md, "PeftType.HEFT")."""
    assert "NOT_A_METHOD_XYZ" not in PeftType.__members__
    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(name="not_a_method_xyz", config_cls=LoraConfig, model_cls=LoraModel)


def test_the_enum_shim_uses_the_enum_tables_of_this_python():
    """_add_enum_member writes `_member_map_`, `_member_names_`, `_value2member_map_` (and `_add_member_` on 3.13)."""
    import peft_heft  # noqa: F401  (registers HEFT)

    assert PeftType("HEFT") is PeftType.HEFT and PeftType["HEFT"] is PeftType.HEFT
    assert "HEFT" in PeftType._member_names_ and PeftType._value2member_map_["HEFT"] is PeftType.HEFT
    assert PeftType.HEFT in list(PeftType) and isinstance(PeftType.HEFT, str) and PeftType.HEFT == "HEFT"


# ------------------------------------------------------------------------------------------------------ tuner part
# The private names peft_heft/tuner reads or overrides (with why: /tmp/tuner_private_names.md, docs/design.md).


def _two_adapter_model():
    from conftest import heft_config, tiny_llama
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), heft_config())
    model.add_adapter("other", heft_config(intervention_layers=[0]))
    return model


def test_peft_tuner_state_dict_prefix_helpers_select_one_adapters_tensors():
    """tuner/model.py's load check compares the file with the model's own tensors of the adapter, found by these two
    peft helpers (peft.tuners.tuners_utils, private)."""
    from peft.tuners import tuners_utils

    model = _two_adapter_model()
    prefixes = tuners_utils._get_tuner_state_dict_key_prefixes(model, adapter_name="default")
    own = tuners_utils._filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
    expected = {
        k
        for k in model.state_dict()
        if "heft_interventions.default." in k or ".lora_A.default." in k or ".lora_B.default." in k
    }
    assert set(own) == expected and any("heft_interventions" in k for k in own) and any("lora_A" in k for k in own)


def test_peft_saves_and_loads_through_the_tuner_state_dict_classmethods(tmp_path, monkeypatch):
    """PEFT calls the tuner's `_get_adapter_state_dict`, `_remove_adapter_name_from_key` (saving) and
    `_remap_adapter_state_dict_for_load` (loading), which HeftModel overrides."""
    from conftest import tiny_llama
    from peft import PeftModel
    from safetensors.torch import load_file

    from peft_heft import HeftModel

    calls: list[str] = []
    for name in ("_get_adapter_state_dict", "_remove_adapter_name_from_key", "_remap_adapter_state_dict_for_load"):
        original = getattr(HeftModel, name).__func__

        def spy(cls, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(HeftModel, name, classmethod(spy))
    model = _two_adapter_model()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.heft_interventions.layer1_first.learned_source.weight" in saved  # no adapter name
    assert {"_get_adapter_state_dict", "_remove_adapter_name_from_key"} <= set(calls)
    calls.clear()
    PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert "_remap_adapter_state_dict_for_load" in calls


def test_peft_forward_and_generate_enter_enable_peft_forward_hooks_with_adapter_names(monkeypatch):
    """The mixed-batch routing (`adapter_names=`) rides on LoraModel's `_enable_peft_forward_hooks` context manager,
    entered by PeftModel's forward and generate with the call's keywords."""
    import torch
    from conftest import left_padded_batch

    from peft_heft import HeftModel

    seen: list = []
    original = HeftModel._enable_peft_forward_hooks

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("adapter_names"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HeftModel, "_enable_peft_forward_hooks", spy)
    model = _two_adapter_model().eval()
    ids, mask, _ = left_padded_batch()
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, adapter_names=names)
        model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=1, pad_token_id=0)
    assert seen == [names, names]


def test_accelerate_keeps_a_modules_hooks_in_hf_hook():
    """tuner/placement.py reads an offloaded layer's execution device from accelerate's `module._hf_hook` (alone or in
    a SequentialHook's `.hooks`): accelerate has no public getter."""
    import torch
    from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module

    from peft_heft.tuner.placement import hook_execution_device

    layer = torch.nn.Linear(2, 2)
    hook = AlignDevicesHook(execution_device="cpu")
    add_hook_to_module(layer, hook)
    assert layer._hf_hook is hook and hook_execution_device(layer) == torch.device("cpu")
    add_hook_to_module(layer, ModelHook(), append=True)
    assert hook in layer._hf_hook.hooks and hook_execution_device(layer) == torch.device("cpu")


def test_torch_marks_data_parallel_replicas():
    """tuner/layer.py refuses DataParallel replicas by torch's `_is_replica` flag (set by `_replicate_for_data_parallel`,
    which `torch.nn.parallel.replicate` calls)."""
    import torch

    from peft_heft.tuner.layer import refuse_data_parallel_replica

    replica = torch.nn.Linear(2, 2)._replicate_for_data_parallel()
    assert replica._is_replica is True
    with pytest.raises(RuntimeError, match="DataParallel"):
        refuse_data_parallel_replica(replica)
    refuse_data_parallel_replica(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------- trainer part
# The private transformers/TRL names peft_heft/trainer overrides or reads (with why: /tmp/trainer_private_names.md).


def _parameters(function) -> list[str]:
    import inspect

    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize(
    ("owner", "name", "parameters"),
    [
        (
            "trl.SFTTrainer",
            "_prepare_dataset",
            ["self", "dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"],
        ),
        ("trl.SFTTrainer", "_set_signature_columns_if_needed", ["self"]),
        ("transformers.Trainer", "_load_from_checkpoint", ["self", "resume_from_checkpoint", "model"]),
        ("transformers.Trainer", "_get_output_dir", ["self", "trial"]),
        ("trl.DPOTrainer", "_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
    ],
)
def test_overridden_trainer_hooks_keep_their_signature(owner, name, parameters):
    """StagedSFTTrainer / HeftDPOTrainer override these: a renamed hook would silently stop being called."""
    import importlib

    module, _, cls = owner.rpartition(".")
    assert _parameters(getattr(getattr(importlib.import_module(module), cls), name)) == parameters


def _sft_trainer(tmp_path, **overrides):
    from sft_fixtures import cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer

    from peft_heft import StagedSFTTrainer

    return StagedSFTTrainer(
        tiny_sft_model(),
        args=cpu_sft_args(str(tmp_path / "out"), **overrides),
        train_dataset=make_dataset("prompt_completion", 16),
        processing_class=tiny_tokenizer(),
        peft_config=sft_heft_config(),
    )


def test_signature_columns_keep_the_prompt_lengths(tmp_path):
    """`_signature_columns` (set by `_set_signature_columns_if_needed`) decides which columns survive
    remove_unused_columns: the prompt lengths must, or the collator cannot place the interventions."""
    from peft_heft.trainer.collator import PROMPT_LENGTH_COLUMN

    trainer = _sft_trainer(tmp_path, remove_unused_columns=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert PROMPT_LENGTH_COLUMN in trainer._signature_columns
    assert "intervention_locations" in batch


def test_running_loss_total_is_in_total_loss_scalar_and_tr_loss(tmp_path):
    """A checkpoint's marker records the stage's loss total so far from Trainer's `_total_loss_scalar` (drained at
    each log) and `_tr_loss` (the rest): renamed, the total would read 0 and a resumed train_loss would be wrong."""
    import json

    from peft_heft.trainer.checkpoints import MARKER_NAME

    trainer = _sft_trainer(
        tmp_path, lora_max_steps=4, reft_max_steps=1, logging_steps=3, save_strategy="steps", save_steps=4
    )
    trainer.train()
    marker = json.loads((tmp_path / "out" / "stage-0-lora" / "checkpoint-4" / MARKER_NAME).read_text())
    total = marker["stage_train_loss"]
    assert total["steps"] == 4
    assert total["total"] / 4 == pytest.approx(trainer.completed_stages["lora"]["train_loss"], rel=1e-5)


def test_trl_reads_the_tag_names_of_the_trainer_class():
    """`_tag_names` / `_name` (TRL class attributes) name the trainer in the model card and its tags."""
    from trl import SFTTrainer

    assert isinstance(SFTTrainer._tag_names, list) and isinstance(SFTTrainer._name, str)


# ------------------------------------------------------------------------------------------------------ sharding
# FSDP2 / DeepSpeed parts of trainer/staged_sft.py (and the FSDP2-on-CPU hack of tests/sharded_staged_script.py)


def test_fsdp_activation_checkpointing_names_its_wrapped_module():
    """`_gathered_adapter_state_dict` strips accelerate's FSDP activation-checkpoint wrapper from saved keys."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    assert _CHECKPOINT_PREFIX == "_checkpoint_wrapped_module."


def test_accelerate_fsdp2_prepare_skips_modules_that_are_already_sharded():
    """`_shard_interventions_in_their_dtype` shards the interventions before accelerate's `fsdp2_prepare_model`,
    which must leave an FSDPModule child alone (its wrap loop skips them) and read the plugin fields we copy."""
    import inspect

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    source = inspect.getsource(fsdp2_prepare_model)
    assert "isinstance(module, FSDPModule)" in source and "fsdp2_plugin.reshard_after_forward" in source
    assert "fsdp2_plugin.cpu_offload" in source and "fsdp_dim_names" in source
    fields = set(inspect.signature(FullyShardedDataParallelPlugin).parameters)
    assert {"reshard_after_forward", "cpu_offload", "cpu_ram_efficient_loading"} <= fields


def test_accelerate_prepare_backend_still_decides_the_distributed_type():
    """tests/sharded_staged_script.py (tests only) wraps `PartialState._prepare_backend` to force FSDP2 onto CPU; the
    test asserts DTensor parameters, so a change here fails loudly there too."""
    import inspect

    from accelerate.state import PartialState

    assert list(inspect.signature(PartialState._prepare_backend).parameters) == [
        "self",
        "cpu",
        "sagemaker_dp",
        "backend",
    ]


def test_deepspeed_engine_destroy_and_its_forward_hook_handles():
    """`_release_stage_engine`: `DeepSpeedEngine.destroy()` removes the ZeRO hooks but not the engine's own forward
    hooks, whose handles are `module_forward_pre_hook` / `module_forward_post_hook`; ZeRO-3 parameters carry `ds_id`."""
    deepspeed = pytest.importorskip("deepspeed")
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine

    assert callable(DeepSpeedEngine.destroy)
    source = inspect.getsource(DeepSpeedEngine.__init__)
    assert "self.module_forward_pre_hook = " in source and "self.module_forward_post_hook = " in source
    from deepspeed.runtime.zero.partition_parameters import is_zero_param

    assert "ds_id" in inspect.getsource(is_zero_param)
    assert callable(deepspeed.zero.GatheredParameters)
