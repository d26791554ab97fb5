"""lm-evaluation-harness on a HEFT adapter (local task YAMLs, tiny models saved to disk).

The ``heft`` model's log-likelihoods equal a direct scoring with the interventions on the full prompt (the context
string as the task wrote it, the trailing whitespace lm_eval moves into the continuation included, tokenized as
training and ``generate()`` tokenize a prompt), at batch sizes 1 and 8, through ``simple_evaluate`` and through the
command line; its accuracy equals ``peft_heft.evaluation``'s; ``generate_until`` equals HEFT's ``generate``. lm_eval's
plain ``hf`` model on a HEFT adapter is stopped with an error naming ``--model heft`` (its ``generate_until``, which
passes the attention mask, is right and runs).

Task managers skip lm_eval's own task index (``include_defaults=False``, 12 s per index); the command-line tests
cannot, and are marked slow.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_interventions
from peft import PeftModel, get_peft_model
from sft_fixtures import SPECIALS, WORDS, tiny_sft_model, tiny_tokenizer, yes_no_rows
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

from peft_heft import HeftConfig, compute_locations
from peft_heft.evaluation import evaluate_choice_accuracy
from peft_heft.trainer.collator import PROMPT_LENGTH_COLUMN
from peft_heft.trainer.prompts import prompt_length_fn

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import peft_heft.lm_eval as heft_lm_eval  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHOICES = [" yes it big", " no it big"]  # three tokens each: positions counted from the end would land on them
POSITIONS = "f2+l2"

MC_TASK = """task: heft_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} Answer:"
target_delimiter: ""
doc_to_choice: {choices}
doc_to_target: label
metric_list:
  - metric: acc
"""

GEN_TASK = """task: heft_yesno_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}} Answer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""

ROLLING_TASK = """task: heft_yesno_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}} Answer: {{{{answer}}}}"
metric_list:
  - metric: word_perplexity
"""


# Chat-style contexts: the chat template's generation prompt ends in "\n" (its own token, as in SmolLM2 or Llama 3),
# which lm_eval moves from the context into the continuation; ``heft_nl`` ends a plain context in " Answer:\n".
CHAT_CHOICES = ["yes it big", "no it big"]

CHAT_TASK = """task: heft_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
target_delimiter: ""
doc_to_choice: {choices}
doc_to_target: label
metric_list:
  - metric: acc
"""

NEWLINE_TASK = """task: heft_nl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} Answer:\\n"
target_delimiter: ""
doc_to_choice: {choices}
doc_to_target: label
metric_list:
  - metric: acc
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """Pieces like a byte-level BPE's (GPT-2, SmolLM2, Llama 3): a word with its leading space is one token, "\n" and
    a trailing space are tokens of their own, so "Answer: " tokenizes as " Answer:", " " but "Answer: yes" as
    " Answer:", " yes"."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["\n", " "] + WORDS + [" " + w for w in WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[^\s]+|\n| +"), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_model(vocab_size: int) -> LlamaForCausalLM:
    return tiny_sft_model(seed=1, vocab_size=vocab_size)


def heft_adapter(base):
    """A HEFT adapter (LoRA + f2+l2 interventions on all layers) whose interventions change the scores visibly."""
    config = HeftConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        intervention_layers="all",
        intervention_rank=4,
        intervention_positions=POSITIONS,
        init_lora_weights=False,
    )
    model = get_peft_model(base, config)
    model.base_model.set_stage("reft")
    randomize_interventions(model, scale=0.8)
    return model


def write_tasks(root, tasks, rows, choices):
    """The rows as a local json file and each task YAML reading it."""
    with open(root / "data.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    (root / "tasks").mkdir()
    for name, text in tasks:
        (root / "tasks" / f"{name}.yaml").write_text(
            text.format(data=root / "data.jsonl", choices=json.dumps(choices))
        )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base model and tokenizer on disk, a HEFT adapter whose interventions change the scores, and tasks."""
    root = tmp_path_factory.mktemp("lm_eval")
    base, tokenizer = tiny_sft_model(), tiny_tokenizer()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    heft_adapter(base).save_pretrained(root / "adapter")
    rows = [{"question": q, "answer": a, "label": CHOICES.index(f" {a} it big")} for q, a in yes_no_rows(20, seed=4)]
    write_tasks(root, [("mc", MC_TASK), ("gen", GEN_TASK), ("rolling", ROLLING_TASK)], rows, CHOICES)
    return root, rows


@pytest.fixture(scope="module")
def chat_saved(tmp_path_factory):
    """Like ``saved``, with a tokenizer that has a "\n" token and a chat template ending in "<|assistant|>\n"."""
    root = tmp_path_factory.mktemp("lm_eval_chat")
    tokenizer = chat_tokenizer()
    base = chat_model(len(tokenizer))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    heft_adapter(base).save_pretrained(root / "adapter")
    rows = [{"question": q, "label": CHAT_CHOICES.index(f"{a} it big")} for q, a in yes_no_rows(16, seed=5)]
    write_tasks(root, [("chat", CHAT_TASK), ("nl", NEWLINE_TASK)], rows, CHAT_CHOICES)
    return root, rows


def loaded(root, tokenizer_fn=tiny_tokenizer):
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    return PeftModel.from_pretrained(base, root / "adapter").eval(), tokenizer_fn()


def tiny_sft_model_from(root):
    return AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)


def model_args(root):
    return f"pretrained={root / 'base'},peft={root / 'adapter'},tokenizer={root / 'base'},dtype=float32"


def evaluate(root, task, model="heft", batch_size=1, limit=None, **kwargs):
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args(root) + ",device=cpu",
        tasks=[task],
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
        batch_size=batch_size,
        log_samples=True,
        limit=limit,
        **kwargs,
    )


def loglikelihoods(results, task):
    """Per document, per choice: lm_eval's log-likelihood (in document order)."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return torch.tensor([[float(r[0][0]) for r in s["resps"]] for s in samples], dtype=torch.float64)


def request_pairs(results, task):
    """Per document, per choice: the (context, continuation) strings lm_eval scored, as the task wrote them."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[tuple(args) for args in s["arguments"]] for s in samples]


@torch.no_grad()
def direct_scores(model, tokenizer, rows):
    """Each (question, choice) scored alone, with the context's locations computed by hand and passed explicitly."""
    spec = model.peft_config["default"].position_spec
    out = []
    for row in rows:
        context = f"{row['question']} Answer:"
        context_ids = tokenizer(context)["input_ids"]
        scores = []
        for choice in CHOICES:
            whole = tokenizer(context + choice)["input_ids"]
            assert whole[: len(context_ids)] == context_ids
            ids = torch.tensor([whole])
            prompt_mask = torch.zeros_like(ids)
            prompt_mask[0, : len(context_ids)] = 1
            locations = compute_locations(spec, prompt_mask, 1, ids.shape[1], share_weights=False)
            logits = model(input_ids=ids, intervention_locations=locations).logits[0, :-1]
            logp = torch.log_softmax(logits.double(), -1).gather(1, ids[0, 1:, None])[:, 0]
            scores.append(float(logp[len(context_ids) - 1 :].sum()))
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


def training_prompt_length(tokenizer, context, continuation):
    """The prompt length StagedSFTTrainer gives the prompt/completion example (context, continuation)."""
    example = {
        "prompt": context,
        "completion": continuation,
        "input_ids": tokenizer(context + continuation)["input_ids"],
    }
    return prompt_length_fn(example, tokenizer, None, keep_end=False)[PROMPT_LENGTH_COLUMN]


@torch.no_grad()
def full_prompt_scores(model, tokenizer, pairs, prompt_of=training_prompt_length):
    """Each (context, continuation) scored alone, the interventions placed by hand on the full prompt: the context
    string as the task wrote it (trailing whitespace included), tokenized as training and generate() tokenize a
    prompt (``prompt_of``: StagedSFTTrainer's own count). Scored: the tokens lm_eval scores, i.e. those after the
    context without its trailing whitespace (lm_eval moves that whitespace into the continuation)."""
    spec = model.peft_config["default"].position_spec
    out = []
    for doc in pairs:
        scores = []
        for context, continuation in doc:
            whole = tokenizer(context + continuation)["input_ids"]
            scored_from = len(tokenizer(context.rstrip())["input_ids"])
            ids = torch.tensor([whole])
            prompt_mask = (torch.arange(len(whole)) < prompt_of(tokenizer, context, continuation)).long()[None]
            locations = compute_locations(spec, prompt_mask, 1, ids.shape[1], share_weights=False)
            logits = model(input_ids=ids, intervention_locations=locations).logits[0, :-1]
            logp = torch.log_softmax(logits.double(), -1).gather(1, ids[0, 1:, None])[:, 0]
            scores.append(float(logp[scored_from - 1 :].sum()))
        out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


def lm_eval_context_length(tokenizer, context, continuation):
    """Where lm_eval's context ends: without its trailing whitespace (the placement the heft model used to have)."""
    return len(tokenizer(context.rstrip())["input_ids"])


@pytest.mark.parametrize("task", ["heft_chat", "heft_nl"])
def test_interventions_sit_on_the_full_prompt_whatever_lm_eval_moves(chat_saved, task):
    """A chat template's trailing "\n" (or a context's) that lm_eval moves into the continuation stays in the prompt
    HEFT intervenes on, as in training and generate(), at batch sizes 1 and 8."""
    root, rows = chat_saved
    model, tokenizer = loaded(root, chat_tokenizer)
    chat = {"apply_chat_template": True} if task == "heft_chat" else {}
    one_results = evaluate(root, task, batch_size=1, **chat)
    pairs = request_pairs(one_results, task)
    assert all(context.endswith("\n") for doc in pairs for context, _ in doc), pairs[0]
    if task == "heft_chat":
        assert pairs[0][0][0].endswith("</s>\n<|assistant|>\n") and pairs[0][0][1] == CHAT_CHOICES[0]
    reference = full_prompt_scores(model, tokenizer, pairs)
    one = loglikelihoods(one_results, task)
    eight_results = evaluate(root, task, batch_size=8, **chat)
    torch.testing.assert_close(one, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(loglikelihoods(eight_results, task), reference, rtol=0, atol=1e-4)
    labels = torch.tensor([r["label"] for r in rows])
    expected_accuracy = float((reference.argmax(dim=1) == labels).double().mean())
    assert eight_results["results"][task]["acc,none"] == pytest.approx(expected_accuracy, abs=1e-9)

    # the reference is where generate() intervenes: the "\n" is the prompt's last token, and the logits at it are
    # generate()'s first-step logits on the context alone
    context, continuation = pairs[0][0]
    prompt = tokenizer(context)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(prompt[-1]) == "\n"
    assert training_prompt_length(tokenizer, context, continuation) == len(prompt)
    ids = torch.tensor([tokenizer(context + continuation)["input_ids"]])
    prompt_mask = (torch.arange(ids.shape[1]) < len(prompt)).long()[None]
    spec = model.peft_config["default"].position_spec
    with torch.no_grad():
        locations = compute_locations(spec, prompt_mask, 1, ids.shape[1], share_weights=False)
        scored = model(input_ids=ids, intervention_locations=locations).logits[0, len(prompt) - 1]
        first = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        ).logits[0][0]
    torch.testing.assert_close(first, scored, rtol=0, atol=1e-5)

    # placing the interventions by lm_eval's shortened context (what the heft model did before) is measurably off
    by_context = full_prompt_scores(model, tokenizer, pairs, prompt_of=lm_eval_context_length)
    assert (by_context - reference).abs().max() > 0.05


def test_context_whose_trailing_space_merges_with_the_continuation(chat_saved):
    """ "w1 ? Answer: " alone ends in a " " token, but "w1 ? Answer: yes" tokenizes " yes": the prompt is the tokens
    both share, as StagedSFTTrainer counts it (with a warning); a continuation of moved whitespace only is refused."""
    root, _ = chat_saved
    model, tokenizer = loaded(root, chat_tokenizer)
    lm = heft_lm_eval.HeftLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4)
    pairs = [("w1 w5 ? Answer: ", "yes it big"), ("w1 w5 ? Answer: ", "no it big"), ("w9 ?\n", "yes it big")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    with pytest.warns(UserWarning, match="merge with the continuation"):
        got = torch.tensor([score for score, _ in lm.loglikelihood(requests)], dtype=torch.float64)
    assert training_prompt_length(tokenizer, *pairs[0]) == len(tokenizer("w1 w5 ? Answer:")["input_ids"])
    reference = full_prompt_scores(model, tokenizer, [pairs])[0]
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="adds no token of its own"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("w9 ?\n", ""), 0)])


def test_loglikelihoods_equal_direct_scoring_at_batch_sizes_1_8_and_auto(saved):
    root, rows = saved
    model, tokenizer = loaded(root)
    reference = direct_scores(model, tokenizer, rows)
    one = loglikelihoods(evaluate(root, "heft_yesno", batch_size=1), "heft_yesno")
    eight_results = evaluate(root, "heft_yesno", batch_size=8)
    eight = loglikelihoods(eight_results, "heft_yesno")
    auto_results = evaluate(root, "heft_yesno", batch_size="auto")  # lm_eval probes the batch size mid-scoring
    torch.testing.assert_close(one, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(eight, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(loglikelihoods(auto_results, "heft_yesno"), reference, rtol=0, atol=1e-4)
    assert auto_results["config"]["batch_sizes"], auto_results["config"]
    # the accuracy lm_eval reports is peft_heft.evaluation's on the same data
    ours = evaluate_choice_accuracy(
        model, tokenizer, [f"{r['question']} Answer:" for r in rows], [CHOICES] * len(rows), [r["label"] for r in rows]
    )
    assert eight_results["results"]["heft_yesno"]["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-9)
    torch.testing.assert_close(torch.tensor(ours["scores"], dtype=torch.float64), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_plain_hf_model_on_a_heft_adapter_is_stopped(saved, batch_size):
    """lm_eval's `hf` model scores context + continuation with no mask and no prompt boundary: at any batch size it
    would put the interventions on the answers (and padding), so HEFT's forward stops it, naming --model heft."""
    root, _ = saved
    with pytest.raises(RuntimeError, match=r"lm_eval\.models\.huggingface\.HFLM\._model_call.*--model heft"):
        evaluate(root, "heft_yesno", model="hf", batch_size=batch_size)
    # the same adapter called outside lm_eval on one unpadded row, no mask, is a prompt: it still runs
    model, tokenizer = loaded(root)
    ids = torch.tensor([tokenizer("w1 w2 ? Answer:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, model(input_ids=ids, intervention_prompt_lengths=[ids.shape[1]]).logits
        )


def test_generate_until_equals_heft_generate(saved):
    root, rows = saved
    model, tokenizer = loaded(root)
    results = evaluate(root, "heft_yesno_gen", batch_size=8)
    samples = sorted(results["samples"]["heft_yesno_gen"], key=lambda s: s["doc_id"])
    got = [s["resps"][0][0] for s in samples]

    def one_at_a_time():  # one prompt per call, no padding: an independent reference for lm_eval's batches
        texts = []
        for row in rows:
            ids = tokenizer(f"{row['question']} Answer:", return_tensors="pt")["input_ids"]
            new = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
            new = new[: (new == 2).nonzero()[0, 0]] if (new == 2).any() else new  # up to the stop string </s>
            texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        return texts

    assert [g.strip() for g in got] == one_at_a_time()
    # lm_eval's `hf` model generates through HEFT's generate() with the attention mask: right, so it is not stopped
    plain = evaluate(root, "heft_yesno_gen", model="hf", batch_size=8)["samples"]["heft_yesno_gen"]
    assert [s["resps"][0][0] for s in sorted(plain, key=lambda s: s["doc_id"])] == got
    model.base_model.set_stage("frozen", apply_interventions=False)  # the interventions decide these generations
    assert one_at_a_time() != [g.strip() for g in got]


def test_rolling_loglikelihood_does_not_depend_on_the_batch_size(saved):
    root, _ = saved
    one = evaluate(root, "heft_yesno_rolling", batch_size=1)["samples"]["heft_yesno_rolling"]
    eight = evaluate(root, "heft_yesno_rolling", batch_size=8)["samples"]["heft_yesno_rolling"]
    by_doc = lambda samples: [float(s["resps"][0][0]) for s in sorted(samples, key=lambda s: s["doc_id"])]  # noqa: E731
    torch.testing.assert_close(torch.tensor(by_doc(eight)), torch.tensor(by_doc(one)), rtol=0, atol=1e-4)


def test_requests_sharing_a_row_with_other_contexts_are_scored_apart(saved):
    """ "<s> w1 w2" + " w3 w4" and "<s> w1" + " w2 w3 w4" run the same tokens with different contexts: lm_eval
    would batch them as one row; each must get the interventions of its own context."""
    root, _ = saved
    model, tokenizer = loaded(root)
    lm = heft_lm_eval.HeftLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8)
    full = tokenizer("w1 w2 w3 w4")["input_ids"]
    ids = torch.tensor([full[:-1]])
    spec = model.peft_config["default"].position_spec

    @torch.no_grad()
    def reference(context_len, scored_from):
        prompt_mask = (torch.arange(ids.shape[1]) < context_len).long().unsqueeze(0)
        locations = compute_locations(spec, prompt_mask, 1, ids.shape[1], share_weights=False)
        logp = torch.log_softmax(model(input_ids=ids, intervention_locations=locations).logits[0].double(), -1)
        return float(logp.gather(1, torch.tensor(full[1:])[:, None])[scored_from - 1 :, 0].sum())

    requests = [(None, full[:3], full[3:]), (None, full[:2], full[2:]), (None, full[:3], full[3:])]
    scores = [s for s, _ in lm._loglikelihood_tokens(requests)]
    assert scores[0] == pytest.approx(reference(3, 3), abs=1e-4) and scores[2] == scores[0]
    assert scores[1] == pytest.approx(reference(2, 2), abs=1e-4)
    # scoring request 0 with request 1's context would be wrong: the split matters
    assert abs(reference(2, 3) - reference(3, 3)) > 1e-3


def test_heft_model_needs_a_heft_adapter(saved):
    root, _ = saved
    with pytest.raises(ValueError, match="needs a HEFT adapter"):
        heft_lm_eval.HeftLM(pretrained=tiny_sft_model_from(root), tokenizer=tiny_tokenizer(), device="cpu")


def run_cli(command, tmp_path, autoload=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not autoload:
        env["PEFT_HEFT_NO_AUTOLOAD"] = "1"
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)


def lm_eval_console_script():
    """lm_eval's own command (the `lm_eval` console script next to this Python), else `python -m lm_eval`."""
    script = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "lm_eval"]


@pytest.mark.slow
def test_command_line_heft_scores_the_full_chat_prompt(chat_saved, tmp_path):
    """`python -m peft_heft.lm_eval --model heft --apply_chat_template ...`, batch size 8: every logged
    log-likelihood equals the direct scoring on the full prompt (the template's trailing "\n" included)."""
    root, _ = chat_saved
    run = run_cli(
        [sys.executable, "-m", "peft_heft.lm_eval", "--model", "heft", "--model_args", model_args(root)]
        + ["--tasks", "heft_chat", "--include_path", str(root / "tasks"), "--batch_size", "8", "--device", "cpu"]
        + ["--apply_chat_template", "--log_samples", "--output_path", str(tmp_path / "out")],
        tmp_path,
        autoload=False,  # the entry point imports peft_heft itself
    )
    assert run.returncode == 0, run.stderr[-3000:]
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs]
    samples_file = next(f for f in written if os.path.basename(f).startswith("samples_heft_chat"))
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
    pairs = [[(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()] for s in samples]
    assert all(context.endswith("<|assistant|>\n") for doc in pairs for context, _ in doc), pairs[0]
    got = torch.tensor([[float(r[0][0]) for r in s["resps"]] for s in samples], dtype=torch.float64)
    model, tokenizer = loaded(root, chat_tokenizer)
    torch.testing.assert_close(got, full_prompt_scores(model, tokenizer, pairs), rtol=0, atol=1e-4)
    accuracy = json.load(open(next(f for f in written if os.path.basename(f).startswith("results"))))
    assert accuracy["results"]["heft_chat"]["acc,none"] == pytest.approx(
        evaluate(root, "heft_chat", apply_chat_template=True)["results"]["heft_chat"]["acc,none"]
    )


@pytest.mark.slow
def test_command_line_hf_model_on_a_heft_adapter_is_stopped(saved, tmp_path):
    """lm_eval's own command with `--model hf --model_args ...,peft=HEFT_ADAPTER` (the usual way to evaluate a PEFT
    adapter) exits with the error naming --model heft and writes no results; `python -m peft_heft.lm_eval --model hf`
    refuses before loading anything."""
    root, _ = saved
    common = ["--tasks", "heft_yesno", "--include_path", str(root / "tasks"), "--device", "cpu"]
    for batch_size in ("1", "8"):
        plain = run_cli(
            [*lm_eval_console_script(), "--model", "hf", "--model_args", model_args(root), *common]
            + ["--batch_size", batch_size, "--output_path", str(tmp_path / f"out{batch_size}")],
            tmp_path,
        )
        assert plain.returncode != 0, plain.stdout[-2000:]
        assert "python -m peft_heft.lm_eval --model heft" in plain.stderr, plain.stderr[-3000:]
        assert not (tmp_path / f"out{batch_size}").exists()
    refused = run_cli(
        [sys.executable, "-m", "peft_heft.lm_eval", "--model", "hf", "--model_args", model_args(root), *common],
        tmp_path,
        autoload=False,
    )
    assert refused.returncode != 0 and "run it with --model heft" in refused.stderr, refused.stderr[-2000:]
