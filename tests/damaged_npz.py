"""npz files damaged in the ways a disk, a transfer or another tool can damage them, for the tests of
every reader of npz files (weights, embedding files): each must answer with a ValueError naming the
file, never zipfile's or zlib's own exceptions (NotImplementedError, RuntimeError, zlib.error)."""

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

_LOCAL, _CENTRAL = b"PK\x03\x04", b"PK\x01\x02"


def _patch_headers(raw: bytearray, local_offset: int, central_offset: int, fmt: str, value: int) -> None:
    """Write ``value`` at a field of every member's local header and central-directory entry."""
    for signature, offset in ((_LOCAL, local_offset), (_CENTRAL, central_offset)):
        at = raw.find(signature)
        while at != -1:
            struct.pack_into(fmt, raw, at + offset, value)
            at = raw.find(signature, at + 4)


def unknown_method(raw: bytearray) -> None:
    _patch_headers(raw, 8, 10, "<H", 99)  # no such compression method


def encrypted(raw: bytearray) -> None:
    _patch_headers(raw, 6, 8, "<H", 1)  # flag bit 0: encrypted


def newer_zip_version(raw: bytearray) -> None:
    _patch_headers(raw, 4, 6, "<H", 99)  # "version needed to extract" 9.9


def bad_deflate(raw: bytearray) -> None:
    """Every member's compressed data made 0xFF bytes: a deflate block of the reserved type."""
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as npz:
        members = npz.infolist()  # sizes from the central directory: np.savez writes zip64 local headers
    for member in members:
        name_len, extra_len = struct.unpack_from("<HH", raw, member.header_offset + 26)
        start = member.header_offset + 30 + name_len + extra_len
        raw[start : start + member.compress_size] = b"\xff" * member.compress_size


DAMAGES = {"unknown compression method": unknown_method, "encrypted": encrypted,
           "newer zip version": newer_zip_version, "bad deflate stream": bad_deflate}

#: What zipfile or zlib raises on each damage: the cause a reader's ValueError must carry.
RAISES = {"unknown compression method": NotImplementedError, "encrypted": RuntimeError,
          "newer zip version": NotImplementedError, "bad deflate stream": zlib.error}


def write_damaged(path: Path, arrays: dict, damage: str) -> Path:
    """``arrays`` saved compressed to ``path``, then damaged as ``DAMAGES[damage]`` does."""
    np.savez_compressed(path, **arrays)
    raw = bytearray(path.read_bytes())
    DAMAGES[damage](raw)
    path.write_bytes(bytes(raw))
    return path


def write_with_false_shape(path: Path, arrays: dict, name: str, shape: tuple) -> Path:
    """``arrays`` saved to ``path`` as np.savez does, but array ``name``'s header gives ``shape``."""
    with zipfile.ZipFile(path, "w") as npz:
        for key, array in arrays.items():
            member = io.BytesIO()
            header = np.lib.format.header_data_from_array_1_0(array)
            np.lib.format.write_array_header_1_0(member, {**header, "shape": shape} if key == name else header)
            member.write(array.tobytes())
            npz.writestr(f"{key}.npy", member.getvalue())
    return path
