"""Saves that are never lost, and weights that say which settings they were trained with.

**Replacing a saved adapter.** :func:`replace_into` moves a finished save (a staging folder written and flushed
next to the files it replaces) into its folder. The staging folder gets a commit marker first; from then on the
save is durable, and whoever finds the folder with a committed staging folder in it (the next save, or
``HeftConfig.from_pretrained`` before it reads anything) finishes the move (:func:`finish_interrupted_saves`).
Each file is moved with one ``os.replace``, which is atomic: when the adapter's settings did not change, which is
the case between the saves of one training run, the folder holds the old or the new adapter at every moment, even
for readers that know nothing about this. A staging folder without the marker was never complete: it is deleted by
the next save (not by readers, which could be looking at a save still in progress).

**Settings in the weights.** :func:`stamp_settings` records the intervention settings (type, positions, layers,
rank, sharing, ...) and the LoRA shape settings in ``adapter_model.safetensors``' metadata;
:func:`check_settings` refuses an ``adapter_config.json`` that disagrees with them (an edited ``f2+l2`` ->
``f3+l3`` or ``loreft`` -> ``direft`` loaded and silently changed the outputs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from .fs import fsync_path, fsync_tree

STAGING_PREFIX = ".heft-save-"
COMMIT_MARKER = ".heft-save-complete"
SETTINGS_KEY = "heft_settings"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# The fields that decide what the saved tensors mean. Positions are not visible in any tensor's shape.
SETTINGS_FIELDS = (
    "intervention_type",
    "intervention_positions",
    "intervention_layers",
    "intervention_rank",
    "intervention_component",
    "share_intervention_weights",
    "intervention_act_fn",
    "intervention_add_bias",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "target_modules",
    "base_model_hidden_size",
    "base_model_num_layers",
)


# ---------------------------------------------------------------------------------------------- atomic replacement
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
    marker = os.path.join(staging, COMMIT_MARKER)
    with open(marker, "w", encoding="utf-8") as handle:
        handle.write("complete\n")
        handle.flush()
        os.fsync(handle.fileno())
    fsync_path(staging)
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


# ---------------------------------------------------------------------------------------------- settings metadata
def settings_of(config: Any) -> dict[str, Any]:
    """The settings of ``config`` that the saved weights depend on, in a JSON-comparable form."""
    settings: dict[str, Any] = {}
    for name in SETTINGS_FIELDS:
        value = getattr(config, name, None)
        if name == "target_modules" and value is not None and not isinstance(value, str):
            value = sorted(value)
        if name == "intervention_positions" and isinstance(value, str):
            value = value.strip().lower().replace(" ", "")
        settings[name] = value
    return json.loads(json.dumps(settings))


def stamp_settings(folder: str, config: Any) -> None:
    """Record ``config``'s settings in ``folder/adapter_model.safetensors``' metadata (rewritten atomically)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        return
    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata[SETTINGS_KEY] = json.dumps(settings_of(config), sort_keys=True)
    tensors = load_file(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def saved_settings(path: str) -> dict[str, Any] | None:
    """The settings recorded in a safetensors file, or ``None`` (saved before peft-heft recorded them)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        text = (handle.metadata() or {}).get(SETTINGS_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} has unreadable HEFT settings in its metadata ({error}); save the adapter again."
        ) from error


def check_settings(folder: str, config: Any) -> None:
    """Refuse ``config`` (read from ``folder/adapter_config.json``) when its settings differ from the weights'."""
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        return
    recorded = saved_settings(path)
    if recorded is None:
        return
    current = settings_of(config)
    differing = [name for name in SETTINGS_FIELDS if name in recorded and recorded[name] != current.get(name)]
    if differing:
        details = "; ".join(
            f"{name}: adapter_config.json has {current.get(name)!r}, the weights were saved with {recorded[name]!r}"
            for name in differing
        )
        raise ValueError(
            f"{os.path.join(folder, CONFIG_NAME)} does not match the weights in {path} ({details}). The config was "
            "edited or belongs to another adapter, and loading it would silently change the outputs. Restore the "
            f"config to the weights' settings (shown above; they are recorded in the weights' '{SETTINGS_KEY}' "
            "metadata), or train and save an adapter with the new settings."
        )
