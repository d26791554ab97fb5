"""Tiny models built from config (no downloads) shared by the tests."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import peft_heft  # noqa: F401  (registers HEFT)

VOCAB = 97


def tiny_llama(seed: int = 0, layers: int = 4, hidden: int = 32, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32,
        n_layer=3,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


# The Llama-like families share one small shape: 3 layers, hidden 32, 4 heads (2 KV heads where supported).
_SMALL_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _small_decoder(config_cls, model_cls, seed: int, **extra):
    torch.manual_seed(seed)
    return model_cls(config_cls(**_SMALL_DECODER, **extra)).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    return _small_decoder(Qwen2Config, Qwen2ForCausalLM, seed, num_key_value_heads=2)


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    return _small_decoder(MistralConfig, MistralForCausalLM, seed, num_key_value_heads=2, sliding_window=None)


def tiny_gpt_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    return _small_decoder(GPTNeoXConfig, GPTNeoXForCausalLM, seed)


ARCHITECTURES = {
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn"]),
    "qwen2": (tiny_qwen2, ["q_proj", "v_proj"]),
    "mistral": (tiny_mistral, ["q_proj", "v_proj"]),
    "gpt_neox": (tiny_gpt_neox, ["query_key_value"]),
}


def heft_config(**overrides) -> peft_heft.HeftConfig:
    kwargs = dict(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        intervention_layers=[1, -1],
        intervention_rank=2,
        intervention_positions="f2+l2",
        init_lora_weights=False,
    )
    kwargs.update(overrides)
    return peft_heft.HeftConfig(**kwargs)


def clone(model):
    return copy.deepcopy(model)


def left_padded_batch(seed: int = 1, lengths=(9, 6, 4), pad_id: int = 0):
    """Rows of real tokens (ids >= 3) with left padding; also returns the unpadded rows."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask, rows


def right_padded(rows, pad_id: int = 0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


@pytest.fixture
def llama():
    return tiny_llama()


def randomize_interventions(model, scale: float = 0.5, seed: int = 3) -> None:
    """Give interventions weights large enough to change outputs visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.base_model.heft_interventions.named_parameters():
            if "rotate_layer" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def launch_two_cpu_processes(script, *script_args, port, timeout=600, cwd=None):
    """Run ``script`` in 2 processes with ``accelerate launch``; skips the test when the CLI is missing.

    accelerate's ``--cpu`` multi-process path needs mpirun; ``--multi_gpu`` starts the 2 processes with torchrun and,
    without CUDA (the scripts train with ``use_cpu=True``), they join a gloo process group.
    """
    import os
    import subprocess
    import sys

    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    if not os.path.exists(launcher):
        pytest.skip("accelerate CLI not installed")
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    return subprocess.run(
        [*command, str(script), *map(str, script_args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PEFT_HEFT_NO_AUTOLOAD": "0"},
    )
