"""File helpers of the application: atomic writes and the one unknown-key check of configs."""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import fields
from pathlib import Path

import torch

__all__ = [
    "atomic_torch_save",
    "atomic_write",
    "check_known_keys",
    "check_torch_file",
    "remove_stale_temporaries",
    "write_text_atomic",
]

TEMPORARY_PREFIX = ".tmp-"


def atomic_write(path, write, *, binary: bool) -> None:
    """Write through ``write(handle)`` to a temporary file beside ``path``, then rename over it.

    A crash mid-write leaves the previous file intact instead of a truncated
    one; the temporary file is removed on any error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=path.parent)
    try:
        mode = "wb" if binary else "w"
        options = {} if binary else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **options) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(directory) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``directory``.

    Call it only when this process owns the directory (the CLI does, after its
    checks): a concurrent writer's temporary file would be removed too.
    """
    removed = []
    for path in Path(directory).glob(TEMPORARY_PREFIX + "*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_torch_file(path) -> str | None:
    """Why the file ``torch.save`` wrote at ``path`` is damaged, or None if it is whole.

    torch.save writes a zip archive with a CRC-32 per member. Checking those in
    Python first matters: torch.load on a file with a flipped byte can crash the
    process (a segmentation fault was seen) instead of raising.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as exc:
        return f"not a readable torch file ({type(exc).__name__}: {exc})"
    except Exception as exc:  # zipfile raises others (zlib.error, ...) on garbage headers
        return f"not a readable torch file ({type(exc).__name__}: {exc})"
    if bad is not None:
        return f"member {bad!r} fails its CRC-32 check"
    return None


def atomic_torch_save(obj, path) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle), binary=True)


def write_text_atomic(path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text), binary=False)


def check_known_keys(values: dict, known, where: str) -> None:
    """Refuse keys a config section does not define (``known``: names or a dataclass)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a table, got {type(values).__name__}")
    if isinstance(known, type):
        known = {f.name for f in fields(known)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)} in {where}; known: {sorted(known)}")
