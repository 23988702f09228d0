"""Files: outputs that appear whole or not at all, and npz members' headers read with the errors a
damaged npz file raises."""

from __future__ import annotations

import errno
import math
import os
import secrets
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np

#: What reading a damaged npz file (a zip of .npy members) raises, besides MemoryError: zipfile's
#: BadZipFile (a bad structure or CRC), NotImplementedError (an unknown compression method, zip version
#: or flag) and RuntimeError (an encrypted member; NotImplementedError is one too), zlib.error (a bad
#: deflate stream in np.savez_compressed's members), and NumPy's ValueError and EOFError (a bad or
#: short .npy header or body). Each reader turns them into a ValueError that names the file.
NPZ_READ_ERRORS = (zipfile.BadZipFile, RuntimeError, zlib.error, EOFError, ValueError, OSError)


def npy_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple, np.dtype]:
    """A .npy member's shape and dtype, from its header alone.

    ValueError when the data after the header is not the size they give: a damaged file, found before
    NumPy allocates what the header promises (terabytes, say: MemoryError), or reads past the data.
    Object arrays (pickles, which no reader here loads) are not sized. Damage to the zip itself
    raises one of ``NPZ_READ_ERRORS``.
    """
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        held = archive.getinfo(member).file_size - f.tell()
    promised = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and promised != held:
        raise ValueError(f"its header promises shape {shape} of {dtype} ({promised} bytes) but it holds {held} bytes")
    return shape, dtype


@contextmanager
def whole_file(path):
    """A binary file that becomes ``path`` when the ``with`` block completes, and is removed if it raises.

    It is written as ``<path>.<pid>.<random>.partial`` beside ``path`` (a name no other writer has), then
    renamed over ``path`` (atomic on POSIX): an interrupted write (Ctrl-C, a full disk, a killed process)
    leaves a previous ``path`` as it was, and two writers of one path each leave a whole file (the last
    to finish wins), never a mix of both. IsADirectoryError when ``path`` is a folder and
    FileNotFoundError when its folder does not exist, each naming that path, before anything is written.
    """
    path = Path(os.fspath(path))
    # Checked here: otherwise the partial file's name would stand in the errors instead of the path's.
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; name a file to write", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder to write into", str(path.parent))
    partial = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    # O_EXCL: never another writer's file; mode 0o666 less the umask, as open() gives a new file.
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # renamed already, or never left behind
