"""Fuse whole collections of antibodies stored as npz files (the ``crossattn-gpu fuse`` command).

Each input file holds one (L_i, D) array per antibody id. Antibodies are sorted by length and fused
in padded batches of similar lengths, so padding (and its wasted work) stays small. The files are
streamed: only the arrays' headers are read up front, each batch's arrays are read when it runs, and
its outputs are written to the output file as soon as they are computed, so memory holds one batch
whatever the number of antibodies.
"""

from __future__ import annotations

import os
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ._files import NPZ_READ_ERRORS, npy_header, whole_file
from .attention import CrossAttention
from .ragged import FILE_LABELS, Collection

OUTPUT_KEYS = ("fused_sequential", "fused_structural", "bidirectional_fusion")


class EmbeddingFile(Mapping):
    """The (L, D) arrays of an npz file by id, each read from the file when asked for.

    Opening reads the arrays' shapes (``shapes``) and dtypes (``dtypes``, the set of their names) from
    their headers, not their data:
    ValueError for an unreadable file, an empty one, an id held twice, an array that is not (L, D), or
    one whose data is not the size its header says; TypeError for one that is not floating point
    (pickled objects are never loaded). The file stays open until ``close()`` (or the end of a
    ``with`` block).
    """

    def __init__(self, path, name: str):
        self.path, self.name = path, name
        try:
            self._zip = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise
        except NPZ_READ_ERRORS as exc:
            raise ValueError(f"{name} file {path} is not a readable npz file: {exc}") from exc
        self._members, self.shapes, self.dtypes = {}, {}, set()
        try:
            for member in self._zip.namelist():
                key = member[:-4] if member.endswith(".npy") else member
                if key in self._members:  # a zip may hold a name twice (np.savez never writes one so)
                    raise ValueError(f"{name} file {path}: id {key!r} appears twice; each id needs one array")
                shape, dtype = self._header(member)
                if len(shape) != 2:
                    raise ValueError(f"{name} file {path}: id {key!r} has shape {shape}; each id needs an (L, D) array")
                if dtype.kind != "f":
                    raise TypeError(f"{name} file {path}: id {key!r} has dtype {dtype}; embeddings must be floating point")
                self._members[key], self.shapes[key] = member, shape
                self.dtypes.add(dtype.name)
        except BaseException:
            self._zip.close()
            raise
        if not self.shapes:
            self._zip.close()
            raise ValueError(f"{name} file {path} holds no arrays")

    def _header(self, member: str) -> tuple[tuple, np.dtype]:
        try:
            return npy_header(self._zip, member)
        except NPZ_READ_ERRORS as exc:
            raise ValueError(f"{self.name} file {self.path} is not a readable npz file: member {member!r}: {exc}") from exc

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            with self._zip.open(self._members[key]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except NPZ_READ_ERRORS as exc:
            raise ValueError(f"{self.name} file {self.path}: id {key!r} cannot be read: {exc}") from exc

    def __contains__(self, key) -> bool:  # Mapping's would read the array
        return key in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "EmbeddingFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NpzWriter:
    """Writes arrays into an npz file one at a time (the format of ``np.savez``, without holding them
    all). The file appears at the end of the ``with`` block, whole, or not at all if the block raised
    (``_files.whole_file``): two runs given the same output each leave a whole file, never a mix of
    both. Like ``np.savez``, it adds ``.npz`` to a path without it.

    ``keep``: files the output must not replace (the inputs): ValueError naming the one it would.
    """

    def __init__(self, path, keep: dict | None = None):
        path = Path(os.fspath(path))
        if path.is_dir():
            raise ValueError(f"{path} is a directory; name the output npz file")
        self.path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
        for what, kept in (keep or {}).items():
            if self.path.exists() and os.path.samefile(self.path, kept):
                raise ValueError(f"the output {self.path} is the {what} itself; writing it would replace it")

    def __enter__(self) -> "NpzWriter":
        self._whole = whole_file(self.path)
        self._zip = zipfile.ZipFile(self._whole.__enter__(), "w", zipfile.ZIP_STORED, allowZip64=True)
        return self

    def write(self, key: str, array) -> None:
        with self._zip.open(key + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    def __exit__(self, *exc) -> None:
        try:
            self._zip.close()  # writes the zip's directory: a full disk fails here too
        except BaseException:
            if not self._whole.__exit__(*sys.exc_info()):
                raise
            return
        self._whole.__exit__(*exc)


class Progress:
    """A one-line progress bar on stderr (the one current when the bar is made, not at import: a
    caller may have redirected it since), redrawn at most 5 times a second."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = sys.stderr if stream is None else stream
        self.done, self.start, self.last_draw = 0, time.perf_counter(), 0.0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if self.enabled and (now - self.last_draw > 0.2 or self.done == self.total):
            self.last_draw = now
            filled = int(30 * self.done / self.total)
            rate = self.done / max(now - self.start, 1e-9)
            self.stream.write(
                f"\rfusing [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} antibodies, {rate:.0f}/s"
            )
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


def fuse_collections(
    model,
    seq: Mapping[str, np.ndarray],
    struct: Mapping[str, np.ndarray],
    *,
    batch_size: int = 64,
    bidirectional: bool = True,
    progress: bool = False,
):
    """Fuse every antibody; yield ``("<id>/<output>", array)`` pairs, batch by batch (``ragged.Collection``).

    ``model`` is a ``CrossAttention`` or an ``OnnxFusion`` (an exported model: one that outputs
    ``bidirectional_fusion`` needs equal lengths, and ``bidirectional=False`` then only leaves it out of
    the pairs; one exported without it needs ``bidirectional=False``). ``seq`` and ``struct`` map ids to
    (L, D) arrays (dicts, or ``EmbeddingFile``s, which read each array when its batch runs). Everything
    that the shapes decide is checked before the first batch runs: ValueError for mismatched ids, a
    width other than the model's D, or (with ``bidirectional``) an antibody whose two lengths differ.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if isinstance(model, CrossAttention):
        collection = Collection(model, seq, struct, bidirectional=bidirectional, join_flops=model._backend.call_flops,
                                labels=FILE_LABELS)
        fused = collection.fuse(batch_size=batch_size)
    else:
        if bidirectional and "bidirectional_fusion" not in model.output_names:
            raise ValueError("the model was exported without bidirectional_fusion (--no-bidirectional); fuse with "
                             "--no-bidirectional")
        collection, _, batch_size = model._collection(seq, struct, batch_size, labels=FILE_LABELS)
        fused = model._fuse(collection, batch_size)
    names = OUTPUT_KEYS if bidirectional else OUTPUT_KEYS[:2]
    bar = Progress(len(seq), enabled=progress and len(seq) > batch_size)
    for key, results in fused:
        for name in names:
            if results.get(name) is not None:
                yield f"{key}/{name}", results[name]
        bar.advance(1)
