"""Durable file writes: what a run writes survives a crash or a power cut whole, or not at all.

A rename is atomic, but without ``fsync`` the renamed file's data (or the rename itself) may still
sit in the page cache when the machine goes down, leaving an empty or partial file under the final
name. So files are flushed to disk before they are renamed into place, and the folder holding a
rename is flushed after it:

- ``write_text_atomic``: a whole small file (``config.json``, a repaired log);
- ``append_lines``: JSON lines appended to a log, on disk when the call returns;
- ``sync_tree`` / ``sync_folder``: every file of a finished checkpoint folder, then the folders.
"""

from __future__ import annotations

import os
from pathlib import Path


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (new names, renames, deletions) to disk; a no-op where folders
    cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse fsync on folders: their renames are ordered anyway
        pass
    finally:
        os.close(descriptor)


def sync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` to disk, then the folders themselves (deepest first)."""
    folders = []
    for root, _, names in os.walk(folder):
        folders.append(Path(root))
        for name in names:
            with open(Path(root) / name, "rb") as handle:
                os.fsync(handle.fileno())
    for path in reversed(folders):
        sync_folder(path)


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text``, never a mix, whenever the process dies."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def append_lines(path: Path, lines: list[str]) -> None:
    """Append each line and a newline; on disk when this returns (a crash can tear only the last line
    being written, which a resume drops: ``grpo_fast.metrics``)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())
