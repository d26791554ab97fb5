"""Stage-aware checkpoints: a completion marker written last, and finding where to resume.

`Trainer` writes a checkpoint file by file. A checkpoint of [`StagedSFTTrainer`] counts as complete only once
``heft_checkpoint.json`` is in it: that file is written last, after every other file is flushed to disk, through a
temporary file and an atomic rename. A crash mid-save leaves a folder without it, which resuming refuses.

The marker also lists every file of the checkpoint with its size in bytes (format 2). Before resuming, each listed
file must still be there with that size, and the files are checked without loading them: a safetensors file's header
must describe exactly the bytes that follow it, a file written by ``torch.save`` (a zip archive) must have its central
directory at the end, and a JSON file must parse. Nothing is unpickled. Markers without a file list (format 1) get the
content checks only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints, sort_checkpoints
from transformers.utils import logging

from ..persistence import fsync_tree, write_json_atomic
from .config import STAGE_NAMES
from .mixin_base import SFTTrainerBase

logger = logging.get_logger(__name__)

MARKER_NAME = "heft_checkpoint.json"
_STAGE_DIR_RE = re.compile(rf"^stage-(\d+)-({'|'.join(STAGE_NAMES)})$")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def stage_dir_name(index: int, stage: str) -> str:
    return f"stage-{index}-{stage}"


def write_marker(folder: str, payload: dict) -> None:
    """Complete the checkpoint ``folder``: flush its files, then write the marker (atomically, last)."""
    fsync_tree(folder)
    write_json_atomic(os.path.join(folder, MARKER_NAME), payload, indent=2, sort_keys=True)


def remove_stale_marker(folder: str) -> None:
    """A checkpoint folder about to be rewritten (an earlier run's step) is incomplete until its new marker lands."""
    path = os.path.join(folder, MARKER_NAME)
    if os.path.isfile(path):
        os.remove(path)


class CheckpointCompleter(TrainerCallback):
    """Calls ``complete(folder)`` once `Trainer` has written a checkpoint (its `on_save`), before other callbacks."""

    def __init__(self, complete) -> None:
        self.complete = complete

    def on_save(self, args, state, control, **kwargs):
        self.complete()
        return control


def resumed_loss_total(marker: dict, state: TrainerState) -> float:
    """Total training loss of a stage's steps up to its checkpoint (what Trainer's train_loss is a mean of)."""
    recorded = marker.get("stage_train_loss")
    if isinstance(recorded, dict) and int(recorded.get("steps", -1)) == state.global_step:
        return float(recorded["total"])
    # markers from before the total was recorded: rebuild it from the logged losses, each the mean of the steps since
    # the log before it (exact when the checkpoint step was logged, short of the steps after the last log otherwise)
    total, previous = 0.0, 0
    for entry in state.log_history:
        if "loss" in entry and "step" in entry:
            total += float(entry["loss"]) * (int(entry["step"]) - previous)
            previous = int(entry["step"])
    return total


def checkpoint_state(checkpoint: str) -> TrainerState:
    """The `TrainerState` a checkpoint folder was written with."""
    return TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))


def checkpoint_files(folder: str) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every file under ``folder`` but the marker (and its temporary file)."""
    files: dict[str, int] = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative == MARKER_NAME or relative.startswith((f"{MARKER_NAME}.tmp-", f".{MARKER_NAME}.tmp-")):
                continue
            files[relative] = os.path.getsize(path)
    return dict(sorted(files.items()))


def _safetensors_problem(path: str, size: int) -> str | None:
    """Why the safetensors file ``path`` is not whole, from its header alone, or ``None``."""
    if size < 8:
        return f"is {size} bytes, shorter than a safetensors header"
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        if 8 + header_size > size:
            return f"is {size} bytes, but its header alone announces {8 + header_size}"
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            return "has an unreadable safetensors header"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        return f"is {size} bytes, but its header describes {expected} (it was cut off)"
    return None


def _content_problem(path: str, size: int) -> str | None:
    """Checks that read no pickle: safetensors headers, zip directories of ``torch.save`` files, JSON syntax."""
    if path.endswith(".safetensors"):
        return _safetensors_problem(path, size)
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except ValueError:
            return "is not valid JSON (cut off?)"
        return None
    if path.endswith((".pt", ".pth", ".bin")):
        with open(path, "rb") as handle:
            is_zip = handle.read(4) == b"PK\x03\x04"  # torch.save's format; the legacy format cannot be checked
        if is_zip:
            try:
                with zipfile.ZipFile(path):  # reads the central directory at the end of the file only
                    pass
            except (zipfile.BadZipFile, OSError):
                return "is not a whole torch.save archive (its end is missing: cut off?)"
    return None


def checkpoint_problem(checkpoint: str, marker: dict) -> str | None:
    """What is wrong with the files of a checkpoint that has a marker, naming the file, or ``None`` if it is whole."""
    listed = marker.get("files")
    if isinstance(listed, dict):
        for relative, expected in listed.items():
            path = os.path.join(checkpoint, relative)
            if not os.path.isfile(path):
                return f"{relative} is missing (the marker lists it, {expected} bytes)"
            size = os.path.getsize(path)
            if size != int(expected):
                return f"{relative} is {size} bytes, but it was {expected} bytes when the checkpoint was written"
    for relative, size in checkpoint_files(checkpoint).items():
        problem = _content_problem(os.path.join(checkpoint, relative), size)
        if problem is not None:
            return f"{relative} {problem}"
    return None


def read_marker(checkpoint: str) -> dict | None:
    path = os.path.join(checkpoint, MARKER_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            marker = json.load(handle)
    except ValueError:
        return None  # not written by write_marker (which never leaves half a file): not a complete checkpoint
    return marker if isinstance(marker, dict) else None


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
    """Checkpoint path and its marker for ``train(resume_from_checkpoint=...)``, with clear errors.

    With ``True``, the newest complete checkpoint whose files are whole; a damaged newer one is skipped with a
    warning naming it and its broken file. With a path, a damaged checkpoint is an error naming the broken file.
    """
    if resume_from_checkpoint is True:
        found = complete_checkpoints(output_dir)
        if not found:
            raise ValueError(
                f"resume_from_checkpoint=True, but {output_dir} holds no complete HEFT checkpoint "
                f"(stage-<i>-<stage>/checkpoint-<step> with {MARKER_NAME})."
            )
        skipped = []
        for _, _, candidate in reversed(found):
            problem = checkpoint_problem(candidate, read_marker(candidate) or {})
            if problem is None:
                path = candidate
                break
            logger.warning(
                f"Skipping checkpoint {candidate}: {problem}. Resuming from the previous complete checkpoint instead."
            )
            skipped.append(f"{candidate}: {problem}")
        else:
            raise ValueError(
                f"resume_from_checkpoint=True, but every checkpoint in {output_dir} is damaged: "
                + "; ".join(skipped)
                + ". Train from scratch (resume_from_checkpoint=None), or restore the files."
            )
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
    problem = checkpoint_problem(path, marker)
    if problem is not None:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        others = [
            c for _, _, c in reversed(complete_checkpoints(run_dir)) if os.path.abspath(c) != os.path.abspath(path)
        ]
        whole = next((c for c in others if checkpoint_problem(c, read_marker(c) or {}) is None), None)
        hint = f" The latest whole checkpoint is {whole}." if whole else ""
        raise ValueError(
            f"Checkpoint {path} is damaged: {problem}. Resume from another checkpoint, or pass "
            f"resume_from_checkpoint=True to take the newest whole one.{hint}"
        )
    if list(marker["stage_order"]) != list(stage_order):
        raise ValueError(
            f"Checkpoint {path} was written with stage_order={marker['stage_order']}, but this run has "
            f"stage_order={list(stage_order)}. Resume with the same stage_order."
        )
    return path, marker


if TYPE_CHECKING:
    from .config import HeftSFTConfig


class StageCheckpointsMixin(SFTTrainerBase):
    """`StagedSFTTrainer`'s checkpoints (mixed in before `SFTTrainer`): one folder per stage, each checkpoint
    completed by its marker after Trainer wrote it, rotation only after that."""

    if TYPE_CHECKING:  # attributes StagedSFTTrainer sets
        args: HeftSFTConfig  # type: ignore[assignment]  # HEFT's trainer holds a HeftSFTConfig

    _stage_index: int | None
    _stage_name: str | None
    _stage_trial: Any
    _stage_base_args: Any
    _stage_loss_offset: float
    _completed_stages: dict
    stage_log_history: list

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        if self._stage_index is None or self._stage_name is None:
            return run_dir
        return os.path.join(run_dir, stage_dir_name(self._stage_index, self._stage_name))

    def _complete_checkpoint(self) -> None:
        """After Trainer wrote a checkpoint (`on_save`): its marker, written last, then the rotation."""
        run_dir = self._get_output_dir(self._stage_trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        # every rank writes its own RNG state into the folder: the marker's file list must come after all of them
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        # the stage's running loss total so far (drained into _total_loss_scalar at each log, the rest in _tr_loss)
        tr_loss = getattr(self, "_tr_loss", None)
        stage_loss = self._stage_loss_offset + getattr(self, "_total_loss_scalar", 0.0)
        stage_loss += float(tr_loss.item()) if tr_loss is not None else 0.0
        write_marker(
            folder,
            {
                "format": 2,
                "stage_index": self._stage_index,
                "stage": self._stage_name,
                "stage_order": list(self.args.stage_order),
                "global_step": self.state.global_step,
                "completed_stages": self._completed_stages,
                "stage_log_history": self.stage_log_history,
                "stage_train_loss": {"total": stage_loss, "steps": self.state.global_step},
                "files": checkpoint_files(folder),
            },
        )
        base = self._stage_base_args if self._stage_base_args is not None else self.args
        rotate_checkpoints(
            output_dir=run_dir,
            save_total_limit=base.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

    def _keep_only_best(self, limit: int | None, trial) -> None:
        """What Trainer does at the end of training with `save_total_limit=1` and a best checkpoint (this stage's copy
        of the arguments has no limit): delete every other checkpoint of the stage."""
        best = self.state.best_model_checkpoint
        if not (self.args.should_save and limit == 1 and best is not None):  # as Trainer: only with a best checkpoint
            return
        for folder in sort_checkpoints(output_dir=self._get_output_dir(trial), best_model_checkpoint=best):
            if not os.path.samefile(folder, best):
                shutil.rmtree(folder, ignore_errors=True)
