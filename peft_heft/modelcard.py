"""Model cards (README.md) for HEFT adapters: what a user of the Hub needs to load and judge one.

:func:`update_model_card` writes the HEFT section (settings of both stages, the loading and evaluation snippets,
which need ``import peft_heft``). Its writers are HEFT's own:

* ``StagedSFTTrainer`` / ``HeftDPOTrainer``: every ``save_model`` and ``create_model_card`` (which
  ``trainer.push_to_hub`` calls) add it, with the training schedule of each stage, the data set and the metrics;
* a user who saves with ``model.save_pretrained`` / ``model.push_to_hub`` gets PEFT's and transformers' card, as for
  any PEFT method (peft-heft changes nothing in PEFT), and calls :func:`update_model_card` on the folder to add the
  HEFT section.

The HEFT section sits between two HTML comments and is replaced on each save, so anything else a user wrote in the
card is kept as it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .tuner.config import HeftConfig

SECTION_BEGIN = "<!-- peft-heft: begin (this section is rewritten on save) -->"
SECTION_END = "<!-- peft-heft: end -->"
PAPER = "https://arxiv.org/abs/2509.09801"
CARD_TAGS = ("peft-heft", "heft", "lora", "reft")


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple, set)):
        return ", ".join(str(v) for v in (sorted(value) if isinstance(value, set) else value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def heft_settings_table(config: HeftConfig) -> str:
    """A markdown table of both stages' settings, read from a :class:`HeftConfig`."""
    rows = [
        ("1. LoRA (weight space)", "r", config.r),
        ("", "lora_alpha", config.lora_alpha),
        ("", "lora_dropout", config.lora_dropout),
        ("", "target_modules", config.target_modules),
        ("2. ReFT (representation space)", "intervention_type", config.intervention_type),
        ("", "intervention_layers", config.intervention_layers),
        ("", "intervention_rank", config.intervention_rank),
        ("", "intervention_positions", config.intervention_positions),
        ("", "intervention_component", config.intervention_component),
        ("", "share_intervention_weights", config.share_intervention_weights),
    ]
    lines = ["| stage | setting | value |", "|---|---|---|"]
    lines += [f"| {stage} | `{name}` | {_fmt(value)} |" for stage, name, value in rows]
    return "\n".join(lines)


def loading_snippet(model_id: str, base_model: str | None = None) -> str:
    """The code that loads the adapter (``import peft_heft`` first, then PEFT as usual), and how to evaluate it with
    lm-evaluation-harness: only through peft-heft's ``heft`` model, since other scorers misplace the interventions."""
    base = base_model or "BASE_MODEL"
    return (
        "```python\n"
        "import peft_heft  # registers the HEFT method with PEFT; needed before loading this adapter\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoTokenizer\n\n"
        f'model = AutoPeftModelForCausalLM.from_pretrained("{model_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained(model.peft_config["default"].base_model_name_or_path)\n'
        "```\n\n"
        "Needs `pip install peft-heft`. `import peft_heft` registers the `HEFT` method with PEFT (a regular install "
        "also does it when `peft` is imported); where HEFT is not registered, loading stops with `KeyError: 'HEFT'`.\n\n"
        "Evaluate it with lm-evaluation-harness through peft-heft's `heft` model (`pip install 'peft-heft[lm-eval]'`):\n\n"
        "```bash\n"
        f"python -m peft_heft.lm_eval --model heft --model_args pretrained={base},peft={model_id} --tasks TASK\n"
        "```\n\n"
        "It puts the ReFT interventions on each request's prompt, as training and `generate()` do. lm_eval's own "
        "`--model hf` stops with an error on this adapter. Any other scorer that runs prompt + answer through "
        "`model(input_ids)` gets the interventions on the answer too, **with no error**: pass "
        "`intervention_prompt_lengths=` (the prompt's token count of each row) with such calls. Serving engines "
        "(vLLM, TGI, ...) do not apply the interventions."
    )


def replace_quick_start(card_path: str, model_id: str) -> None:
    """Replace the ``## Quick start`` section TRL writes (a plain ``pipeline``, which cannot load a HEFT adapter) by
    :func:`loading_snippet`."""
    with open(card_path, encoding="utf-8") as handle:
        text = handle.read()
    text = re.sub(
        r"## Quick start\n.*?(?=\n## )",
        lambda _: "## Quick start\n\n" + loading_snippet(model_id) + "\n",
        text,
        count=1,
        flags=re.DOTALL,
    )
    with open(card_path, "w", encoding="utf-8") as handle:
        handle.write(text)


def heft_card_section(
    config: HeftConfig,
    model_id: str,
    *,
    training: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    search: Mapping[str, Any] | None = None,
) -> str:
    """The HEFT part of a model card.

    Args:
        config: the adapter's :class:`HeftConfig`.
        model_id: how users load the adapter (a Hub repo id or a local path), used in the snippet.
        training: per-stage schedule, e.g. ``{"lora": {"epochs": 3, "learning_rate": 2e-4}, "reft": {...}}``; the
            key order is the stage order.
        dataset_name: the training data, when known.
        metrics: name -> value (e.g. ``{"lora_train_loss": 0.41, "eval_accuracy": 0.86}``).
        search: the record of a fine-stage search (``search/study.json``, as ``run_fine_stage_search``
            writes it): its trials are summarized, best first.

    Returns:
        Markdown between :data:`SECTION_BEGIN` and :data:`SECTION_END`.

    Example:
    ```python
    >>> print(heft_card_section(model.peft_config["default"], "me/my-adapter"))
    ```
    """
    parts = [
        SECTION_BEGIN,
        "## HEFT adapter",
        "",
        f"Trained with [HEFT]({PAPER}) (coarse-to-fine PEFT) through the `peft-heft` plugin for PEFT: a LoRA "
        "stage adapts the weights, then LoReFT "
        "interventions on hidden states are trained on the frozen LoRA-adapted model. The adapter holds both.",
        "",
        "### Load it",
        "",
        loading_snippet(model_id, config.base_model_name_or_path),
        "",
        f"Base model: `{config.base_model_name_or_path}`." if config.base_model_name_or_path else "",
        "",
        "### HEFT settings",
        "",
        heft_settings_table(config),
    ]
    if training:
        parts += [
            "",
            "### Training",
            "",
            "| stage | " + " | ".join(_training_columns(training)) + " |",
            "|---|" + "---|" * len(_training_columns(training)),
        ]
        for stage, options in training.items():
            parts.append(
                f"| {stage} | " + " | ".join(_fmt(options.get(c, "-")) for c in _training_columns(training)) + " |"
            )
        if dataset_name:
            parts += ["", f"Training data: `{dataset_name}`."]
    elif dataset_name:
        parts += ["", f"Training data: `{dataset_name}`."]
    if search:
        parts += ["", search_card_section(search)]
    if metrics:
        parts += ["", "### Results", "", "| metric | value |", "|---|---|"]
        parts += [f"| {name} | {_fmt(value)} |" for name, value in metrics.items()]
    parts += ["", SECTION_END]
    return "\n".join(parts)


SEARCH_TRIALS_SHOWN = 10


def search_card_section(record: Mapping[str, Any]) -> str:
    """The model card's summary of a fine-stage search: counts, the metric, and the best trials' settings."""
    trials = list(record.get("trials", []))
    states: dict[str, int] = {}
    for trial in trials:
        states[trial["state"]] = states.get(trial["state"], 0) + 1
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    minimize = record.get("direction") == "minimize"
    done = sorted(
        (t for t in trials if t["state"] == "complete" and t.get("value") is not None),
        key=lambda t: t["value"] if minimize else -t["value"],
    )
    seconds = sum(t.get("duration_s") or 0.0 for t in trials)
    lines = [
        "### Fine-stage search",
        "",
        f"The ReFT stage was chosen by a search over {len(trials)} trials ({counts}) with Optuna, all from the same "
        f"LoRA stage: metric `{record.get('metric')}` ({record.get('direction')}), {seconds / 60:.1f} min of trials "
        f"in all. The adapter holds trial {record.get('best_trial')} ({_fmt(record.get('best_value'))}); its "
        "settings are in the table above.",
    ]
    if done:
        keys: list[str] = []
        for trial in done:
            keys += [k for k in trial["params"] if k not in keys]
        shown = done[:SEARCH_TRIALS_SHOWN]
        lines += [
            "",
            "| trial | " + record.get("metric", "value") + " | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        lines += [
            f"| {t['number']} | {_fmt(t['value'])} | " + " | ".join(_fmt(t["params"].get(k, "-")) for k in keys) + " |"
            for t in shown
        ]
        if len(done) > len(shown):
            lines += ["", f"{len(done) - len(shown)} more complete trials are in `search/study.json`."]
    return "\n".join(lines)


def _training_columns(training: Mapping[str, Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for options in training.values():
        columns += [c for c in options if c not in columns]
    return columns


def update_model_card(
    output_dir: str | os.PathLike,
    config: HeftConfig,
    *,
    model_id: str | None = None,
    training: Mapping[str, Any] | None = None,
    dataset_name: str | Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    tags: Sequence[str] = (),
    search: Mapping[str, Any] | None = None,
) -> str:
    """Write or update ``output_dir/README.md`` with the HEFT section and card metadata; returns the card's path.

    Args:
        output_dir (`str` or `PathLike`): the adapter folder.
        config (`HeftConfig`): the adapter's configuration.
        model_id (`str`, *optional*): the id used in the loading snippet (default: `output_dir`).
        training (`dict`, *optional*): per-stage schedule, see :func:`heft_card_section`.
        dataset_name (`str` or `list[str]`, *optional*): the training data.
        metrics (`dict`, *optional*): name -> value.
        tags (`list[str]`): extra tags.
        search (`dict`, *optional*): a fine-stage search's record, see :func:`heft_card_section`.

    Returns:
        `str`: the path of the card.

    Metadata: ``library_name: peft``, ``base_model``, tags (``peft-heft``, ``heft``, ``lora``, ``reft`` + ``tags``),
    ``datasets`` when the name looks like a Hub id. An existing card keeps its other text and metadata.

    Example:
    ```python
    >>> from peft_heft.modelcard import update_model_card
    >>> update_model_card("my-adapter", model.peft_config["default"], model_id="me/my-adapter")
    ```
    """
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(output_dir, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    data = card.data
    data.library_name = "peft"  # loaded with PEFT (a card from transformers' push_to_hub says "transformers")
    base = config.base_model_name_or_path
    if base and not os.path.isdir(base) and not data.base_model:
        data.base_model = base
    data.tags = sorted(set(data.tags or []) | set(CARD_TAGS) | set(tags))
    names = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    hub_names = [n for n in names if re.fullmatch(r"[\w.-]+/[\w.-]+", n) and not os.path.exists(n)]
    if hub_names:
        data.datasets = sorted(set(data.datasets or []) | set(hub_names))
    section = heft_card_section(
        config,
        model_id or os.fspath(output_dir),
        training=training,
        dataset_name=", ".join(names) if names else None,
        metrics=metrics,
        search=search,
    )
    text = card.text
    pattern = re.compile(re.escape(SECTION_BEGIN) + r".*?" + re.escape(SECTION_END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        heading = re.search(r"^# .*$", text, re.MULTILINE)
        at = heading.end() if heading else 0
        text = text[:at] + "\n\n" + section + "\n\n" + text[at:].lstrip("\n")
    card.text = text
    card.save(path)
    return path
