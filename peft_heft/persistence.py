"""Writes that a crash or a kill never leaves half done, and the checks a local adapter folder gets before loading.

Every file and folder peft-heft writes for later (adapters, checkpoint markers, the search's records, the asset
cache) goes through one primitive, :func:`_publish`: the content is written next to its place (a sibling file or a
folder in the same directory, so on the same file system), flushed to disk, then renamed into place with one
``os.replace``, and the parent folder is flushed so that the rename survives a power cut.

- :func:`write_file_atomic` / :func:`write_json_atomic`: one file.
- :func:`build_folder_atomically`: a whole new folder (the asset cache).
- :func:`save_folder_atomically`: replaces the files of an existing folder (an adapter save). The staging folder is
  written inside ``output_dir``, flushed, and given a commit marker; from then on the save is durable, and whoever
  finds the folder with a committed staging folder in it (the next save, or ``HeftConfig.from_pretrained`` before it
  reads anything: :func:`finish_interrupted_saves`) finishes the move. Each file is moved with one ``os.replace``:
  when the adapter's settings did not change, which is the case between the saves of one training run, the folder
  holds the old or the new adapter at every moment, even for readers that know nothing about this. A staging folder
  without the marker was never complete: the next save deletes it (readers do not: it could be a save in progress).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGING_PREFIX = ".heft-save-"
COMMIT_MARKER = ".heft-save-complete"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


# ---------------------------------------------------------------------------------------------- flushing to disk
def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file or folder to disk; folders that cannot be opened or flushed (some file systems) are skipped."""
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


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder`` (and the folders themselves) to disk."""
    for root, _, files in os.walk(os.fspath(folder)):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


# ---------------------------------------------------------------------------------------------- the one primitive
def _publish(source: str, target: str) -> None:
    """Flush ``source`` (a file or a folder beside ``target``), rename it onto ``target``, flush the parent."""
    if os.path.isdir(source):
        fsync_tree(source)
    else:
        fsync_path(source)
    os.replace(source, target)
    fsync_path(os.path.dirname(os.path.abspath(target)))


def write_file_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a sibling temporary file: readers see the old file or the whole new one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data.encode("utf-8") if isinstance(data, str) else data)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, payload: Any, **dump_kwargs: Any) -> None:
    """:func:`write_file_atomic` of ``json.dumps(payload, **dump_kwargs)`` (``indent=2`` unless given)."""
    dump_kwargs.setdefault("indent", 2)
    write_file_atomic(path, json.dumps(payload, **dump_kwargs))


def build_folder_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` in a temporary sibling of ``target`` and rename it into place only when it succeeded.

    A crash or Ctrl-C half way leaves no half-written ``target`` behind, so a later call simply builds it again. When
    another process finished ``target`` first, its folder is kept and ours dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        if target.exists():
            shutil.rmtree(tmp)
        else:
            _publish(str(tmp), str(target))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------------------------- replacing a saved adapter
def new_staging_folder(output_dir: str) -> str:
    """An empty staging folder inside ``output_dir`` (same file system, so the final moves are renames)."""
    os.makedirs(output_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=output_dir)


def _pid_of(name: str) -> int | None:
    head = name[len(STAGING_PREFIX) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int | None) -> bool:
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but not ours
    return True


def _move_entries(staging: str, output_dir: str) -> None:
    for name in sorted(os.listdir(staging), key=lambda n: n == CONFIG_NAME):  # the config last
        if name == COMMIT_MARKER:
            continue
        source, target = os.path.join(staging, name), os.path.join(output_dir, name)
        try:
            if os.path.isdir(source) and os.path.isdir(target) and not os.path.islink(target):
                # a sub-adapter folder (non-default adapters): move it in file by file, atomically each
                _move_entries(source, target)
                continue
            os.replace(source, target)
        except FileNotFoundError:
            continue  # another finisher moved it first
    fsync_path(output_dir)


def replace_into(staging: str, output_dir: str) -> None:
    """Commit the finished save in ``staging`` and move its files into ``output_dir``, one atomic rename each."""
    fsync_tree(staging)
    write_file_atomic(os.path.join(staging, COMMIT_MARKER), "complete\n")
    _move_entries(staging, output_dir)
    shutil.rmtree(staging, ignore_errors=True)


def finish_interrupted_saves(output_dir: str, *, remove_incomplete: bool) -> list[str]:
    """Finish every committed save left in ``output_dir`` by a killed process; optionally delete the uncommitted
    ones (a writer does, a reader does not). Returns the staging folders that were dealt with."""
    if not os.path.isdir(output_dir):
        return []
    handled = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if not name.startswith(STAGING_PREFIX) or not os.path.isdir(path):
            continue
        if os.path.isfile(os.path.join(path, COMMIT_MARKER)):
            _move_entries(path, output_dir)
            shutil.rmtree(path, ignore_errors=True)
            handled.append(path)
        elif remove_incomplete and not _alive(_pid_of(name)):
            shutil.rmtree(path, ignore_errors=True)
            handled.append(path)
    return handled


def save_folder_atomically(output_dir: str, write: Callable[[str], None]) -> None:
    """Run ``write(staging)`` into a new staging folder inside ``output_dir``, then commit it and move its files over
    the old ones (:func:`replace_into`). Committed saves a kill interrupted are finished first, dead uncommitted
    ones removed; a failing ``write`` leaves ``output_dir`` as it was."""
    finish_interrupted_saves(output_dir, remove_incomplete=True)
    staging = new_staging_folder(output_dir)
    try:
        write(staging)
        replace_into(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_writable_folder(given: str, name: str, how: str) -> None:
    """Refuse, with what to do, a folder path that is a file, lies under a file, or cannot be written; create it."""
    path = os.path.abspath(given)
    a_name = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            f"{name}={given!r} is an existing file, not a folder; checkpoints and the adapter are saved as a folder "
            f"(adapter_config.json, adapter_model.safetensors, ...). Pass the path of a folder ({how}), or move the "
            "file away."
        )
    existing = path
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(
            f"{name}={given!r} cannot be created: {existing} is a file, not a folder. Pass {a_name} whose parents "
            "are folders."
        )
    try:
        os.makedirs(path, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".heft-write-check-", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        message = (
            f"{name}={given!r} is not writable ({error.strerror or error}); checkpoints and the adapter are saved "
            f"there. Pass {a_name} you can write to, or fix its permissions."
        )
        raise (PermissionError(message) if isinstance(error, PermissionError) else OSError(message)) from error


TRAINING_ARGS_JSON = "training_args.json"
_TRAINING_ARGS_PICKLE = "training_args.bin"  # transformers' TRAINING_ARGS_NAME, not imported: this module stays light


def save_trainer_output(output_dir: str, args: Any, write: Callable[[str], None]) -> None:
    """A trainer's `save_model`: ``write(folder)`` into a staging folder inside ``output_dir``, then the files moved
    over the old ones (:func:`save_folder_atomically`); a killed save leaves the old adapter or the new one.

    The existing card is copied in first (PEFT updates a card in place: what the user wrote in it stays), the
    training arguments replace Trainer's pickled ``training_args.bin`` as ``training_args.json`` (no pickle in the
    folder, so ``push_to_hub`` uploads none), and the card's loading code is pointed at ``output_dir``.
    """
    check_writable_folder(output_dir, "save_model's output_dir", "trainer.save_model('a-folder')")

    def write_all(staging: str) -> None:
        card = os.path.join(output_dir, "README.md")
        if os.path.isfile(card):
            shutil.copy2(card, os.path.join(staging, "README.md"))
        write(staging)
        pickled = os.path.join(staging, _TRAINING_ARGS_PICKLE)
        if os.path.exists(pickled):
            os.remove(pickled)
        with open(os.path.join(staging, TRAINING_ARGS_JSON), "w", encoding="utf-8") as handle:
            handle.write(args.to_json_string())
        _point_card_at(os.path.join(staging, "README.md"), staging, output_dir)

    save_folder_atomically(output_dir, write_all)


def _point_card_at(card: str, staging: str, output_dir: str) -> None:
    """The card was written in the staging folder: its loading code must name the output folder."""
    if not os.path.isfile(card):
        return
    with open(card, encoding="utf-8") as handle:
        text = handle.read()
    if staging in text:
        with open(card, "w", encoding="utf-8") as handle:
            handle.write(text.replace(staging, output_dir))


# ---------------------------------------------------------------------------------------------- checks on load
def _check_safetensors_header(path: str) -> None:
    """Read only the header of ``path``, so a truncated or corrupt weights file fails here with its name."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}). It is probably truncated or corrupt: copy or "
            "download the adapter again, or save it again with save_pretrained."
        ) from error


def check_local_adapter_folder(folder: str) -> None:
    """Before PEFT reads a local HEFT adapter folder: finish a save a kill interrupted, refuse pickled-only weights
    (never unpickled), missing weights and a truncated or corrupt weights file, each naming the file."""
    try:
        finish_interrupted_saves(folder, remove_incomplete=False)
    except OSError:
        pass  # a read-only copy: nothing was being saved into it
    has_safetensors = os.path.isfile(os.path.join(folder, WEIGHTS_NAME))
    pickled = [f for f in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(folder, f))]
    if pickled and not has_safetensors:
        raise ValueError(
            f"{folder} holds HEFT weights only as {pickled[0]} (a pickle). peft-heft loads safetensors only, "
            "so that loading an adapter never runs code from it. Where you trust the file, convert it once to "
            "adapter_model.safetensors with safetensors.torch.save_file."
        )
    if not has_safetensors and os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise FileNotFoundError(
            f"{folder} has adapter_config.json but no adapter_model.safetensors: the adapter's weights are "
            "missing (an interrupted copy or download?). Copy the whole adapter folder again, or save it again "
            "with save_pretrained."
        )
    if has_safetensors:
        _check_safetensors_header(os.path.join(folder, WEIGHTS_NAME))
