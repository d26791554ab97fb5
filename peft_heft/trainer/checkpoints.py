"""Stage-aware checkpoints: a completion marker written last, and finding where to resume.

`Trainer` writes a checkpoint file by file. A checkpoint of [`StagedSFTTrainer`] counts as complete only once
``heft_checkpoint.json`` is in it: that file is written last, after every other file is flushed to disk, through a
temporary file and an atomic rename. A crash mid-save leaves a folder without it, which resuming refuses.
"""

from __future__ import annotations

import json
import os
import re

MARKER_NAME = "heft_checkpoint.json"
_STAGE_DIR_RE = re.compile(r"^stage-(\d+)-(lora|reft|joint)$")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def stage_dir_name(index: int, stage: str) -> str:
    return f"stage-{index}-{stage}"


def _fsync_path(path: str) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. directories on some filesystems
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """Flush every file under ``folder`` (and the folders themselves) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root)


def write_json_atomic(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path) or ".")


def read_marker(checkpoint: str) -> dict | None:
    path = os.path.join(checkpoint, MARKER_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def complete_checkpoints(output_dir: str) -> list[tuple[int, int, str]]:
    """``(stage_index, step, path)`` of every complete staged checkpoint under ``output_dir``, oldest written first."""
    found: list[tuple[int, int, str]] = []
    if not os.path.isdir(output_dir):
        return found
    for stage_name in os.listdir(output_dir):
        stage_match = _STAGE_DIR_RE.match(stage_name)
        stage_path = os.path.join(output_dir, stage_name)
        if stage_match is None or not os.path.isdir(stage_path):
            continue
        for name in os.listdir(stage_path):
            match = _CHECKPOINT_RE.match(name)
            path = os.path.join(stage_path, name)
            if match and os.path.isdir(path) and read_marker(path) is not None:
                found.append((int(stage_match[1]), int(match[1]), path))
    # newest marker last: a finished older run's late-stage checkpoint must not win over a newer run's
    return sorted(found, key=lambda item: (os.path.getmtime(os.path.join(item[2], MARKER_NAME)), item[0], item[1]))


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool, output_dir: str, stage_order: list[str]) -> tuple:
    """Checkpoint path and its marker for ``train(resume_from_checkpoint=...)``, with clear errors."""
    if resume_from_checkpoint is True:
        found = complete_checkpoints(output_dir)
        if not found:
            raise ValueError(
                f"resume_from_checkpoint=True, but {output_dir} holds no complete HEFT checkpoint "
                f"(stage-<i>-<stage>/checkpoint-<step> with {MARKER_NAME})."
            )
        path = found[-1][2]
    else:
        path = str(resume_from_checkpoint)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Checkpoint folder {path} does not exist.")
    marker = read_marker(path)
    if marker is None:
        latest = complete_checkpoints(os.path.dirname(os.path.dirname(os.path.abspath(path))))
        hint = f" The latest complete one is {latest[-1][2]}." if latest else ""
        raise ValueError(
            f"Checkpoint {path} is incomplete: it has no {MARKER_NAME}, so its save was interrupted (or it was not "
            f"written by StagedSFTTrainer). Resume from a complete checkpoint instead.{hint}"
        )
    if list(marker["stage_order"]) != list(stage_order):
        raise ValueError(
            f"Checkpoint {path} was written with stage_order={marker['stage_order']}, but this run has "
            f"stage_order={list(stage_order)}. Resume with the same stage_order."
        )
    return path, marker
