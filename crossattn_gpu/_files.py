"""Output files that appear whole or not at all."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def whole_file(path):
    """A binary file that becomes ``path`` when the ``with`` block completes, and is removed if it raises.

    It is written as ``<path>.<pid>.<random>.partial`` beside ``path`` (a name no other writer has), then
    renamed over ``path`` (atomic on POSIX): an interrupted write (Ctrl-C, a full disk, a killed process)
    leaves a previous ``path`` as it was, and two writers of one path each leave a whole file (the last
    to finish wins), never a mix of both.
    """
    path = Path(os.fspath(path))
    partial = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    # O_EXCL: never another writer's file; mode 0o666 less the umask, as open() gives a new file.
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # renamed already, or never left behind
