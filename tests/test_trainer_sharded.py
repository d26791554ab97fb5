"""StagedSFTTrainer under FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3: two CPU processes (gloo) through `accelerate launch`.

Each engine trains both HEFT stages of the tiny Llama (tests/sft_fixtures.py, 4 steps per stage) with
tests/sharded_staged_script.py and is checked against the same run under DDP (the reference):
  - the engine really ran (FSDP2: DTensor parameters and FSDPModules; ZeRO-3: partitioned parameters; DeepSpeed:
    one engine per stage with that ZeRO stage), not a silent fallback to DDP;
  - stage 1 changed only LoRA, stage 2 only the interventions; both ranks hold the same parameters;
  - the adapter tensors and the train loss equal DDP's (1e-5);
  - `save_model` after stage 2 wrote the frozen LoRA and the interventions, through the atomic save
    (`training_args.json`, no pickle); reloaded in this plain process it gives the trained model's logits (1e-5);
  - resuming from a stage-2 checkpoint in a new launch ends with the same adapter as the uninterrupted run.
ZeRO tests need deepspeed (`make test-deepspeed` builds a venv with it); they run with DS_ACCELERATOR=cpu.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "sharded_staged_script.py")
CONFIGS = os.path.join(ROOT, "examples", "accelerate")
TOL = 1e-5


def launch(engine: str, out, *options, port: int, launcher_args: tuple = (), timeout: int = 600) -> dict:
    """`accelerate launch` the training script in 2 CPU processes (1 thread each); returns its results.json."""
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    if not os.path.exists(launcher):
        pytest.skip("accelerate CLI not installed")
    if engine == "ddp":
        command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        command = [launcher, "launch", "--config_file", os.path.join(CONFIGS, f"{engine}_cpu.yaml")]
    command += [*launcher_args, "--main_process_port", str(port), SCRIPT, engine, str(out), *map(str, options)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFT_HEFT_NO_AUTOLOAD": "0", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(os.path.join(out, "results.json")) as handle:
        return json.load(handle)


def tensors(out) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, "trained.pt"))


def max_diff(a: dict, b: dict, part: str) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a if part in k)


def check_stages(results: dict) -> None:
    lora, reft = results["stages"]["lora"], results["stages"]["reft"]
    assert lora["lora_max_change"] > 0 and lora["reft_max_change"] == 0 and lora["base_max_change"] == 0
    assert reft["reft_max_change"] > 0 and reft["lora_max_change"] == 0 and reft["base_max_change"] == 0
    for stage in (lora, reft):
        assert all(stage[f"{g}_max_rank_diff"] == 0 for g in ("lora", "reft", "base")), stage
    assert results["logits_rank_diff"] == 0
    assert lora["engine"]["trainable_numel"] == {"lora": 896, "reft": 0, "base": 0}
    assert reft["engine"]["trainable_numel"] == {"lora": 0, "reft": 520, "base": 0}


def check_saved_adapter(out) -> dict[str, float]:
    """Reload `save_model`'s folder in this plain process: every adapter tensor, the trained model's logits."""
    from peft import PeftModel
    from sft_fixtures import tiny_sft_model

    import peft_heft  # noqa: F401

    folder = os.path.join(out, "adapter")
    names = set(os.listdir(folder))
    assert "training_args.json" in names and "training_args.bin" not in names, names  # HEFT's atomic save
    assert not any(n.startswith(".heft-save-") for n in names), names
    loaded = PeftModel.from_pretrained(tiny_sft_model(), folder).eval()
    reloaded = {n: p.detach().float() for n, p in loaded.named_parameters() if "lora_" in n or "heft_int" in n}
    trained = tensors(out)
    assert set(reloaded) == set(trained)
    assert sum("lora_" in n for n in reloaded) == 8 and sum("heft_int" in n for n in reloaded) == 12
    saved = torch.load(os.path.join(out, "logits.pt"))
    with torch.no_grad():
        logits = loaded(**saved["batch"]).logits.float()
    numbers = {
        "reload_tensor_max_diff": max_diff(reloaded, trained, ""),
        "reload_logits_max_diff": float((logits - saved["logits"]).abs().max()),
    }
    assert numbers["reload_tensor_max_diff"] == 0.0, numbers
    assert numbers["reload_logits_max_diff"] <= TOL, numbers
    return numbers


def run_engine_against_ddp(tmp_path, engine: str, port: int, check_engine, gc: tuple = ("--gc",)) -> dict:
    """DDP reference, the engine with checkpoints, a resume from its stage-2 checkpoint: all the checks above."""
    ddp = launch("ddp", tmp_path / "ddp", "--gc", port=port)
    run = launch(engine, tmp_path / engine, *gc, "--save-steps", "2", port=port + 1)
    check_stages(run)
    for stage in ("lora", "reft"):
        check_engine(run["stages"][stage]["engine"])
    # DeepSpeed: one engine per stage (the first one destroyed); FSDP2: the same module, sharded once
    ids = {run["stages"][stage]["engine"]["model_wrapped_id"] for stage in ("lora", "reft")}
    assert len(ids) == (2 if engine.startswith("zero") else 1)
    numbers = {
        "vs_ddp_lora": max_diff(tensors(tmp_path / engine), tensors(tmp_path / "ddp"), "lora_"),
        "vs_ddp_reft": max_diff(tensors(tmp_path / engine), tensors(tmp_path / "ddp"), "heft_int"),
        "vs_ddp_loss": abs(run["train_loss"] - ddp["train_loss"]),
    }
    assert all(v <= TOL for v in numbers.values()), numbers
    numbers.update(check_saved_adapter(tmp_path / engine))
    # a checkpoint of the ReFT stage holds the frozen LoRA (the engines' own files keep only trainable parameters)
    checkpoint = tmp_path / engine / "stage-1-reft" / "checkpoint-2"
    assert (checkpoint / "heft_checkpoint.json").is_file()
    resumed = launch(engine, tmp_path / "resumed", *gc, "--resume", checkpoint, port=port + 2)
    assert resumed["global_step"] == run["global_step"]
    numbers["resume_vs_uninterrupted"] = max_diff(tensors(tmp_path / "resumed"), tensors(tmp_path / engine), "")
    assert numbers["resume_vs_uninterrupted"] <= TOL, numbers
    print(json.dumps({engine: numbers}))
    return numbers


@pytest.mark.slow
def test_fsdp2_trains_saves_and_resumes_both_stages_like_ddp(tmp_path):
    def is_fsdp2(facts):
        # accelerate on CPU silently runs DDP instead of FSDP: prove the parameters really are sharded DTensors
        assert facts["model_wrapped"].startswith("FSDP"), facts
        # transformer-based wrap: one unit per decoder layer, the embeddings, the head, the root; each intervention
        # (in a ModuleDict on the tuner, outside the layers) has its own unit, computing in its own dtype
        units = [f"base_model.heft_interventions.default.layer{i}_{g}" for i in (0, 1) for g in ("first", "last")]
        assert {"base_model.model.model.layers.0", "base_model.model.model.layers.1"} <= set(
            facts["fsdp_module_names"]
        ), facts
        assert facts["intervention_fsdp_units"] == units, facts
        assert facts["dtensor_params"] == facts["num_params"] and facts["local_numel"] * 2 == facts["global_numel"]

    run_engine_against_ddp(tmp_path, "fsdp2", 29591, is_fsdp2)


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_keeps_the_trainable_parameters_in_fp32(tmp_path):
    run = launch("fsdp2", tmp_path / "fsdp2", port=29595, launcher_args=("--mixed_precision", "bf16"))
    assert run["setup"]["mixed_precision"] == "bf16" and run["setup"]["is_fsdp2"]
    check_stages(run)
    for stage in ("lora", "reft"):
        facts = run["stages"][stage]["engine"]
        assert facts["trainable_dtypes"] == ["torch.float32"] and facts["intervention_dtypes"] == ["torch.float32"]
    trained = tensors(tmp_path / "fsdp2")
    from peft import PeftModel
    from sft_fixtures import tiny_sft_model

    import peft_heft  # noqa: F401

    loaded = PeftModel.from_pretrained(tiny_sft_model(), str(tmp_path / "fsdp2" / "adapter"))
    reloaded = {n: p.detach().float() for n, p in loaded.named_parameters() if "lora_" in n or "heft_int" in n}
    assert max_diff(reloaded, trained, "") == 0.0


def deepspeed_engine_check(stage: int):
    def check(facts):
        assert facts["model_wrapped"] == "DeepSpeedEngine" and facts["zero_stage"] == stage, facts
        partitioned = facts["zero3_partitioned_params"]
        assert partitioned == (facts["num_params"] if stage == 3 else 0), facts

    return check


@pytest.mark.slow
def test_zero2_trains_saves_and_resumes_both_stages_like_ddp(tmp_path):
    pytest.importorskip("deepspeed")
    run_engine_against_ddp(tmp_path, "zero2", 29601, deepspeed_engine_check(2))


@pytest.mark.slow
def test_zero2_bf16_trains_loreft_rotations_cast_to_bf16(tmp_path):
    # DeepSpeed casts the whole model, interventions included, to bf16 (no fp32 master copy in the module): the
    # Householder rotation must still compute (from a float32 copy) and both stages train
    pytest.importorskip("deepspeed")
    run = launch("zero2", tmp_path / "zero2", port=29621, launcher_args=("--mixed_precision", "bf16"))
    assert run["setup"]["mixed_precision"] == "bf16"
    lora, reft = run["stages"]["lora"], run["stages"]["reft"]
    # stage 1 starts from the float32 weights and DeepSpeed's engine casts them: the interventions and the base move
    # only by bf16 rounding there (2^-8 relative), the LoRA weights by training; stage 2 starts from the cast weights
    assert lora["lora_max_change"] > 0.01 and lora["reft_max_change"] < 4e-3 and lora["base_max_change"] < 4e-3
    assert reft["reft_max_change"] > 0 and reft["lora_max_change"] == 0 and reft["base_max_change"] == 0
    assert all(stage[f"{g}_max_rank_diff"] == 0 for stage in (lora, reft) for g in ("lora", "reft", "base"))
    assert reft["engine"]["intervention_dtypes"] == ["torch.bfloat16"]
    assert run["train_loss"] == run["train_loss"]  # not NaN


@pytest.mark.slow
def test_zero3_trains_saves_and_resumes_both_stages_like_ddp(tmp_path):
    pytest.importorskip("deepspeed")
    # non-reentrant checkpointing is refused for ZeRO-3 over two stages (test below): reentrant is what works
    run_engine_against_ddp(tmp_path, "zero3", 29611, deepspeed_engine_check(3), gc=("--gc", "--reentrant"))


@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_every_parameter_of_a_fresh_heft_model_is_contiguous(kind):
    # FSDP2's fully_shard and DeepSpeed's engine refuse non-contiguous parameters (torch stores the orthogonal
    # parametrization's `original` as a transposed view unless HEFT makes it contiguous)
    from peft import get_peft_model
    from sft_fixtures import sft_heft_config, tiny_sft_model

    model = get_peft_model(tiny_sft_model(), sft_heft_config(intervention_type=kind))
    params = dict(model.named_parameters())
    assert any("rotate_layer.parametrizations.weight.original" in n for n in params)
    assert [n for n, p in params.items() if not p.is_contiguous()] == []


def _sharding_args(**kwargs):
    from types import SimpleNamespace

    fields = dict(
        bf16=False,
        fp16=False,
        deepspeed=None,
        fsdp=None,
        fsdp_config=None,
        fsdp_plugin_args=None,
        gradient_checkpointing=False,
        gradient_checkpointing_kwargs=None,
        stage_order=["lora", "reft"],
        deepspeed_plugin=None,
    )
    fields.update(kwargs)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize(
    "env, kwargs, refused",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, {}, None),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, "FSDP version 1"),
        ({"ACCELERATE_USE_FSDP": "true"}, {}, "FSDP version 1"),  # accelerate's default version
        ({}, {"fsdp": True, "fsdp_plugin_args": {"fsdp_version": 2}}, None),
        ({}, {"fsdp": True, "fsdp_plugin_args": {"fsdp_version": 1}}, "FSDP version 1"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, {"deepspeed_zero": 2, "gradient_checkpointing": True}, None),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, {"deepspeed_zero": 3}, None),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, {"deepspeed_zero": 3, "gradient_checkpointing": True}, "ZeRO-3"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true"},
            {
                "deepspeed_zero": 3,
                "gradient_checkpointing": True,
                "gradient_checkpointing_kwargs": {"use_reentrant": True},
            },
            None,
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true"},
            {"deepspeed_zero": 3, "gradient_checkpointing": True, "stage_order": ["reft"]},
            None,
        ),
    ],
)
def test_sharding_engines_accepted_and_refused(monkeypatch, env, kwargs, refused):
    _check_sharding(monkeypatch, env, kwargs, refused)


def test_householder_rotations_compute_under_deepspeed_half_precision():
    # DeepSpeed casts the whole model, interventions included, to bf16/fp16; torch has no half-precision Householder
    # product ("orgqr" not implemented for 'BFloat16'), so HEFT computes the rotation from a float32 copy
    from peft_heft.tuner.interventions import DireftIntervention, LoreftIntervention

    for cls in (LoreftIntervention, DireftIntervention):
        torch.manual_seed(0)
        full = cls(embed_dim=16, low_rank_dimension=2)
        half = cls(embed_dim=16, low_rank_dimension=2)
        half.load_state_dict(full.state_dict())
        half = half.to(torch.bfloat16)
        x = torch.randn(3, 5, 16)
        out = half(x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), full(x).detach(), atol=3e-2, rtol=0)
        out.float().sum().backward()
        original = half.rotate_layer.parametrizations.weight.original
        assert original.grad is not None and original.grad.dtype == torch.bfloat16 and bool(original.grad.any())
        assert list(full.state_dict()) == list(half.state_dict())  # the same saved keys (pyreft's)


def _check_sharding(monkeypatch, env, kwargs, refused):
    from types import SimpleNamespace

    from peft_heft.trainer.validation import check_sharding_supported

    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    zero = kwargs.pop("deepspeed_zero", None)
    args = _sharding_args(deepspeed_plugin=SimpleNamespace(zero_stage=zero) if zero else None, **kwargs)
    if refused is None:
        check_sharding_supported(args)
        return
    with pytest.raises(ValueError, match=refused) as error:
        check_sharding_supported(args)
    assert ("fsdp_version: 2" in str(error.value)) == (refused.startswith("FSDP"))
    assert ("use_reentrant" in str(error.value)) == (refused == "ZeRO-3")
