"""HEFT end to end, offline, in a couple of minutes on a laptop CPU.

What it does:

1. builds a tiny Llama-shaped model from a config (random weights) and a word-level tokenizer made in this script;
2. makes a synthetic sentiment task: ``"review: <words> sentiment:"`` -> ``"pos"`` / ``"neg"``, the answer being
   decided by which of two word sets the review draws its sentiment words from;
3. wraps the model with ``peft.get_peft_model(model, peft_heft.HeftConfig(...))``;
4. measures accuracy (greedy ``generate``, answer string match) zero-shot, after the LoRA stage, and after the ReFT
   stage (LoRA frozen, LoReFT interventions trained on the first and last 3 prompt tokens);
5. saves the adapter, reloads it with ``PeftModel.from_pretrained`` on a fresh copy of the base model and checks that
   the logits match.

Training is a plain PyTorch loop on purpose: it shows exactly what ``set_stage`` changes. Nothing is downloaded.
Run it with ``.venv/bin/python examples/plain_pytorch.py`` (tiny random model; `make demo` is the SmolLM2 demo).
"""

from __future__ import annotations

import argparse
import os
import random
import time
import warnings
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

import peft_heft  # noqa: F401  (registers the HEFT method with PEFT: import it before get_peft_model / from_pretrained)
from peft_heft import HeftConfig, compute_locations

SEED = 0
OUT = Path("out")
BASE_DIR = OUT / "tiny-base"
ADAPTER_DIR = OUT / "heft-plain-pytorch"

# ---------------------------------------------------------------------------------------------- task and vocabulary
POSITIVE = ["good", "great", "fun", "love", "nice", "best", "superb", "charming"]
NEGATIVE = ["bad", "awful", "boring", "hate", "poor", "worst", "dull", "messy"]
FILLER = [
    "the",
    "movie",
    "film",
    "plot",
    "actor",
    "was",
    "and",
    "very",
    "a",
    "story",
    "it",
    "music",
    "ending",
    "cast",
    "scenes",
    "quite",
    "really",
    "script",
    "director",
    "this",
]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
PROMPT_WORDS = ["review:", "sentiment:"]
ANSWERS = {1: "pos", 0: "neg"}


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = SPECIALS + PROMPT_WORDS + list(ANSWERS.values()) + POSITIVE + NEGATIVE + FILLER
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.padding_side = "left"  # batched generation needs the prompts to end at the same column
    return tok


def tiny_llama_config(tok: PreTrainedTokenizerFast) -> LlamaConfig:
    """A 2-layer, 64-wide Llama for this task's vocabulary (random weights: the point is the workflow)."""
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def make_example(rng: random.Random) -> tuple[str, str]:
    label = rng.randint(0, 1)
    sentiment_words = rng.sample(POSITIVE if label else NEGATIVE, k=rng.randint(1, 2))
    words = rng.choices(FILLER, k=rng.randint(3, 7)) + sentiment_words
    rng.shuffle(words)
    return f"<s> review: {' '.join(words)} sentiment:", ANSWERS[label]


# ---------------------------------------------------------------------------------------------- batching
def train_batch(tok, examples, heft_config: HeftConfig, device):
    """Left-padded ``prompt + answer + </s>``; loss on the answer tokens only; interventions on prompt tokens only."""
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in examples]
    answers = [tok(f"{a} </s>", add_special_tokens=False)["input_ids"] for _, a in examples]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids, mask, labels, prompt_mask = [], [], [], []
    for p, a in zip(prompts, answers, strict=True):
        pad = width - len(p) - len(a)
        ids.append([tok.pad_token_id] * pad + p + a)
        mask.append([0] * pad + [1] * (len(p) + len(a)))
        labels.append([-100] * (pad + len(p)) + a)
        prompt_mask.append([0] * pad + [1] * len(p) + [0] * len(a))
    as_tensor = lambda x: torch.tensor(x, device=device)  # noqa: E731
    ids, mask, labels, prompt_mask = map(as_tensor, (ids, mask, labels, prompt_mask))
    # By default HEFT places the "f3+l3" positions from attention_mask, i.e. on the last real tokens of the whole
    # sequence, which here would be the answer. Like pyreft, intervene on the prompt only: locations from the prompt.
    locations = compute_locations(
        heft_config.position_spec,
        prompt_mask,
        ids.shape[0],
        ids.shape[1],
        heft_config.share_intervention_weights,
        device,
    )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "intervention_locations": locations}


@torch.no_grad()
def accuracy(model, tok, examples, device, batch_size: int = 64) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
        )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(text.strip().split(" ")[0] == answer for text, (_, answer) in zip(texts, chunk, strict=True))
    return correct / len(examples)


def train_stage(model, tok, train, heft_config, device, *, stage, epochs, lr, batch_size=32) -> None:
    model.set_stage(stage)  # PeftModel forwards unknown attributes to the HeftModel tuner (model.base_model)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(f"{SEED}-{stage}")
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    model.train()
    with tqdm(total=steps, desc=f"{stage:>4} stage ({n_params:,} trainable params)", unit="step") as bar:
        for _ in range(epochs):
            order = list(train)
            rng.shuffle(order)
            for start in range(0, len(order), batch_size):
                batch = train_batch(tok, order[start : start + batch_size], heft_config, device)
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="1 epoch per stage instead of 3 (used by the tests)")
    epochs = 1 if parser.parse_args(argv).fast else 3
    t0 = time.time()
    hf_logging.disable_progress_bar()  # keep the output to the two training bars
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    random.seed(SEED)
    torch.manual_seed(SEED)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))

    tok = make_tokenizer()
    rng = random.Random(SEED)
    data = [make_example(rng) for _ in range(1200)]
    train, evaluation = data[:1000], data[1000:]
    print(f"task: {len(train)} train / {len(evaluation)} eval examples, e.g. {train[0][0]!r} -> {train[0][1]!r}")

    # A tiny Llama with random weights, saved like any Hugging Face checkpoint so the adapter can be reloaded on it.
    config = tiny_llama_config(tok)
    LlamaForCausalLM(config).save_pretrained(BASE_DIR)
    tok.save_pretrained(BASE_DIR)
    base = AutoModelForCausalLM.from_pretrained(BASE_DIR).to(device)

    heft_config = HeftConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        intervention_layers="all",
        intervention_rank=4,
        intervention_positions="f3+l3",
    )
    model = get_peft_model(base, heft_config)
    heft_config = model.peft_config["default"]
    model.print_trainable_parameters()

    results = {"zero-shot": accuracy(model, tok, evaluation, device)}
    train_stage(model, tok, train, heft_config, device, stage="lora", epochs=epochs, lr=1e-2)
    results["after LoRA"] = accuracy(model, tok, evaluation, device)
    train_stage(model, tok, train, heft_config, device, stage="reft", epochs=epochs, lr=1e-2)
    results["after ReFT"] = accuracy(model, tok, evaluation, device)

    majority = max(sum(a == "pos" for _, a in evaluation), sum(a == "neg" for _, a in evaluation)) / len(evaluation)
    print(f"\n{'stage':<12} eval accuracy (n={len(evaluation)}; chance 50%, majority answer {majority:.1%})")
    for name, acc in results.items():
        print(f"{name:<12} {acc:6.1%}")
    print("(zero-shot is a random-weight model: it answers nearly the same word for every prompt)")

    # Save, reload on a fresh copy of the base model, compare logits.
    model.save_pretrained(ADAPTER_DIR)
    fresh = AutoModelForCausalLM.from_pretrained(BASE_DIR).to(device)
    reloaded = PeftModel.from_pretrained(fresh, ADAPTER_DIR).eval()
    model.eval()
    enc = tok([p for p, _ in evaluation[:32]], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    with torch.no_grad():
        trained_logits, reloaded_logits = model(**enc).logits, reloaded(**enc).logits
        with reloaded.disable_adapter():  # LoRA and interventions off: the plain base model
            base_logits = reloaded(**enc).logits
    diff = (trained_logits - reloaded_logits).abs().max().item()
    effect = (trained_logits - base_logits).abs().max().item()
    print(f"\nsaved adapter to {ADAPTER_DIR}/ ({', '.join(sorted(os.listdir(ADAPTER_DIR)))})")
    print(
        f"reloaded with PeftModel.from_pretrained: max |logits difference| = {diff:.2e} "
        f"(vs {effect:.2e} between the trained model and the base model)"
    )
    if diff > 1e-4:
        raise SystemExit("reloaded adapter does not reproduce the trained model's logits")

    print(
        "\nreload it yourself:\n"
        "    import peft_heft  # first: registers HEFT with PEFT\n"
        "    from peft import PeftModel\n"
        "    from transformers import AutoModelForCausalLM\n"
        f"    base = AutoModelForCausalLM.from_pretrained({str(BASE_DIR)!r})\n"
        f"    model = PeftModel.from_pretrained(base, {str(ADAPTER_DIR)!r})  # add is_trainable=True to keep training"
    )
    print(f"\ndone in {time.time() - t0:.0f}s on {device.type}")


if __name__ == "__main__":
    main()
