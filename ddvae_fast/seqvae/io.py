"""File helpers of the application: atomic writes and the one unknown-key check of configs."""

from __future__ import annotations

import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

__all__ = ["atomic_torch_save", "atomic_write", "check_known_keys", "write_text_atomic"]


def atomic_write(path, write, *, binary: bool) -> None:
    """Write through ``write(handle)`` to a temporary file beside ``path``, then rename over it.

    A crash mid-write leaves the previous file intact instead of a truncated
    one; the temporary file is removed on any error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
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
