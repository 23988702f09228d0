"""A digest of an exported model, so that a damaged file is refused instead of computing other numbers.

ONNX files carry no checksum: of 400 copies of a small exported model, each with a few random bytes
changed, 26 still loaded and ran, and 21 of those gave other results without a word. ``to_onnx``
therefore stores a SHA-256 of everything the model computes with in its metadata (``DIGEST_KEY``), and
``OnnxFusion`` checks it on load. The digest covers the model's fields, its other metadata and its
graph (nodes, inputs, outputs, and every initializer's name, type, shape and bytes), with each
initializer's bytes taken from the file or from its external data alike, so that it does not depend on
where the weights are stored.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from onnx import ModelProto, TensorProto

DIGEST_KEY = "model_sha256"
_CHUNK_BYTES = 1 << 24


def model_digest(model: ModelProto, model_dir: Path | None = None) -> str:
    """SHA-256 of ``model`` without its ``DIGEST_KEY`` entry. External data is read from
    ``model_dir`` (its locations checked beforehand: ``runner.check_external_data``)."""
    digest = hashlib.sha256()
    for field, value in model.ListFields():
        if field.name == "graph":
            continue
        if field.name == "metadata_props":
            value = [prop for prop in value if prop.key != DIGEST_KEY]
        _update(digest, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _update(digest, field, value)
    for tensor in model.graph.initializer:
        digest.update(TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims).SerializeToString())
        _update_with_data(digest, tensor, model_dir)
    return digest.hexdigest()


def _update(digest, field, value) -> None:
    """Hash one field: its name, then its value (messages serialized, scalars by repr)."""
    digest.update(field.name.encode())
    repeated = getattr(field, "is_repeated", None)  # newer protobuf has no `label`, older ones only it
    if repeated is None:
        repeated = field.label == field.LABEL_REPEATED
    values = value if repeated else [value]
    for item in values:
        encoded = item.SerializeToString(deterministic=True) if hasattr(item, "SerializeToString") else repr(item).encode()
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)


def _update_with_data(digest, tensor: TensorProto, model_dir: Path | None) -> None:
    """Hash an initializer's bytes: its raw data, its external data, or (neither) the whole tensor."""
    if tensor.data_location != TensorProto.EXTERNAL:
        digest.update(tensor.raw_data if tensor.HasField("raw_data") else tensor.SerializeToString(deterministic=True))
        return
    entries = {entry.key: entry.value for entry in tensor.external_data}
    offset, length = int(entries.get("offset", 0)), entries.get("length")
    with open(os.path.join(model_dir or "", entries.get("location", "")), "rb") as f:
        f.seek(offset)
        left = None if length is None else int(length)
        while left is None or left > 0:
            chunk = f.read(_CHUNK_BYTES if left is None else min(_CHUNK_BYTES, left))
            if not chunk:
                break
            digest.update(chunk)
            left = None if left is None else left - len(chunk)
