"""Flushing files and folders to disk, for saves that survive a crash or a kill."""

from __future__ import annotations

import os


def fsync_path(path: str) -> None:
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


def fsync_tree(folder: str) -> None:
    """Flush every file under ``folder`` (and the folders themselves) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)
