"""A word-level tokenizer with a chat template, and a small learnable yes/no task, for trainer tests (offline)."""

from __future__ import annotations

import random

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_heft import HeftCallback

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = [f"w{i}" for i in range(24)] + ["yes", "no", "?", "Answer:", "Is", "it", "big"]

CHAT_TEMPLATE = (
    "{{ '<s>' }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "<|assistant|> {% generation %}{{ m['content'] }} </s>{% endgeneration %} "
    "{%- else -%}<|{{ m['role'] }}|> {{ m['content'] }} {% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|> {% endif -%}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_sft_model(
    seed: int = 0, layers: int = 2, hidden: int = 32, vocab_size: int | None = None
) -> LlamaForCausalLM:
    """A tiny Llama for the tiny tokenizer (or ``vocab_size`` tokens)."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size or len(SPECIALS) + len(WORDS),
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config)


def yes_no_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Questions of 3-6 words; the answer is 'yes' when the question has a word among w0..w11 before w12..w23 ones."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [f"w{rng.randrange(24)}" for _ in range(rng.randint(3, 6))]
        answer = "yes" if int(words[0][1:]) < 12 else "no"
        rows.append((" ".join(words) + " ?", answer))
    return rows


def make_dataset(kind: str, n: int = 32, seed: int = 0) -> Dataset:
    rows = yes_no_rows(n, seed)
    if kind == "prompt_completion":
        return Dataset.from_list([{"prompt": q + " Answer:", "completion": " " + a} for q, a in rows])
    if kind == "conversational_prompt_completion":
        return Dataset.from_list(
            [
                {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
                for q, a in rows
            ]
        )
    if kind == "messages":
        return Dataset.from_list(
            [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in rows]
        )
    if kind == "text":
        return Dataset.from_list([{"text": f"{q} Answer: {a}"} for q, a in rows])
    raise ValueError(kind)


def cpu_sft_args(output_dir: str, **overrides):
    """HeftSFTConfig for quick CPU trainer tests: 6 steps per stage, lr 1e-2, logging every step, no saving."""
    from peft_heft import HeftSFTConfig

    kwargs = dict(
        output_dir=output_dir,
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        lora_max_steps=6,
        reft_max_steps=6,
        lora_learning_rate=1e-2,
        reft_learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        max_length=64,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return HeftSFTConfig(**kwargs)


def sft_heft_config(**overrides):
    """The HeftConfig of the trainer tests: LoRA r=4 on q/v, rank-2 interventions at f2+l2 on both tiny layers."""
    from peft_heft import HeftConfig

    kwargs = dict(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        intervention_layers=[0, 1],
        intervention_rank=2,
        intervention_positions="f2+l2",
    )
    kwargs.update(overrides)
    return HeftConfig(**kwargs)


class Crash(RuntimeError):
    """A simulated crash in the middle of training (resume tests)."""


class CrashAt(HeftCallback):
    """Raises :class:`Crash` at a given global step of a given stage."""

    def __init__(self, stage, step):
        self.stage, self.step, self.current = stage, step, None

    def on_stage_begin(self, args, state, control, stage=None, **kwargs):
        self.current = stage

    def on_step_end(self, args, state, control, **kwargs):
        if self.current == self.stage and state.global_step == self.step:
            raise Crash(f"killed in {self.stage} at step {self.step}")
