"""The fine-stage search (``run_fine_stage_search``) and ``HeftModel.replace_interventions``, on the
tiny models of ``sft_fixtures``."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from sft_fixtures import cpu_sft_args, make_dataset, sft_heft_config, tiny_sft_model, tiny_tokenizer

import peft_heft
from peft_heft import HeftCallback, StagedSFTTrainer

optuna = pytest.importorskip("optuna")

from peft_heft.trainer.search import FineStageSearchSpace, run_fine_stage_search  # noqa: E402

SPACE = dict(layers=["all", [1]], positions=[1, 2], ranks=[1, 2], learning_rate=(1e-3, 1e-2), epochs=None)


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and got
    different = [n for n in want if not torch.equal(got[n], want[n])]
    assert not different, different


class Recorder(HeftCallback):
    """Records the LoRA weights when the coarse stage ends and when each fine stage starts and ends; counts steps
    per stage; optionally perturbs LoRA after each fine stage (the next trial must restore it)."""

    def __init__(self, perturb: bool = False) -> None:
        self.perturb = perturb
        self.stage = None
        self.coarse = None
        self.fine_starts: list[dict[str, torch.Tensor]] = []
        self.fine_ends: list[dict[str, torch.Tensor]] = []
        self.steps = {"lora": 0, "reft": 0}

    def on_stage_begin(self, args, state, control, stage=None, model=None, **kwargs):
        self.stage = stage
        if stage == "reft":
            self.fine_starts.append(lora_tensors(model))

    def on_step_end(self, args, state, control, **kwargs):
        self.steps[self.stage] += 1

    def on_stage_end(self, args, state, control, stage=None, model=None, **kwargs):
        if stage == "lora":
            self.coarse = lora_tensors(model)
        else:
            self.fine_ends.append(lora_tensors(model))
            if self.perturb:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)


class PruneOddTrials(optuna.pruners.BasePruner):
    """Prunes trials with an odd number at their first report: deterministic, whatever the losses."""

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1 and bool(trial.intermediate_values)


def make_trainer(output_dir, recorder=None, model=None, eval_dataset=True, **overrides):
    evaluation = dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=16) if eval_dataset else {}
    args = cpu_sft_args(str(output_dir), **{**evaluation, **overrides})
    return StagedSFTTrainer(
        model if model is not None else tiny_sft_model(),
        args=args,
        train_dataset=make_dataset("prompt_completion", 32),
        eval_dataset=make_dataset("prompt_completion", 16, seed=1) if eval_dataset else None,
        processing_class=tiny_tokenizer(),
        peft_config=None if model is not None else sft_heft_config(),
        callbacks=[recorder] if recorder is not None else None,
    )


def test_search_prunes_restores_coarse_bitwise_and_saves_the_best(tmp_path):
    recorder = Recorder(perturb=True)
    trainer = make_trainer(tmp_path / "out", recorder)
    import matplotlib

    backend = matplotlib.get_backend()
    study = run_fine_stage_search(trainer, 4, FineStageSearchSpace(**SPACE), pruner=PruneOddTrials())
    assert matplotlib.get_backend() == backend  # study.png drawn without switching the process's backend
    assert (tmp_path / "out" / "search" / "study.png").stat().st_size > 0

    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    assert recorder.steps["lora"] == 6  # the coarse stage ran once
    # every trial starts from the coarse weights, bitwise, although each trial's end perturbs them
    assert len(recorder.fine_starts) == 4
    for start in recorder.fine_starts:
        assert_bitwise(start, recorder.coarse)
    # the fine stage never changes LoRA (the perturbation comes after the recording at the stage's end)
    for end in recorder.fine_ends:
        assert_bitwise(end, recorder.coarse)
    assert_bitwise(lora_tensors(trainer.model), recorder.coarse)

    record = json.loads((tmp_path / "out" / "search" / "study.json").read_text())
    assert [t["number"] for t in record["trials"]] == [0, 1, 2, 3]
    assert [t["state"] for t in record["trials"]] == ["complete", "pruned", "complete", "pruned"]
    for saved, trial in zip(record["trials"], study.trials, strict=True):
        assert saved["params"] == trial.params and set(saved["params"]) >= {"layers", "positions", "rank"}
        assert saved["duration_s"] is not None and saved["duration_s"] > 0
        if trial.state.name == "COMPLETE":
            assert saved["value"] == pytest.approx(trial.value)
    assert record["best_trial"] == study.best_trial.number and record["best_value"] == study.best_value
    assert os.path.getsize(tmp_path / "out" / "search" / "study.png") > 1000

    # the best trial is on the model and saves as a normal HEFT adapter with its settings
    best = study.best_trial
    config = trainer.model.peft_config["default"]
    assert config.intervention_positions == f"f{best.params['positions']}+l{best.params['positions']}"
    assert config.intervention_rank == best.params["rank"]
    assert config.intervention_type == best.params["intervention_type"]
    assert trainer.args.reft_learning_rate == pytest.approx(best.params["learning_rate"])
    trainer.save_model(str(tmp_path / "best"))
    reloaded = PeftModel.from_pretrained(tiny_sft_model(), str(tmp_path / "best"))
    assert reloaded.peft_config["default"].intervention_layers == config.intervention_layers
    assert_bitwise(lora_tensors(reloaded), {n: t for n, t in recorder.coarse.items()})
    evaluator = make_trainer(tmp_path / "eval", model=reloaded)
    assert evaluator.evaluate()["eval_loss"] == pytest.approx(study.best_value, abs=1e-5)


def test_pruning_by_threshold_stops_the_trial_early(tmp_path):
    """Optuna's own pruner, with an upper bound below any loss: each trial stops at its first report after warmup."""
    recorder = Recorder()
    trainer = make_trainer(tmp_path / "out", recorder)
    pruner = optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=3)
    study = run_fine_stage_search(trainer, 2, FineStageSearchSpace(**SPACE), pruner=pruner)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    assert [sorted(t.intermediate_values) for t in study.trials] == [[2, 4], [2, 4]]
    assert recorder.steps["reft"] == 2 * 4  # stopped at step 4 of 6
    assert json.loads((tmp_path / "out" / "search" / "study.json").read_text())["best_trial"] is None


@pytest.mark.parametrize(
    "space, message",
    [
        (dict(layers=[[0, 5]]), "contains 5, but the model has 2 decoder layers"),
        (dict(ranks=[2, 64]), "larger than the model's hidden size 32"),
        (dict(intervention_types=["nope"]), "Unknown intervention_type"),
    ],
)
def test_impossible_search_space_is_refused_before_any_training(tmp_path, space, message):
    recorder = Recorder()
    trainer = make_trainer(tmp_path / "out", recorder)
    with pytest.raises(ValueError, match=message):
        run_fine_stage_search(trainer, 2, FineStageSearchSpace(**{**SPACE, **space}))
    assert recorder.steps == {"lora": 0, "reft": 0}
    assert not (tmp_path / "out" / "search").exists()


def test_search_refuses_setups_it_cannot_run(tmp_path, monkeypatch):
    recorder = Recorder()
    trainer = make_trainer(tmp_path / "out", recorder)
    with pytest.raises(ValueError, match="not computed"):
        run_fine_stage_search(trainer, 2, metric="accuracy")
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match="run the search in one process"):
        run_fine_stage_search(trainer, 2)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match="pip install optuna"):
        run_fine_stage_search(trainer, 2)
    monkeypatch.undo()
    no_eval = make_trainer(tmp_path / "out2", recorder, eval_dataset=False)
    with pytest.raises(ValueError, match="no eval_dataset"):
        run_fine_stage_search(no_eval, 2)
    assert recorder.steps == {"lora": 0, "reft": 0}


def test_resumed_study_continues_numbering_without_retraining_the_coarse_stage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first = Recorder()
    run_fine_stage_search(make_trainer(tmp_path / "out", first), 2, FineStageSearchSpace(**SPACE), storage=storage)
    assert first.steps["lora"] == 6

    second = Recorder()
    trainer = make_trainer(tmp_path / "out", second)  # a new process: a fresh model, untrained LoRA
    study = run_fine_stage_search(trainer, 2, FineStageSearchSpace(**SPACE), storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert [t.params for t in study.trials[2:]] != [t.params for t in study.trials[:2]]  # no replayed suggestions
    assert second.steps["lora"] == 0  # reloaded from out/search/coarse
    assert second.steps["reft"] > 0
    for start in second.fine_starts:
        assert_bitwise(start, first.coarse)
    record = json.loads((tmp_path / "out" / "search" / "study.json").read_text())
    assert [t["number"] for t in record["trials"]] == [0, 1, 2, 3]
    assert all(t["state"] == "complete" and t["value"] is not None for t in record["trials"])
    # the best of all four trials is on the model, whichever run found it
    assert trainer.evaluate()["eval_loss"] == pytest.approx(study.best_value, abs=1e-5)

    # a rerun whose one trial cannot win (it hardly trains): the best trial is an earlier process's, and its
    # weights come back from out/search/best
    later = make_trainer(tmp_path / "out", Recorder())
    tiny_lr = FineStageSearchSpace(**{**SPACE, "learning_rate": (1e-7, 1e-7)})
    study = run_fine_stage_search(later, 1, tiny_lr, storage=storage)
    assert len(study.trials) == 5 and study.best_trial.number < 4
    assert later.evaluate()["eval_loss"] == pytest.approx(study.best_value, abs=1e-5)
    assert later.model.peft_config["default"].intervention_rank == study.best_trial.params["rank"]

    # another LoRA schedule: the stored study (run on the old coarse stage) refuses to continue, before training;
    # a new study trains the coarse stage again instead of reusing the saved one
    third = Recorder()
    other = make_trainer(tmp_path / "out", third, lora_learning_rate=5e-3)
    with pytest.raises(ValueError, match="other LoRA settings"):
        run_fine_stage_search(other, 1, FineStageSearchSpace(**SPACE), storage=storage)
    assert third.steps["lora"] == 0
    run_fine_stage_search(other, 1, FineStageSearchSpace(**SPACE), storage=storage, study_name="another")
    assert third.steps["lora"] == 6
    assert any(not torch.equal(third.coarse[n], first.coarse[n]) for n in first.coarse)


def test_replace_interventions_validates_first_and_keeps_lora(tmp_path):
    model = get_peft_model(tiny_sft_model(), sft_heft_config())
    tuner = model.base_model
    lora = lora_tensors(model)
    before = dict(tuner.heft_interventions["default"].items())
    for bad, error in [
        (dict(intervention_layers=[0, 2]), ValueError),
        (dict(intervention_rank=33), ValueError),
        (dict(intervention_rank=True), TypeError),
        (dict(intervention_positions="f2+x"), ValueError),
        (dict(r=8), ValueError),
    ]:
        with pytest.raises(error):
            tuner.replace_interventions("default", **bad)
        assert dict(tuner.heft_interventions["default"].items()) == before  # the same modules: nothing changed
        assert tuner.peft_config["default"].intervention_rank == 2
    model.set_stage("reft")
    tuner.replace_interventions(
        "default",
        intervention_layers=[1],
        intervention_rank=3,
        intervention_positions="f3+l3",
        intervention_type="noreft",
    )
    assert list(tuner.heft_interventions["default"]) == ["layer1_first", "layer1_last"]
    assert all(p.requires_grad for p in tuner.heft_interventions["default"].parameters())
    assert not any(p.requires_grad for p in lora_tensors(model).values())
    assert_bitwise(lora_tensors(model), lora)
    ids = torch.tensor([[1, 7, 8, 9, 10, 11, 12, 13]])
    with torch.no_grad():
        out = model(input_ids=ids).logits
        model.base_model.disable_adapter_layers()
        base = model(input_ids=ids).logits
        model.base_model.enable_adapter_layers()
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_sft_model(), str(tmp_path))
    config = loaded.peft_config["default"]
    assert (config.intervention_layers, config.intervention_rank, config.intervention_type) == ([1], 3, "noreft")
    with torch.no_grad():
        again = loaded(input_ids=ids).logits
    assert torch.allclose(again, out, atol=1e-6) and not torch.allclose(again, base, atol=1e-4)
    assert peft_heft.HeftModel.replace_interventions.__doc__


def run_cli_search(tmp_path, *extra: str):
    """`heft-sft --search 2` on the tiny model and a local JSONL file; returns (results, output folder, model, data)."""
    from peft_heft.cli import train_from_args

    model_dir = tmp_path / "tiny-model"
    tiny_sft_model().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in make_dataset("prompt_completion", 48)))
    out = tmp_path / "run"
    flags = dict(
        model_name_or_path=model_dir, dataset_name=data, output_dir=out, lora_r=4, lora_alpha=8,
        lora_task_type="CAUSAL_LM", intervention_layers="0,1", intervention_rank=2, intervention_positions="f2+l2",
        lora_max_steps=4, reft_max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        report_to="none", save_strategy="no", eval_strategy="no", eval_split_size=16, max_length=64,
        search=2, search_storage=f"sqlite:///{tmp_path / 'cli.db'}", use_cpu=True, bf16=False, disable_tqdm=True,
    )  # fmt: skip
    argv = [item for key, value in flags.items() for item in (f"--{key}", str(value))]
    argv += ["--lora_target_modules", "q_proj", "v_proj", "--gradient_checkpointing", "False", *extra]
    return train_from_args(argv), out, model_dir, data


def test_heft_sft_search_flag_saves_the_best_trial(tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM

    results, out, model_dir, data = run_cli_search(tmp_path)
    assert results["search"]["metric"] == "eval_loss"
    assert results["search"]["trials"] == 2 and results["train"]["lora_train_steps"] == 4
    record = json.loads((out / "search" / "study.json").read_text())
    assert record["best_trial"] == results["search"]["best_trial"] is not None
    saved = json.loads((out / "adapter_config.json").read_text())
    best = record["best_params"]
    assert saved["intervention_rank"] == best["rank"] and saved["intervention_type"] == best["intervention_type"]
    assert saved["intervention_positions"] == f"f{best['positions']}+l{best['positions']}"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    held_out = load_dataset("json", data_files=str(data))["train"].train_test_split(test_size=16, seed=42)["test"]
    evaluator = StagedSFTTrainer(
        reloaded,
        args=cpu_sft_args(str(tmp_path / "eval"), per_device_eval_batch_size=16),
        train_dataset=make_dataset("prompt_completion", 8),
        eval_dataset=held_out,
        processing_class=tiny_tokenizer(),
    )
    assert evaluator.evaluate()["eval_loss"] == pytest.approx(record["best_value"], abs=1e-5)


def test_search_example_runs_in_fast_mode(tmp_path):
    import re
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "search_fine_stage.py"), "--fast", "--output_dir", "run"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert len(re.findall(r"^\[trial \d+\]", proc.stdout, flags=re.MULTILINE)) == 3
    best = float(re.search(r"^\[best\] trial \d+ eval_loss ([0-9.]+)", proc.stdout, flags=re.MULTILINE)[1])
    again = float(re.search(r"reloaded with PeftModel.from_pretrained: eval_loss ([0-9.]+)", proc.stdout)[1])
    assert again == pytest.approx(best, abs=1e-5)
    assert (tmp_path / "run" / "search" / "study.json").is_file() and (tmp_path / "run" / "search.db").is_file()


# ---------------------------------------------------------------------------------------- generation accuracy metric
def accuracy_callback(**overrides):
    from peft_heft import GenerationAccuracyCallback

    kwargs = dict(choices=["yes", "no"], max_new_tokens=2, batch_size=16)
    kwargs.update(overrides)
    return GenerationAccuracyCallback(make_dataset("prompt_completion", 16, seed=1), tiny_tokenizer(), **kwargs)


def test_generation_accuracy_is_an_evaluation_metric_and_in_the_log(tmp_path):
    from peft_heft.evaluation import evaluate_generation_accuracy

    callback = accuracy_callback()
    trainer = make_trainer(tmp_path / "out", lora_max_steps=4, reft_max_steps=4)
    trainer.add_callback(callback)
    trainer.train()
    evaluations = [e for e in trainer.stage_log_history if "eval_loss" in e]
    assert len(evaluations) >= 4 and all(0.0 <= e["eval_accuracy"] <= 1.0 for e in evaluations)
    direct = evaluate_generation_accuracy(
        trainer.model, tiny_tokenizer(), make_dataset("prompt_completion", 16, seed=1), choices=["yes", "no"],
        max_new_tokens=2,
    )  # fmt: skip
    # the last evaluation ran on the final model: the same answers as a direct evaluation afterwards
    assert evaluations[-1]["eval_accuracy"] == direct["accuracy"]
    assert callback.last["predictions"] == direct["predictions"]
    assert trainer.evaluate()["eval_accuracy"] == direct["accuracy"]


def test_bad_accuracy_rows_are_refused_when_the_callback_is_built():
    from peft_heft import GenerationAccuracyCallback

    with pytest.raises(ValueError, match=r"Reference answers \['no', 'yes'\] are not among choices"):
        GenerationAccuracyCallback(make_dataset("prompt_completion", 8), tiny_tokenizer(), choices=["true", "false"])
    with pytest.raises(ValueError, match="must start with 'eval_'"):
        accuracy_callback(metric_name="accuracy")
    with pytest.raises(ValueError, match="empty"):
        GenerationAccuracyCallback([], tiny_tokenizer())


class ValuesSeen(HeftCallback):
    """The metric values every evaluation of each trial produced, in order."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.values.append(metrics["eval_accuracy"])


def test_search_on_generation_accuracy_maximizes_it_and_the_card_summarizes_the_study(tmp_path):
    from peft_heft.evaluation import evaluate_generation_accuracy

    trainer = make_trainer(tmp_path / "out", lora_max_steps=4, reft_max_steps=4)
    trainer.add_callback(accuracy_callback())
    seen = ValuesSeen()
    trainer.add_callback(seen)
    study = run_fine_stage_search(trainer, 3, FineStageSearchSpace(**SPACE), metric="eval_accuracy")
    assert study.direction.name == "MAXIMIZE"
    assert all(0.0 <= t.value <= 1.0 for t in study.trials if t.value is not None)
    for trial in study.trials:  # every evaluation of a trial reported the accuracy to the pruner
        assert set(trial.intermediate_values.values()) <= set(seen.values)
    best = study.best_trial
    assert best.value == max(t.value for t in study.trials if t.value is not None)
    direct = evaluate_generation_accuracy(
        trainer.model, tiny_tokenizer(), make_dataset("prompt_completion", 16, seed=1), choices=["yes", "no"],
        max_new_tokens=2,
    )  # fmt: skip
    assert direct["accuracy"] == best.value  # the model holds the best trial

    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "### Fine-stage search" in card
    assert "over 3 trials (3 complete) with Optuna" in card and "metric `eval_accuracy` (maximize)" in card
    assert f"The adapter holds trial {best.number} ({best.value:.4g})" in card
    rows = [line for line in card.splitlines() if re.match(r"^\| \d+ \| ", line)]
    assert len(rows) == 3
    assert rows[0].startswith(f"| {best.number} | ")  # best first
    assert f"| {best.params['rank']} |" in rows[0]


def test_heft_sft_search_on_generation_accuracy(tmp_path):
    results, out, _, _ = run_cli_search(
        tmp_path, "--eval_accuracy", "--answer_choices", "yes,no", "--max_new_tokens", "2"
    )
    record = json.loads((out / "search" / "study.json").read_text())
    assert results["search"]["metric"] == record["metric"] == "eval_accuracy" and record["direction"] == "maximize"
    values = [t["value"] for t in record["trials"] if t["value"] is not None]
    assert record["best_value"] == max(values)
    # the saved adapter is the best trial: the final generation accuracy on the same split is its value
    assert results["generation_accuracy"]["accuracy"] == record["best_value"]
    assert results["generation_accuracy"]["total"] == 16
    with pytest.raises(ValueError, match="--search_metric eval_accuracy needs --eval_accuracy"):
        run_cli_search(tmp_path / "again", "--search_metric", "eval_accuracy")
