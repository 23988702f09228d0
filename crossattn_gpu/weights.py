"""The four fusion parameters: random initialisation, validation, and pickle-free files.

Files are safetensors (written and read here, no extra dependency) or ``.npz`` (read with
``allow_pickle=False``). Every load checks names, shapes and dtypes before any array is used, and the
data against a checksum: the CRC-32 that our safetensors files store (``DATA_CRC_KEY``), or each npz
member's own.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import zipfile
import zlib

import numpy as np

from ._checks import is_torch_tensor
from ._files import NPZ_READ_ERRORS, npy_header, whole_file

WEIGHT_NAMES = ("query_weights", "key_weights", "value_weights", "output_weights")

#: The metadata entry of the safetensors files written here: the CRC-32 of their data, in hex.
DATA_CRC_KEY = "data_crc32"

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def random_weights(embedding_dim: int, attention_heads: int, seed=None) -> dict[str, np.ndarray]:
    """The seed's initialisation: standard normal times 0.1, drawn for Wq, Wk, Wv, then Wo.

    With ``seed=None`` the draws come from NumPy's global generator, as in the seed, so
    ``np.random.seed(s); CrossAttention(...)`` and ``CrossAttention(..., seed=s)`` agree.
    """
    try:
        rng = np.random if seed is None else np.random.RandomState(seed)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"seed must be None or an integer in 0..2**32 - 1 (or an array of them); got {seed!r}") from exc
    heads, width = attention_heads, embedding_dim
    shapes = [(heads, width, width)] * 3 + [(heads * width, width)]
    return {name: rng.randn(*shape) * 0.1 for name, shape in zip(WEIGHT_NAMES, shapes)}


def host_values(value, name: str, where: str = "") -> np.ndarray:
    """The values of a weight array as a NumPy array: array-likes, torch tensors on any device (a
    parameter that requires grad included: the model keeps a copy of its values, a snapshot, as
    ``load_state_dict`` would; bfloat16 widened to float32 exactly), and CuPy arrays."""
    try:
        if is_torch_tensor(value):
            value = value.detach().cpu()
            if value.dtype == sys.modules["torch"].bfloat16:
                value = value.float()
        elif type(value).__module__.split(".")[0] == "cupy":
            value = value.get()
        return np.asarray(value)
    except Exception as exc:  # a meta or sparse tensor, say
        raise TypeError(f"{name}{where} could not be read as an array: {exc}") from exc


def check_weight(name: str, value, expected_shape: tuple | None, source: str = "") -> np.ndarray:
    """``value`` as a read-only float64 copy, after checking dtype, shape and finiteness."""
    where = f" in {source}" if source else ""
    arr = host_values(value, name, where)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name}{where} must be a real floating-point array; got dtype {arr.dtype}")
    if expected_shape is not None and arr.shape != tuple(expected_shape):
        raise ValueError(f"{name}{where} must have shape {tuple(expected_shape)}; got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}{where} contains NaN or Inf")
    arr = np.array(arr, dtype=np.float64)  # a private copy; float64 holds every float dtype exactly
    arr.flags.writeable = False
    return arr


def check_weight_set(arrays: dict, source: str = "") -> tuple[int, int, dict[str, np.ndarray]]:
    """Check a complete set of the four parameters; return (embedding_dim, attention_heads, arrays)."""
    where = f" in {source}" if source else ""
    missing = [n for n in WEIGHT_NAMES if n not in arrays]
    extra = sorted(set(arrays) - set(WEIGHT_NAMES))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise ValueError(f"weights{where}: {'; '.join(parts)} (expected exactly {', '.join(WEIGHT_NAMES)})")
    query = host_values(arrays["query_weights"], "query_weights", where)
    if not np.issubdtype(query.dtype, np.floating):  # before its shape: "got ()" would not say why
        raise TypeError(f"query_weights{where} must be a real floating-point array; got dtype {query.dtype}")
    if query.ndim != 3 or query.shape[1] != query.shape[2] or 0 in query.shape:
        raise ValueError(f"query_weights{where} must have shape (H, D, D) with H, D >= 1; got {query.shape}")
    heads, width = query.shape[0], query.shape[1]
    expected = {
        "query_weights": (heads, width, width),
        "key_weights": (heads, width, width),
        "value_weights": (heads, width, width),
        "output_weights": (heads * width, width),
    }
    arrays = {**arrays, "query_weights": query}  # read once (a device tensor is copied to the host)
    checked = {n: check_weight(n, arrays[n], expected[n], source) for n in WEIGHT_NAMES}
    return width, heads, checked


# --- files -----------------------------------------------------------------------------------------


def save_weights(path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write the parameters to ``path``: npz when it ends in ``.npz``, else safetensors. The file
    appears whole (``_files.whole_file``): an interrupted save leaves the previous one as it was."""
    with whole_file(path) as f:
        if os.fspath(path).endswith(".npz"):
            np.savez(f, **arrays)
        else:
            _write_safetensors(f, arrays, metadata)


def _write_safetensors(f, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """safetensors, with the CRC-32 of the data in the metadata (``DATA_CRC_KEY``): the format has
    no checksum of its own, and a damaged byte of data would load as a different weight."""
    header, offset, crc = {"__metadata__": dict(metadata)}, 0, 0
    blobs = []
    for name in WEIGHT_NAMES:
        data = np.ascontiguousarray(arrays[name]).astype("<f8", copy=False)
        blobs.append(data.tobytes())
        crc = zlib.crc32(blobs[-1], crc)
        header[name] = {"dtype": "F64", "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    header["__metadata__"][DATA_CRC_KEY] = f"{crc:08x}"
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep the data 8-byte aligned
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for blob in blobs:
        f.write(blob)


def load_weights(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read (arrays, metadata) from a safetensors or npz file, never unpickling anything.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is neither a valid safetensors nor a valid npz file.
    """
    path = os.fsdecode(path)  # a bytes path too: zipfile takes bytes for a file's contents
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        return _load_npz(path), {}  # a zip: every member has a CRC-32, which reading checks
    return _load_safetensors(path)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an npz file by name (as ``np.load`` names them), each member's size checked
    against its header before it is read (``npy_header``)."""
    try:
        archive = zipfile.ZipFile(path)
    except NPZ_READ_ERRORS as exc:
        raise ValueError(f"{path} is not a readable npz weights file: {exc}") from exc
    with archive:
        arrays = {}
        for member in archive.namelist():
            try:
                npy_header(archive, member)  # its size checked before NumPy allocates what the header says
                with archive.open(member) as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
            except NPZ_READ_ERRORS as exc:
                raise ValueError(f"{path} is not a readable npz weights file: member {member!r}: {exc}") from exc
            name = member[:-4] if member.endswith(".npy") else member
            if name in arrays:  # a zip may hold a name twice (np.savez never writes one so)
                raise ValueError(f"{path} is not a readable npz weights file: {name} appears twice")
            arrays[name] = array
        return arrays


def _load_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    def corrupt(reason):
        return ValueError(f"{path} is not a valid safetensors or npz weights file: {reason}")

    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise corrupt("shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > len(blob) - 8:
        raise corrupt(f"header length {header_len} exceeds the file")
    if header_len > _MAX_HEADER_BYTES:
        raise corrupt(f"header length {header_len} exceeds the {_MAX_HEADER_BYTES} bytes a weights header may take")
    try:
        header = json.loads(blob[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise corrupt("__metadata__ is not a JSON object")
    data = memoryview(blob)[8 + header_len :]
    arrays = {}
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], _json_integers(info["shape"]), _json_integers(info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"entry {name!r} lacks dtype, shape or data_offsets as integers") from None
        if code not in _SAFETENSORS_DTYPES:
            raise corrupt(f"{name} has dtype {code}; weights must be F64, F32, F16 or BF16")
        itemsize = 2 if code == "BF16" else np.dtype(_SAFETENSORS_DTYPES[code]).itemsize
        count = math.prod(shape)  # Python integers: no int64 overflow to wrap a huge shape round to a small count
        if min(shape, default=0) < 0 or not (0 <= begin <= end <= len(data)) or end - begin != count * itemsize:
            raise corrupt(f"{name} has inconsistent shape {shape} and data_offsets {[begin, end]}")
        raw = data[begin:end]
        if code == "BF16":  # bfloat16 is the top half of a float32
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(_SAFETENSORS_DTYPES[code]).newbyteorder("<"))
        arrays[name] = arr.reshape(shape)
    # A file that stored the CRC-32 of its data must still hold that data (files of other tools, and
    # of crossattn_gpu before it stored one, have none to check). CRC-32 finds every error of up to 32
    # bits in a row, and other damage but for 1 in 2**32: 0.06 s for D = 1280, H = 8 (420 MB; SHA-256
    # took 0.21 s, on a load of 0.25 s).
    if DATA_CRC_KEY in metadata and metadata[DATA_CRC_KEY] != f"{zlib.crc32(data):08x}":
        raise corrupt(f"its data does not match the {DATA_CRC_KEY} stored when it was saved: the file is damaged")
    return arrays, {str(k): str(v) for k, v in metadata.items()}


def _json_integers(values) -> list[int]:
    """A JSON list of integers as it is; TypeError for anything else (floats, strings, booleans, or
    1e999, which Python's json reads as infinity), which int() would round, parse or fail on."""
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise TypeError(f"expected a list of integers; got {values!r}")
    return values


def weights_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the four parameters (names, shapes and float64 values), to tie an export to its weights."""
    import hashlib

    digest = hashlib.sha256()
    for name in WEIGHT_NAMES:
        data = np.ascontiguousarray(arrays[name], dtype="<f8")
        digest.update(f"{name}{data.shape}".encode())
        digest.update(memoryview(data))  # the bytes tobytes() would give, without a copy of them
    return digest.hexdigest()
