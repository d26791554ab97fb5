"""lm-evaluation-harness on a HEFT adapter (local task YAMLs, tiny model saved to disk): the ``heft`` model's
log-likelihoods equal a direct scoring with the context's locations given explicitly, do not depend on the batch
size, and its accuracy equals ``peft_heft.evaluation``'s; ``generate_until`` equals HEFT's ``generate``; lm_eval's
plain ``hf`` model is shown to be wrong on the same adapter (and the entry point refuses it)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_interventions
from peft import PeftModel, get_peft_model
from sft_fixtures import tiny_sft_model, tiny_tokenizer, yes_no_rows

from peft_heft import HeftConfig, compute_locations
from peft_heft.evaluation import evaluate_choice_accuracy

lm_eval = pytest.importorskip("lm_eval")
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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base model and tokenizer on disk, a HEFT adapter whose interventions change the scores, and tasks."""
    root = tmp_path_factory.mktemp("lm_eval")
    base, tokenizer = tiny_sft_model(), tiny_tokenizer()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
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
    model.save_pretrained(root / "adapter")
    rows = [{"question": q, "answer": a, "label": CHOICES.index(f" {a} it big")} for q, a in yes_no_rows(20, seed=4)]
    with open(root / "data.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    tasks = root / "tasks"
    tasks.mkdir()
    for name, text in (("mc", MC_TASK), ("gen", GEN_TASK), ("rolling", ROLLING_TASK)):
        (tasks / f"{name}.yaml").write_text(text.format(data=root / "data.jsonl", choices=json.dumps(CHOICES)))
    return root, rows


def loaded(root):
    model = PeftModel.from_pretrained(tiny_sft_model_from(root), root / "adapter").eval()
    return model, tiny_tokenizer()


def tiny_sft_model_from(root):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)


def evaluate(root, task, model="heft", batch_size=1, limit=None):
    args = f"pretrained={root / 'base'},peft={root / 'adapter'},tokenizer={root / 'base'},dtype=float32,device=cpu"
    return lm_eval.simple_evaluate(
        model=model,
        model_args=args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(root / "tasks")),
        batch_size=batch_size,
        log_samples=True,
        limit=limit,
    )


def loglikelihoods(results, task):
    """Per document, per choice: lm_eval's log-likelihood (in document order)."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return torch.tensor([[float(r[0][0]) for r in s["resps"]] for s in samples], dtype=torch.float64)


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


def test_loglikelihoods_equal_direct_scoring_at_batch_sizes_1_and_8(saved):
    root, rows = saved
    model, tokenizer = loaded(root)
    reference = direct_scores(model, tokenizer, rows)
    one = loglikelihoods(evaluate(root, "heft_yesno", batch_size=1), "heft_yesno")
    eight_results = evaluate(root, "heft_yesno", batch_size=8)
    eight = loglikelihoods(eight_results, "heft_yesno")
    torch.testing.assert_close(one, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(eight, reference, rtol=0, atol=1e-4)
    # the accuracy lm_eval reports is peft_heft.evaluation's on the same data
    ours = evaluate_choice_accuracy(
        model, tokenizer, [f"{r['question']} Answer:" for r in rows], [CHOICES] * len(rows), [r["label"] for r in rows]
    )
    assert eight_results["results"]["heft_yesno"]["acc,none"] == pytest.approx(ours["accuracy"], abs=1e-9)
    torch.testing.assert_close(torch.tensor(ours["scores"], dtype=torch.float64), reference, rtol=0, atol=1e-4)

    # lm_eval's plain `hf` model on the same adapter: interventions on the answers and the padding, scores move
    plain_one = loglikelihoods(evaluate(root, "heft_yesno", model="hf", batch_size=1), "heft_yesno")
    plain_eight = loglikelihoods(evaluate(root, "heft_yesno", model="hf", batch_size=8), "heft_yesno")
    assert (plain_one - reference).abs().max() > 0.05
    assert (plain_eight - plain_one).abs().max() > 0.05


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


def test_entry_point_runs_lm_eval_and_refuses_hf_with_a_heft_adapter(saved, tmp_path):
    root, _ = saved
    args = f"pretrained={root / 'base'},peft={root / 'adapter'},tokenizer={root / 'base'},dtype=float32"
    common = ["--tasks", "heft_yesno", "--include_path", str(root / "tasks"), "--batch_size", "8", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFT_HEFT_NO_AUTOLOAD": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "peft_heft.lm_eval", "--model", "heft", "--model_args", args, *common]
        + ["--output_path", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith(".json")]
    assert written, os.listdir(tmp_path / "out")
    accuracy = json.load(open(written[0]))["results"]["heft_yesno"]["acc,none"]
    assert accuracy == pytest.approx(evaluate(root, "heft_yesno", batch_size=1)["results"]["heft_yesno"]["acc,none"])
    refused = subprocess.run(
        [sys.executable, "-m", "peft_heft.lm_eval", "--model", "hf", "--model_args", args, *common],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert refused.returncode != 0 and "run it with --model heft" in refused.stderr, refused.stderr[-2000:]
