"""Collections of antibodies of different lengths, fused in padded batches of similar lengths.

``CrossAttention.fuse_collection`` and ``OnnxFusion.fuse_collection`` (lists or dicts of (L_i, D)
arrays) and the ``crossattn-gpu fuse`` command (npz files, ``fuse_files``) all fuse a ``Collection``:
every entry is checked first, then the antibodies are sorted by length and fused in batches of
similar lengths, so that padding (and its wasted work) stays small, and each antibody's results are
cut from its batch's.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from . import _checks
from .weights import host_values

RESULT_KEYS = (
    "fused_sequential", "fused_structural", "bidirectional_fusion", "attention_weights_seq_to_struct",
    "attention_weights_struct_to_seq", "seq_similarity", "struct_similarity",
)


@dataclass(frozen=True)
class Labels:
    """How errors name things: ``item``, one antibody's key ("id", "item"); ``sides``, the two
    collections; ``entries``, one embedding of each side, formats with ``{key!r}``."""

    item: str
    sides: tuple = ("sequential", "structural")
    entries: tuple = ("sequential[{key!r}]", "structural[{key!r}]")


FILE_LABELS = Labels("id", ("the sequence file", "the structure file"),
                     ("id {key!r}: sequence embedding", "id {key!r}: structure embedding"))


def check_keys(seq: Mapping, struct: Mapping, sides: tuple = Labels("id").sides) -> list:
    """The shared keys, in ``seq``'s order; ValueError naming (a few of) the keys that one side lacks."""
    keys = list(seq)
    only_seq, only_struct = [k for k in keys if k not in struct], [k for k in struct if k not in seq]
    if only_seq or only_struct:

        def few(found):
            return ", ".join(map(repr, found[:5])) + (f" and {len(found) - 5} more" if len(found) > 5 else "")

        parts = [f"{len(found)} only in {side} ({few(found)})" for side, found in zip(sides, (only_seq, only_struct)) if found]
        raise ValueError("both sides must hold the same antibody ids: " + "; ".join(parts))
    return keys


def fusion_flops(len_s: int, len_t: int, width: int, heads: int) -> int:
    """FLOPs of one antibody's folded fusion, both directions: per direction the query and value
    projections (2 x L x D x H*D each) and the scores and probabilities times values (2 x H x Ls x Lt x D
    each)."""
    return 4 * heads * width * (width * (len_s + len_t) + 2 * len_s * len_t)


def length_batches(keys: list, seq_lengths: dict, struct_lengths: dict, batch_size: int, *, width: int,
                   heads: int, join_flops: float) -> list[list]:
    """Keys sorted by length (the longer of an antibody's two), longest first (ties in the given
    order), cut into batches of at most ``batch_size``.

    An antibody joins the batch of the longer ones before it only while the work the padding adds
    (``fusion_flops`` of the padded batch, less that of its members unpadded) stays within
    ``join_flops``, what a call of its own is worth on its backend (the backend's ``call_flops``): on
    onnxruntime's CPU provider, short antibodies share calls and long ones go alone; on NumPy (whose
    calls of one or two examples leave a core idle) and on a GPU (where a call costs far more), most
    share.

    Longest first, so that the first batch sizes the memory every later one reuses: onnxruntime grows
    its memory arena on every call bigger than all before it, which made shortest-first batches take
    4.2 s instead of 2.6 s each (64 antibodies, L ~ 120, D = 1280, H = 8, this project's CPU).
    """

    def flops(len_s, len_t, count=1):
        return count * fusion_flops(len_s, len_t, width, heads)

    batches, padded_to = [], None  # the last batch's padded lengths
    for key in sorted(keys, key=lambda k: -max(seq_lengths[k], struct_lengths[k])):
        len_s, len_t = seq_lengths[key], struct_lengths[key]
        if batches and len(batches[-1]) < batch_size:
            members, (max_s, max_t) = batches[-1], padded_to
            joined_s, joined_t = max(max_s, len_s), max(max_t, len_t)
            added = flops(joined_s, joined_t, len(members) + 1) - flops(max_s, max_t, len(members)) - flops(len_s, len_t)
            if added <= join_flops:
                members.append(key)
                padded_to = joined_s, joined_t
                continue
        batches.append([key])
        padded_to = len_s, len_t
    return batches


class Side:
    """One side of a collection (the sequence or the structure embeddings), described before any work:
    each entry's shape, and the library, device and promoted dtype that its padded batches take.

    TypeError, naming the entry, for one that is not floating point, or of another kind or device than
    the first (torch tensors, CuPy arrays, else NumPy arrays or array-likes). ``fuse_files.EmbeddingFile``
    describes itself from its arrays' headers (``shapes``, ``dtypes``), without reading their data.
    """

    def __init__(self, collection: Mapping, entry: str):
        self.collection, self.entry = collection, entry
        known = getattr(collection, "shapes", None)
        if known is not None:
            self.shapes, self.library, self.device = known, "numpy", None
            self.dtype = np.result_type(*collection.dtypes)
            return
        self.shapes, dtypes = {}, []
        self.library, self.device, self.dtype = "numpy", None, None
        for key, value in collection.items():
            if not self.shapes:
                self.library = _library(value)
                self.device = None if self.library == "numpy" else value.device
                first = f"{self.name(key)} is {_kind(value)}"
            if _library(value) != self.library or (self.device is not None and value.device != self.device):
                raise TypeError(f"{self.name(key)} is {_kind(value)}, but {first}; the embeddings of one side must "
                                "be of one kind on one device")
            if self.library == "torch":
                _checks.check_no_grad(value, self.name(key))
            if self.library == "numpy" and _checks.is_device_array(value):  # never copied to the host silently
                raise TypeError(f"{self.name(key)} is {_kind(value)} on a device; a collection pads torch tensors and "
                                "CuPy arrays on their device, others on the host: pass torch or CuPy arrays")
            arr = value if self.library != "numpy" else _checks.host_array(value, self.name(key))
            if _dtype_name(arr.dtype) not in _checks.FLOAT_DTYPES:
                raise TypeError(f"{self.name(key)} has dtype {_dtype_name(arr.dtype)}; embeddings must be floating "
                                f"point ({', '.join(_checks.FLOAT_DTYPES)})")
            self.shapes[key] = tuple(arr.shape)
            dtypes.append(arr.dtype)
        if dtypes and self.library == "torch":
            self.dtype = functools.reduce(sys.modules["torch"].promote_types, dtypes)
        elif dtypes:
            self.dtype = np.result_type(*dtypes)

    def name(self, key) -> str:
        return self.entry.format(key=key)

    @property
    def dtype_name(self) -> str | None:
        return None if self.dtype is None else _dtype_name(self.dtype)

    def pad(self, keys: list) -> tuple:
        """The entries of ``keys``, read now, as a zero-padded (B, max L, D) array of the side's kind,
        device and dtype, and their lengths (int64 NumPy)."""
        lengths = np.array([self.shapes[k][0] for k in keys], dtype=np.int64)
        shape = (len(keys), int(lengths.max()), self.shapes[keys[0]][1])
        if self.library == "numpy":
            padded = np.zeros(shape, dtype=self.dtype)
            for row, key in enumerate(keys):
                padded[row, : lengths[row]] = _checks.host_array(self.collection[key], self.name(key))
            return padded, lengths
        # torch and CuPy: all the rows copied into place at once (row b's i-th to flat row b * max L + i):
        # four kernel launches a batch on a GPU where a copy per antibody took one each (not timed on a
        # GPU; torch CPU tensors, 64 antibodies of L 8..14, D = 64: 2.25 -> 1.76 us of host time each).
        places = np.repeat(np.arange(len(keys)) * shape[1] - np.cumsum(lengths) + lengths, lengths)
        places += np.arange(int(lengths.sum()))
        values = [self.collection[key] for key in keys]
        if self.library == "torch":
            torch = sys.modules["torch"]
            padded = torch.zeros(shape, dtype=self.dtype, device=self.device)
            rows = torch.cat([v.to(self.dtype) for v in values])
            padded.view(-1, shape[2]).index_copy_(0, torch.from_numpy(places).to(self.device), rows)
        else:
            cupy = sys.modules["cupy"]
            padded = cupy.zeros(shape, dtype=self.dtype)
            padded.reshape(-1, shape[2])[cupy.asarray(places)] = cupy.concatenate([v.astype(self.dtype, copy=False) for v in values])
        return padded, lengths


def _library(x) -> str:
    """The library whose arrays a collection is padded in: torch, cupy, or numpy (anything else)."""
    if _checks.is_torch_tensor(x):
        return "torch"
    return "cupy" if type(x).__module__.split(".")[0] == "cupy" else "numpy"


def _dtype_name(dtype) -> str:
    """A NumPy or torch dtype's name: float32, bfloat16..."""
    return str(dtype).replace("torch.", "") if not isinstance(dtype, np.dtype) else dtype.name


def _kind(x) -> str:
    library = _library(x)
    if library == "numpy":
        return f"a {type(x).__module__.split('.')[0]} {type(x).__name__}"
    return f"a {'torch tensor' if library == 'torch' else 'CuPy array'} on {x.device}"


#: Why an antibody's two lengths must be equal, for ``CrossAttention`` and the CLI.
EQUAL_LENGTHS = "bidirectional fusion needs equal lengths (bidirectional=False, or --no-bidirectional, skips it)"


def from_lists_or_dicts(model, sequential, structural, *, bidirectional: bool, join_flops: float,
                        equal_lengths: str = EQUAL_LENGTHS, one_batch: str = "fuse_representations",
                        labels: Labels | None = None) -> tuple:
    """The checked ``Collection`` of two lists (or tuples) or two dicts (``labels`` say how its errors
    name them; by default "item" and "id"), and whether they were dicts.

    TypeError for anything else (naming ``one_batch``, what fuses one padded batch), ValueError for
    lists of different lengths; then what ``Collection`` raises.
    """
    as_dicts = isinstance(sequential, Mapping) and isinstance(structural, Mapping)
    if not as_dicts:
        if not (isinstance(sequential, (list, tuple)) and isinstance(structural, (list, tuple))):
            raise TypeError(
                "sequential and structural must be two lists (or tuples) of (L, D) arrays, or two dicts of them "
                f"by id; got {type(sequential).__name__} and {type(structural).__name__}. For one padded "
                f"(B, L, D) batch, call {one_batch} with sequential_lengths and structural_lengths"
            )
        if len(sequential) != len(structural):
            counted = f"{len(sequential)} antibod{'y' if len(sequential) == 1 else 'ies'}"
            raise ValueError(f"sequential holds {counted} and structural {len(structural)}; "
                             "each antibody needs an entry in both")
        sequential, structural = dict(enumerate(sequential)), dict(enumerate(structural))
    collection = Collection(model, sequential, structural, bidirectional=bidirectional, join_flops=join_flops,
                            labels=labels or Labels("id" if as_dicts else "item"), equal_lengths=equal_lengths)
    return collection, as_dicts


class Collection:
    """Antibodies by key: two sides (``seq`` and ``struct`` map the same keys to (L, D) arrays), checked
    against ``model`` (its ``embedding_dim`` and ``attention_heads``) before any work.

    ValueError for mismatched keys, an array that is not (L, D) with L >= 1 and the model's D, or (with
    ``bidirectional``) an antibody whose two lengths differ; TypeError as ``Side`` says. ``labels`` says
    how the errors name the antibodies and their embeddings, and ``equal_lengths`` why the lengths
    must be equal; ``join_flops`` is what a call of its own is worth (``length_batches``). The arrays
    themselves are read (``seq[key]``) when their batch runs, where the mapping knows the shapes and
    dtypes without reading, as ``fuse_files.EmbeddingFile`` does.
    """

    def __init__(self, model, seq: Mapping, struct: Mapping, *, bidirectional: bool, join_flops: float,
                 labels: Labels = Labels("id"), equal_lengths: str = EQUAL_LENGTHS):
        self.model, self.bidirectional, self.labels, self.join_flops = model, bidirectional, labels, join_flops
        self.keys = check_keys(seq, struct, labels.sides)
        self.sides = Side(seq, labels.entries[0]), Side(struct, labels.entries[1])
        for key in self.keys:
            for side in self.sides:
                shape = side.shapes[key]
                if len(shape) != 2:
                    raise ValueError(f"{side.name(key)} has shape {shape}; each embedding must be an (L, D) array")
                if shape[0] == 0:
                    raise ValueError(f"{side.name(key)} is empty (shape {shape}); each embedding needs L >= 1")
                if shape[1] != model.embedding_dim:
                    raise ValueError(f"{side.name(key)} has width {shape[1]}, but the model has D={model.embedding_dim}")
            len_s, len_t = (side.shapes[key][0] for side in self.sides)
            if bidirectional and len_s != len_t:
                raise ValueError(f"{labels.item} {key!r}: sequence length {len_s} != structure length {len_t}; "
                                 f"{equal_lengths}")

    def result_elements(self, need_weights: bool, need_similarity: bool) -> dict:
        """Element counts of every antibody's results together, by what they are (``_memory``)."""
        len_s, len_t = (np.array([side.shapes[k][0] for k in self.keys], dtype=np.int64) for side in self.sides)
        heads, width = self.model.attention_heads, self.model.embedding_dim
        return {
            "fused outputs": int(((1 + self.bidirectional) * len_s + len_t).sum()) * width,
            "probabilities (need_weights)": need_weights and 2 * heads * int((len_s * len_t).sum()),
            "similarities (need_similarity)": need_similarity and int((len_s * len_s + len_t * len_t).sum()),
        }

    def fuse(self, *, batch_size: int, need_weights: bool = False, need_similarity: bool = False) -> Iterator[tuple]:
        """Fuse every antibody with ``model.fuse_representations`` (a CrossAttention's); yield ``(key,
        results)`` batch by batch, longest antibodies first: ``results`` is the dict it returns for the
        antibody's two arrays alone, cut from its padded batch's (views of them)."""
        for keys, (xs, s_len), (xt, t_len) in self.batches(batch_size):
            result = self.run(keys, xs, xt, lambda: self.model.fuse_representations(
                xs, xt, sequential_lengths=unless_full(s_len), structural_lengths=unless_full(t_len),
                bidirectional=self.bidirectional, need_weights=need_weights, need_similarity=need_similarity,
            ))
            for row, key in enumerate(keys):
                yield key, _cut(result, row, s_len[row], t_len[row])

    def batches(self, batch_size: int) -> Iterator[tuple]:
        """``(keys, (xs, s_len), (xt, t_len))`` for each batch (``length_batches``), longest first: the
        batch's keys, and each side's padded (B, max L, D) array and int64 lengths, read when reached."""
        seq_lengths, struct_lengths = ({k: side.shapes[k][0] for k in self.keys} for side in self.sides)
        for keys in length_batches(self.keys, seq_lengths, struct_lengths, batch_size, width=self.model.embedding_dim,
                                   heads=self.model.attention_heads, join_flops=self.join_flops):
            yield (keys, *(side.pad(keys) for side in self.sides))

    def run(self, keys: list, xs, xt, call):
        """``call()``, the fusion of one padded batch, whose errors then name the batch's first and last
        keys and, for a value, the antibodies to look at (``_culprits``)."""
        item = self.labels.item
        batch = f"in the batch with {item}s {keys[0]!r}..{keys[-1]!r}"
        try:
            return call()
        except TypeError as exc:  # a dtype the backend lacks: the batch's first and last keys say enough
            raise TypeError(f"{batch}: {exc}") from exc
        except (ValueError, OverflowError) as exc:
            raise type(exc)(f"{batch}{_culprits(keys, xs, xt, item)}: {exc}") from exc


def unless_full(lengths: np.ndarray):
    """Lengths for a batch with padding, None without: the `onnx` backend's graphs without length
    inputs skip a pass over the scores and one over the outputs (~8% of W2c)."""
    return None if (lengths == lengths.max()).all() else lengths


def unpadded(name: str, len_s: int, len_t: int) -> tuple:
    """The slices that cut one example's result ``name`` (batch axis gone; one head's, for the
    probabilities) to its unpadded lengths."""
    lengths = {"fused_sequential": (len_s,), "fused_structural": (len_t,), "bidirectional_fusion": (len_s,),
               "attention_weights_seq_to_struct": (len_s, len_t), "attention_weights_struct_to_seq": (len_t, len_s),
               "seq_similarity": (len_s, len_s), "struct_similarity": (len_t, len_t)}[name]
    return tuple(slice(0, int(n)) for n in lengths)


def _cut(result: dict, row: int, len_s: int, len_t: int) -> dict:
    """One antibody's results from its batch's: ``row``, without the padding."""
    cut = {}
    for key in RESULT_KEYS:
        value, rows = result[key], unpadded(key, len_s, len_t)
        if isinstance(value, list):
            cut[key] = [head[(row, *rows)] for head in value]
        else:
            cut[key] = None if value is None else value[(row, *rows)]
    cut["fusion_complete"] = True
    return cut


def _culprits(keys: list, xs, xt, item: str, shown: int = 5) -> str:
    """Which antibodies of a failed batch to look at: those whose embeddings hold NaN or Inf, else the
    one of the largest magnitude (an input past the dtype, or an overflow), as " (...)"."""
    xs, xt = host_values(xs, "the batch"), host_values(xt, "the batch")  # a copy from a device is fine now
    finite = np.isfinite(xs).all(axis=(1, 2)) & np.isfinite(xt).all(axis=(1, 2))
    if not finite.all():
        bad = [keys[row] for row in np.flatnonzero(~finite)]
        more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
        return f" (NaN or Inf in {item}{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad[:shown]))}{more})"
    magnitudes = np.maximum(np.abs(xs).max(axis=(1, 2)), np.abs(xt).max(axis=(1, 2)))
    row = int(np.argmax(magnitudes))
    return f" (largest magnitude {float(magnitudes[row]):.3g}, in {item} {keys[row]!r})"
