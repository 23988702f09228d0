"""Serve an exported fusion with onnxruntime: ``OnnxFusion(path)``.

Before onnxruntime sees a file, it is parsed by ``onnx`` without its external data, and refused when
an external-data location is absolute, leaves the model's folder, or is a symlink: a model file must
not make the server read arbitrary files. A corrupt or truncated file gives a ValueError.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import _memory, _overflow, _threads
from .._checks import check_input, check_lengths, check_mask, check_same_rank, check_values, is_device_array
from .._optional import require
from ..backends.numpy_backend import NumpyBackend

require("onnx", "the ONNX runner")
ort = require("onnxruntime", "the ONNX runner")
import onnx  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402
from onnx import TensorProto  # noqa: E402

from .integrity import DIGEST_KEY, model_digest  # noqa: E402

#: The NumPy backend's checks, for the host arrays this runner takes (it has no state).
_HOST = NumpyBackend()

#: onnxruntime's names of the float input types a model of this library takes, and their NumPy dtypes.
_FLOAT_TYPES = {"tensor(double)": np.dtype(np.float64), "tensor(float)": np.dtype(np.float32),
                "tensor(float16)": np.dtype(np.float16)}


_TRANSPOSE_MATMUL_FUSION = "MatmulTransposeFusion"


class _SessionWithoutFallback(ort.InferenceSession):
    """An onnxruntime session without its retry on the CPU provider when a load or a run fails. The retry
    prints a banner to stdout, loads a damaged model twice (a damaged name fails as a UnicodeDecodeError,
    which it takes for a provider's error), and would run on the CPU what the CUDA provider cannot: the
    fallback this library never makes unasked. onnxruntime 1.23 and later honour ``enable_fallback=0``;
    1.18 to 1.22 ignore it, turn the retry on in ``__init__`` and then build the session in
    ``_create_inference_session`` (read in their sources), so the retry is turned off there, with the
    public ``disable_fallback``, which also covers the retry of a failed run."""

    def _create_inference_session(self, *args, **kwargs):
        self.disable_fallback()
        return super()._create_inference_session(*args, **kwargs)


@lru_cache(maxsize=1)
def fusion_takes_float64() -> bool:
    """Whether this onnxruntime loads a float64 Transpose feeding a MatMul. Its ``MatmulTransposeFusion``
    turns the pair into a ``FusedMatMul``, which long had a float kernel only (onnxruntime issues 10151
    and 28136; 1.32 has a double one, 1.18, the extra's floor, not), so the float64 graphs failed to
    load there. Where it does not, a model that fails to load is tried once more without that fusion,
    which stays on elsewhere: the float64 fusion of four W2c-shaped examples ran 9% faster with it on
    onnxruntime 1.32 (13.2 against 14.4 ms, this project's 2-core CPU)."""
    double = TensorProto.DOUBLE
    return _loads([onnx.helper.make_node("Transpose", ["b"], ["bt"]), onnx.helper.make_node("MatMul", ["a", "bt"], ["c"])],
                  [onnx.helper.make_tensor_value_info(n, double, [2, 2]) for n in "ab"],
                  onnx.helper.make_tensor_value_info("c", double, [2, 2]), opset=14)


@lru_cache(maxsize=1)
def attention_float64_mask_fails() -> bool:
    """Whether this onnxruntime runs the Attention operator (opset 23) on float64, but not with a float64
    mask: 1.23 failed to load that ("Type parameter (T) of Optype (Add) bound to different types"),
    1.24 and later load it, and releases before 1.23 have no opset 23. The float64 export at opset 23
    passes its masks so; ``OnnxSession`` names the way out when such a model fails to load."""
    double = TensorProto.DOUBLE

    def loads_attention(mask_type) -> bool:
        inputs = [onnx.helper.make_tensor_value_info(n, double, [1, 1, 2, 2]) for n in "qkv"]
        inputs.append(onnx.helper.make_tensor_value_info("m", mask_type, [1, 1, 2, 2]))
        return _loads([onnx.helper.make_node("Attention", ["q", "k", "v", "m"], ["o"])], inputs,
                      onnx.helper.make_tensor_value_info("o", double, [1, 1, 2, 2]), opset=23)

    return loads_attention(TensorProto.BOOL) and not loads_attention(double)


def _loads(nodes: list, inputs: list, output, opset: int) -> bool:
    """Whether this onnxruntime loads the graph of ``nodes`` (one output) on its CPU provider."""
    graph = onnx.helper.make_graph(nodes, "probe", inputs, [output])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 10)
    try:
        _SessionWithoutFallback(model.SerializeToString(), providers=["CPUExecutionProvider"], enable_fallback=0)
    except Exception:
        return False
    return True


def _all_tensors(graph):
    """Every TensorProto in a graph and its subgraphs (initializers and attribute tensors)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def check_external_data(model: onnx.ModelProto, model_dir: Path) -> None:
    """ValueError when an external-data location is absolute, escapes ``model_dir`` or is a symlink."""
    root = model_dir.resolve()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        candidate = model_dir / location
        if not location or os.path.isabs(location):
            raise ValueError(f"tensor {tensor.name!r}: external data location {location!r} must be a relative path")
        if root not in candidate.resolve().parents:
            raise ValueError(f"tensor {tensor.name!r}: external data location {location!r} leaves the model's folder")
        for part in [candidate, *candidate.parents]:
            if part == model_dir:
                break
            if part.is_symlink():
                raise ValueError(f"tensor {tensor.name!r}: external data location {location!r} goes through a symlink")


def load_checked(path) -> onnx.ModelProto:
    """Parse an ONNX file (without its external data), check its external-data locations, and check
    the digest that ``to_onnx`` stores (``integrity.DIGEST_KEY``) where there is one: ValueError for
    a damaged file, which would otherwise load and compute other numbers."""
    path = Path(os.fspath(path))
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; name the .onnx file in it")
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}" + (" (not a regular file)" if path.exists() else ""))
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a valid ONNX model (corrupt or truncated?): {exc}") from exc
    if not model.graph.node:
        raise ValueError(f"{path} is not a valid ONNX model: its graph is empty")
    check_external_data(model, path.parent)
    stored = {prop.key: prop.value for prop in model.metadata_props}.get(DIGEST_KEY)
    if stored is not None:  # models of other tools, and of crossattn_gpu before it stored one, have none
        try:
            found = model_digest(model, path.parent)
        except (OSError, ValueError) as exc:  # external data missing, an offset that is no number
            raise ValueError(f"{path}: its external data cannot be read: {exc}") from exc
        if stored != found:
            raise ValueError(f"{path} is damaged: what it holds does not match the {DIGEST_KEY} digest stored "
                             "when it was exported; export it again")
    return model


class InputSpec(NamedTuple):
    """An input of a session: its shape (ints, and names or None for dynamic axes) and its type."""

    shape: list
    type: str


def choose_providers(providers=None) -> list:
    """The CUDA provider when onnxruntime offers it, else the CPU one; or the caller's list, checked: each
    entry a provider's name or, as onnxruntime takes them, a (name, options dict) pair, such as
    ``("CUDAExecutionProvider", {"device_id": 1})`` for a second GPU. TypeError for another kind of
    list or entry, ValueError for a name this onnxruntime does not offer."""
    available = ort.get_available_providers()
    if providers is None:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]
    if not isinstance(providers, (list, tuple)) or not providers:
        raise TypeError(f"providers must be a non-empty list of onnxruntime providers; got {providers!r}")
    missing = [name for name in map(provider_name, providers) if name not in available]
    if missing:
        raise ValueError(f"onnxruntime here offers {', '.join(available)}; not {', '.join(missing)}")
    return list(providers)


def provider_name(entry) -> str:
    """The name of a providers entry: a name, or a (name, options dict) pair; TypeError otherwise."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], dict):
        return entry[0]
    raise TypeError(f"each provider must be a name or a (name, options dict) pair; got {entry!r}")


#: Examples per onnxruntime run on the CPU are chosen so that one run's largest intermediates, the
#: heads' (b, H, L, D) projections or (b, H, Lq, Lk) scores, hold about this many elements (2 MiB in
#: float32), which keeps the memory-bound passes between the GEMMs (softmax, head splits, the heads'
#: sum) in cache. onnxruntime 1.32 on this project's 2-core CPU, float32 fusion, examples per run:
#: B=64, L=256, D=128, H=4: all 64 77.6 ms, 16 73.8, 4 62.6-68.5, 1 65.9; B=64, L=120, D=1280,
#: H=8: all 64 2523 ms, 16 1967, 4 1927-1978, 1 2200; B=256, L=100, D=64, H=2: all 21.4 ms, 16 14.0.
CPU_RUN_ELEMENTS = 1 << 19

#: ... and at least this many rows of each input per run: thinner projection GEMMs lose more than the
#: cache gains (the L=120, D=1280 batch above: one example a run is 14% slower than four).
CPU_RUN_MIN_ROWS = 512


def cpu_examples_per_run(length: int, width: int, heads: int) -> int:
    """Examples per onnxruntime run on the CPU for sequences up to ``length`` (see ``CPU_RUN_ELEMENTS``)."""
    per_example = heads * length * max(width, length)
    return max(1, -(-CPU_RUN_MIN_ROWS // length), CPU_RUN_ELEMENTS // per_example)


#: A run on the CPU provider whose work, examples x H x L x D x max(L, D) (``run``'s ``shape``), is at
#: most this goes to a session without a thread pool: waking the pool's threads costs more than they
#: save there. Fusion through the ``onnx`` backend on this project's 2-core CPU, B = 1, both
#: directions, pooled (threads stopped after each run) against one thread (us): D = 64, H = 2, L = 10
#: 73 / 59, L = 48 103 / 92, L = 96 146 / 153; D = 128, H = 4, L = 10 123 / 110, L = 24 164 / 160,
#: L = 48 223 / 260.
SERIAL_RUN_WORK = 1 << 20


def _model_shape(metadata: dict, length: int) -> tuple[int, int, int] | None:
    """(length, D, heads) from a model's metadata (``embedding_dim``, ``attention_heads``, default 1),
    or None where it does not name them as positive integers."""
    try:
        shape = (length, int(metadata["embedding_dim"]), int(metadata.get("attention_heads", 1)))
    except (KeyError, ValueError):
        return None
    return shape if min(shape) > 0 else None


def pool_threads() -> int:
    """Threads of a pooled session: 0 (onnxruntime's choice, a thread per physical core, each pinned
    to its core) unless this process may use fewer CPUs than the machine has, by its CPU affinity or a
    container's CPU quota (``_threads.cpu_count``, as the NumPy backend's workers): then that many.
    onnxruntime's own choice heeds neither: under ``taskset -c 0`` on this project's 2-core CPU its pool
    still ran a thread on the other core (W2c 65 ms; 122 ms on the one core it was given), and under a
    2-CPU quota on a 64-core host it would start a thread per host core."""
    allowed = _threads.cpu_count()
    return allowed if allowed < (os.cpu_count() or allowed) else 0


def _run_work(examples: int, shape: tuple[int, int, int]) -> int:
    length, width, heads = shape
    return examples * heads * length * width * max(length, width)


class OnnxSession:
    """An onnxruntime session with checked inputs: names, ranks, widths and dtypes.

    ``initializers``: with a model built with ``GraphBuilder(external=...)``, the weights it refers to
    (name -> array), handed to onnxruntime directly. They never pass through protobuf, which caps a
    serialised model at 2 GiB (the folded float32 weights of D = 4096 with 16 heads, or of D = 5120
    with 11), and the session is built without two copies of them: D = 1280, H = 8 (100 MB), on this
    project's CPU, a further kind of call's first run in the ``onnx`` backend took 0.23 s more than the
    next instead of 0.67 s, and its session ~110 MB instead of ~210 MB.

    Threads: onnxruntime's pool threads spin for new work after a run, by default for long enough to
    take the cores from whatever runs next: another session (the ``onnx`` backend has one per kind of
    call) or the caller's own code. Here they stop when a run returns (``session.force_spinning_stop``).
    On this project's 2-core CPU, float32, W2c-shaped calls through the ``onnx`` backend: fusion
    alternating with and without similarities 95 / 111 ms -> 71 / 84 ms (each alone: 67 / 86 ms, either
    way); the caller's 1024 x 1024 float32 GEMM right after a call 36 -> 9.5 ms (alone 8.8); one
    example of L = 4096 with similarities (three sessions) 205 -> 175 ms. A pool has ``pool_threads``
    threads, no more than the CPUs this process may use. On the CPU provider, a model
    whose metadata names its width and heads also gets a second, one-thread session for small runs
    (``SERIAL_RUN_WORK``) when its smallest run (one example of L = 1) would be small.
    """

    def __init__(self, model_or_path, providers=None, initializers: dict | None = None):
        self.providers, self._named = choose_providers(providers), providers is not None
        source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else os.fspath(model_or_path)
        self.session = self._session(source, initializers)
        self.provider = self.session.get_providers()[0]
        if self._named and self.provider != provider_name(self.providers[0]):
            # onnxruntime leaves out a provider that fails to start (the CUDA one without its CUDA
            # libraries, say) with a line in its log, and runs on the next: for a provider the caller
            # named, that is a silent fallback.
            raise RuntimeError(f"onnxruntime could not start {provider_name(self.providers[0])} (its log above may "
                               f"say why) and would run on {self.provider}; pass "
                               f"providers={self.session.get_providers()!r} to run there")
        try:  # every string onnxruntime decodes from the model, read once here
            self.inputs = {i.name: InputSpec(list(i.shape), i.type) for i in self.session.get_inputs()}
            self.output_names = [o.name for o in self.session.get_outputs()]
            self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        except UnicodeDecodeError as exc:  # bytes of a damaged file, which onnxruntime hands over as UTF-8
            raise ValueError(f"the model's input or output names, axis names or metadata are not valid UTF-8 "
                             f"(a damaged file?): {exc}") from exc
        floats = [_FLOAT_TYPES[i.type] for i in self.inputs.values() if i.type in _FLOAT_TYPES]
        self.dtype = floats[0].name if floats else "float32"
        smallest = _model_shape(self.metadata, length=1)
        self._serial = None
        if self.provider == "CPUExecutionProvider" and smallest and _run_work(1, smallest) <= SERIAL_RUN_WORK:
            self._serial = self._session(source, initializers, threads=1)

    def _session(self, source, initializers: dict | None, threads: int | None = None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = pool_threads() if threads is None else threads
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if initializers:
            options.add_external_initializers(
                list(initializers), [ort.OrtValue.ortvalue_from_numpy(a) for a in initializers.values()])
        try:
            return _SessionWithoutFallback(source, options, providers=self.providers, enable_fallback=0)
        except Exception as exc:  # onnxruntime raises its own exception types
            if not fusion_takes_float64():  # a float64 model on onnxruntime 1.18, say
                try:
                    return _SessionWithoutFallback(source, options, providers=self.providers,
                                                   disabled_optimizers=[_TRANSPOSE_MATMUL_FUSION], enable_fallback=0)
                except Exception:
                    pass
            said, hint = str(exc), ""
            if isinstance(exc, UnicodeDecodeError):  # onnxruntime's message quotes a damaged name
                hint = " (onnxruntime's message held bytes that are not UTF-8: a damaged file?)"
            elif not said:  # the same on Python 3.10 (onnxruntime 1.18): an empty message, by type alone
                said = type(exc).__name__
                hint = (" with no message (onnxruntime gives none on Python 3.10 when its message held bytes "
                        "that are not UTF-8: a damaged file?)")
            if "tensor(double)" in said and attention_float64_mask_fails():
                hint = ("; onnxruntime 1.23 cannot run the Attention operator (opset 23 and later) on float64 "
                        "with a mask: export with an opset below 23, or use onnxruntime 1.24 or later")
            raise ValueError(f"onnxruntime cannot load the model: {said}{hint}") from exc

    def run(self, feeds: dict, *, shape: tuple[int, int, int] | None = None, checked: bool = False) -> dict[str, np.ndarray]:
        """Run the model on checked ``feeds``; the outputs by name.

        ``shape``: (longest sequence, D, heads) of a batched model, whose inputs and outputs all lead
        with the batch axis (a mask may lead with 1). On the CPU provider the batch then runs in
        slices of ``cpu_examples_per_run`` examples and the outputs are joined: every example is
        computed on its own either way; small runs (``SERIAL_RUN_WORK``) take the one-thread session
        when there is one. Without ``shape``, or on a GPU, the batch runs at once.

        ``checked``: ``feeds`` hold exactly the model's inputs, as arrays of its dtypes (the ``onnx``
        backend's calls, whose inputs the front end has checked), so their names, ranks and dtypes are
        not checked again: ~10 us of a W1 call.
        """
        if checked:
            prepared = feeds
        else:
            unknown = sorted(set(feeds) - set(self.inputs))
            if unknown:
                raise TypeError(f"unknown input(s) {', '.join(unknown)}; this model takes {', '.join(self.inputs)}")
            missing = sorted(set(self.inputs) - set(feeds))
            if missing:
                raise TypeError(f"missing input(s) {', '.join(missing)}")
            prepared = {name: self._prepare(name, value) for name, value in feeds.items()}
        if shape is None or self.provider != "CPUExecutionProvider":
            return self._run(self.session, prepared)
        batch = next(arr.shape[0] for name, arr in prepared.items() if self.inputs[name].type in _FLOAT_TYPES)
        step = cpu_examples_per_run(*shape)
        small = self._serial is not None and _run_work(min(batch, step), shape) <= SERIAL_RUN_WORK
        session = self._serial if small else self.session
        if batch <= step:
            return self._run(session, prepared)
        parts = [
            self._run(session, {name: arr[start : start + step] if arr.shape[0] == batch else arr
                                for name, arr in prepared.items()})
            for start in range(0, batch, step)
        ]
        return {name: np.concatenate([part[name] for part in parts]) for name in self.output_names}

    def _run(self, session, prepared: dict) -> dict[str, np.ndarray]:
        try:
            values = session.run(self.output_names, prepared)
        except Exception as exc:
            raise ValueError(f"onnxruntime failed: {exc}") from exc
        return dict(zip(self.output_names, values))

    def _prepare(self, name: str, value) -> np.ndarray:
        spec = self.inputs[name]
        arr = np.asarray(value)
        if len(spec.shape) != arr.ndim:
            raise ValueError(f"{name} must have rank {len(spec.shape)} (shape {spec.shape}); got shape {arr.shape}")
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape)):
            if isinstance(want, int) and want != got:
                raise ValueError(f"{name} must have size {want} on axis {axis} (shape {spec.shape}); got shape {arr.shape}")
        if spec.type == "tensor(int64)":
            if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
                raise TypeError(f"{name} must be integers; got dtype {arr.dtype}")
            return arr.astype(np.int64)
        if spec.type == "tensor(bool)":
            return arr.astype(bool) if arr.dtype == bool else arr != 0
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{name} must be floating point; got dtype {arr.dtype}")
        return np.ascontiguousarray(host_cast(arr, _FLOAT_TYPES[spec.type]))


#: float16 <-> float32 conversions of at least this many elements run as onnxruntime's ``Cast``
#: (``host_cast``). NumPy 2.3 converts float16 one element at a time, ~1.45 ns an element on this
#: project's CPU (a plain float32 copy is 18x faster): a W2c-sized input 3.2 ms, its (64, 256, 256)
#: similarities 6.3 ms, ~24 ms of a W2c call with float16 inputs through the ``onnx`` backend;
#: onnxruntime's vectorised Cast took 0.12 and 0.49 ms, the same bits (every finite float16 up; 20M
#: random float32 bit patterns, the float16 ties and the overflow edge down). Below it, NumPy's cast
#: beats a run's overhead.
CAST_ELEMENTS = 1 << 15
_HALF_PAIRS = {(np.dtype(np.float16), np.dtype(np.float32)), (np.dtype(np.float32), np.dtype(np.float16))}


class HalfCasts:
    """float16 -> float32 and float32 -> float16 through onnxruntime's ``Cast`` on the CPU provider, one
    session each, built on first use; exact, as NumPy's ``astype``."""

    def __init__(self):
        self._sessions = {}
        self._building = threading.Lock()

    def __call__(self, x: np.ndarray, dtype) -> np.ndarray:
        pair = (x.dtype.name, np.dtype(dtype).name)
        session = self._sessions.get(pair)
        if session is None:
            with self._building:
                session = self._sessions.get(pair)
                if session is None:
                    from .onnx_export import build_cast_model

                    session = self._sessions[pair] = OnnxSession(build_cast_model(*pair), ["CPUExecutionProvider"])
        return session.run({"x": np.ascontiguousarray(x)}, checked=True)["y"]


_HALF_CASTS = HalfCasts()


def host_cast(x: np.ndarray, dtype) -> np.ndarray:
    """``x.astype(dtype, copy=False)``, with large float16 <-> float32 conversions through onnxruntime."""
    if (x.dtype, np.dtype(dtype)) in _HALF_PAIRS and x.size >= CAST_ELEMENTS:
        return _HALF_CASTS(x, dtype)
    return x.astype(dtype, copy=False)


def _metadata_size(path, metadata: dict, key: str) -> int:
    """A positive integer of a model's metadata (``embedding_dim``, ``attention_heads``), or ValueError."""
    if key not in metadata:
        raise ValueError(f"{path} was not exported by crossattn_gpu (no {key} in its metadata)")
    value = metadata[key]
    if not (value.isascii() and value.isdigit() and int(value) > 0):
        raise ValueError(f"{path}: {key} in its metadata is {value!r}, not a positive integer (a damaged file?)")
    return int(value)


class OnnxFusion:
    """Run an exported fusion (see ``to_onnx``) with onnxruntime.

    Args:
        path: the .onnx file. Refused with ValueError if corrupt or truncated, if it no longer matches
            the digest ``to_onnx`` stored in it (``integrity.DIGEST_KEY``), or if any external-data
            location is absolute, leaves the model's folder or is a symlink.
        providers: onnxruntime execution providers, names or (name, options dict) pairs as onnxruntime
            takes them (``[("CUDAExecutionProvider", {"device_id": 1})]`` runs on the second GPU);
            default the CUDA provider when onnxruntime-gpu offers it, else the CPU one. ``provider``
            says which runs. TypeError for a list of another form, ValueError for a provider this
            onnxruntime does not offer, and RuntimeError when the first one named fails to start
            (never a silent fallback to the next).

    Call it with NumPy arrays: ``fusion(sequential_repr, structural_repr, sequential_lengths=None,
    structural_lengths=None, mask=None)`` returns a dict of the model's outputs. The inputs are both
    (B, L, D), or both (L, D) for one example, whose outputs then come without the batch axis (and which
    takes no lengths, as with ``CrossAttention``: its lengths are its arrays'). Inputs are cast to
    the model's float dtype; lengths default to the full lengths and the mask (the seed's: 0 = masked)
    to none masked, when the model takes them. As ``CrossAttention`` does, it raises ValueError for
    inputs holding NaN or Inf or too large for the model's dtype, and OverflowError when finite inputs
    overflow that dtype inside the model (the fused outputs are checked: a pass over each). On the CPU
    provider a large batch runs in slices of a few examples (``cpu_examples_per_run``), whose
    intermediates stay in cache: 64 antibodies of L = 120, D = 1280, H = 8 took 1.96 s instead of
    2.38 s on this project's 2-core CPU. ``fuse_collection`` and ``iter_collection`` fuse lists or dicts
    of antibodies of different lengths, in padded runs of similar lengths.
    """

    def __init__(self, path, providers=None):
        load_checked(path)
        self._path, self._providers = os.path.abspath(path), providers
        self._session = OnnxSession(path, providers)
        meta = self._session.metadata
        self.embedding_dim, self.attention_heads = (_metadata_size(path, meta, key)
                                                    for key in ("embedding_dim", "attention_heads"))
        for name in ("sequential_repr", "structural_repr"):
            spec = self._session.inputs.get(name)
            if spec is not None and spec.shape[-1:] != [self.embedding_dim]:
                raise ValueError(f"{path}: its metadata says embedding_dim={self.embedding_dim}, but its input "
                                 f"{name} has shape {spec.shape} (a damaged file?)")
        self.metadata = meta
        self.provider = self._session.provider
        self.dtype = self._session.dtype
        self.input_names = list(self._session.inputs)
        self.output_names = self._session.output_names

    def __repr__(self):
        return (f"OnnxFusion({self._path!r}, embedding_dim={self.embedding_dim}, attention_heads={self.attention_heads}, "
                f"dtype={self.dtype!r}, provider={self.provider!r}, inputs={self.input_names}, outputs={self.output_names})")

    def __getstate__(self) -> dict:
        """Pickled as its file's path (an onnxruntime session does not pickle), for ``multiprocessing``:
        the other process opens the file again and refuses it with ValueError if it has changed."""
        return {"path": self._path, "providers": self._providers, "metadata": self.metadata}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["providers"])
        if self.metadata != state["metadata"]:
            raise ValueError(f"{state['path']} has changed since this OnnxFusion was pickled (its metadata differs)")

    def __call__(self, sequential_repr, structural_repr, *, sequential_lengths=None, structural_lengths=None, mask=None):
        inputs = {"sequential_repr": _host_input(sequential_repr, "sequential_repr"),
                  "structural_repr": _host_input(structural_repr, "structural_repr")}
        for name, x in inputs.items():
            check_input(x, name, _HOST)
            if x.shape[-1] != self.embedding_dim:
                raise ValueError(f"{name} has width {x.shape[-1]}, but the model has D={self.embedding_dim}")
        batched = check_same_rank(inputs)
        if not batched:  # the graph's inputs are (B, L, D): one example, and its outputs without the axis
            inputs = {name: x[None] for name, x in inputs.items()}
        xs, xt = inputs.values()
        magnitude = check_values(inputs, _HOST)()
        _overflow.check_cast(inputs, magnitude, self.dtype, _HOST)
        if "bidirectional_fusion" in self.output_names and xs.shape[1] != xt.shape[1]:
            raise ValueError(
                f"this model outputs bidirectional_fusion, which needs Ls == Lt; got {xs.shape[1]} and {xt.shape[1]} "
                "(a model exported with bidirectional=False takes unequal lengths)"
            )
        feeds = {"sequential_repr": xs, "structural_repr": xt}
        if "sequential_lengths" in self.input_names:
            feeds["sequential_lengths"] = _lengths(sequential_lengths, "sequential_lengths", xs.shape, batched)
            feeds["structural_lengths"] = _lengths(structural_lengths, "structural_lengths", xt.shape, batched)
            differs = np.flatnonzero(feeds["sequential_lengths"] != feeds["structural_lengths"])
            if differs.size and "bidirectional_fusion" in self.output_names:  # its sum would take in a padded row
                b = int(differs[0])
                raise ValueError(
                    "this model outputs bidirectional_fusion, which needs equal sequential and structural lengths "
                    f"per example; example {b} has {feeds['sequential_lengths'][b]} and "
                    f"{feeds['structural_lengths'][b]} (a model exported with bidirectional=False takes unequal ones)")
        elif sequential_lengths is not None or structural_lengths is not None:
            raise TypeError("this model was exported without length inputs (lengths=False)")
        if mask is not None:  # the seed's mask: 0 = masked; the graph's: False = masked, (1 or B, Ls, Lt)
            masked = check_mask(mask, xs.shape[0], xs.shape[1], xt.shape[1], batched, _HOST)
            feeds["mask"] = np.broadcast_to(~masked, (masked.shape[0], xs.shape[1], xt.shape[1]))
        elif "mask" in self.input_names:
            feeds["mask"] = np.ones((1, xs.shape[1], xt.shape[1]), dtype=bool)  # nothing masked
        (size, len_s, width), len_t, heads = xs.shape, xt.shape[1], self.attention_heads
        per_output = self._output_elements(len_s, len_t)
        _memory.check_outputs_fit({name: size * per_output[name] for name in self.output_names}, self.dtype,
                                  "export the model without attention weights or similarities, or pass fewer "
                                  "examples per call")
        outputs = self._session.run(feeds, shape=(max(len_s, len_t), width, heads))
        fused = {name: outputs.get(name) for name in ("fused_sequential", "fused_structural", "bidirectional_fusion")}
        _overflow.check_finite_results(fused, magnitude, self.dtype, _HOST)
        return outputs if batched else {name: value[0] for name, value in outputs.items()}

    def fuse_collection(self, sequential, structural, *, batch_size: int = 64):
        """Fuse many antibodies of different lengths, as ``CrossAttention.fuse_collection`` does:
        padded batches of similar lengths, one dict of this model's outputs per antibody.

        Args:
            sequential, structural: two lists (or tuples) of the same length, the i-th entries one
                antibody's (L_i, D) embeddings (NumPy arrays or array-likes); or two dicts with the
                same keys (ids). A model that outputs ``bidirectional_fusion`` needs each antibody's two
                lengths equal; one exported with ``bidirectional=False`` takes unequal ones.
            batch_size: at most this many antibodies per run. An antibody shares a run with longer
                ones only while the work its padding adds costs less than a run of its own; a model
                exported without length inputs (``lengths=False``) runs only equal lengths together.

        Returns:
            A list of dicts in the order of the inputs, or for dicts a dict by id in ``sequential``'s
            order; each holds the model's outputs for that antibody alone, without the batch axis
            (``attention_weights_*`` (H, Ls, Lt) and (H, Lt, Ls), when the model has them).

        Raises:
            TypeError / ValueError: as ``CrossAttention.fuse_collection``, all checked before any work
                (an entry that is not (L, D) with L >= 1 and this model's D, unequal lengths, ...); a
                batch's error (NaN, Inf, overflow) names the antibodies to look at.
            MemoryError: before any work, when the results of the whole collection cannot fit in memory
                (``iter_collection`` hands them over batch by batch).
        """
        collection, as_dicts, batch_size = self._collection(sequential, structural, batch_size)
        len_s, len_t = (np.array([side.shapes[key][0] for key in collection.keys], dtype=np.int64)
                        for side in collection.sides)
        per_output = self._output_elements(len_s, len_t)
        _memory.check_outputs_fit({name: int(per_output[name].sum()) for name in self.output_names}, self.dtype,
                                  "take the results as they come with iter_collection")
        results = dict(self._fuse(collection, batch_size))
        ordered = [results[key] for key in collection.keys]
        return dict(zip(collection.keys, ordered)) if as_dicts else ordered

    def iter_collection(self, sequential, structural, *, batch_size: int = 64):
        """``fuse_collection``'s results as they are computed, for collections whose results do not fit in
        memory at once: an iterator of ``(key, outputs)`` pairs, batch by batch, longest antibodies first
        (``key`` the index in the lists or the id in the dicts; the outputs views of their batch's).
        Checks what ``fuse_collection`` checks before it returns; a batch's errors come when the
        iterator reaches it."""
        collection, _, batch_size = self._collection(sequential, structural, batch_size)
        return self._fuse(collection, batch_size)

    def _collection(self, sequential, structural, batch_size, labels=None) -> tuple:
        """The checked ``ragged.Collection`` (``labels``: how its errors name the antibodies; the CLI's
        name files), whether it came as dicts, and the checked ``batch_size``."""
        from crossattn_gpu import ragged  # the front end's, shared with CrossAttention.fuse_collection
        from crossattn_gpu.attention import _positive_int
        from crossattn_gpu.backends.device_common import DeviceFusion
        from crossattn_gpu.backends.onnx_backend import OnnxBackend

        batch_size = _positive_int(batch_size, "batch_size")
        if "sequential_lengths" not in self.input_names:
            join_flops = 0  # no padding: only equal lengths share a run
        elif self.provider == "CPUExecutionProvider":
            join_flops = OnnxBackend.call_flops
        else:  # a GPU's provider: as the GPU backends (unmeasured with onnxruntime)
            join_flops = DeviceFusion.call_flops
        collection, as_dicts = ragged.from_lists_or_dicts(
            self, sequential, structural, bidirectional="bidirectional_fusion" in self.output_names,
            join_flops=join_flops, equal_lengths="this model outputs bidirectional_fusion, which needs equal lengths "
            "(a model exported with bidirectional=False takes unequal ones)",
            one_batch="the OnnxFusion itself", labels=labels)
        return collection, as_dicts, batch_size

    def _fuse(self, collection, batch_size: int):
        """``(key, outputs)`` of every antibody, batch by batch (``collection.batches``)."""
        from crossattn_gpu.ragged import unless_full, unpadded

        for keys, (xs, s_len), (xt, t_len) in collection.batches(batch_size):
            outputs = collection.run(keys, xs, xt, lambda: self(
                xs, xt, sequential_lengths=unless_full(s_len), structural_lengths=unless_full(t_len)))
            for row, key in enumerate(keys):
                cut = {}
                for name, value in outputs.items():
                    # The probabilities are (B, H, ...) here, where CrossAttention hands out a list of heads.
                    heads = (slice(None),) if name.startswith("attention_weights") else ()
                    cut[name] = value[(row, *heads, *unpadded(name, s_len[row], t_len[row]))]
                yield key, cut

    def _output_elements(self, len_s, len_t) -> dict:
        """Elements of each output of one example (or of each of an array of examples) of these lengths."""
        heads, width = self.attention_heads, self.embedding_dim
        return {"fused_sequential": len_s * width, "fused_structural": len_t * width,
                "bidirectional_fusion": len_s * width, "seq_similarity": len_s * len_s,
                "struct_similarity": len_t * len_t, "attention_weights_seq_to_struct": heads * len_s * len_t,
                "attention_weights_struct_to_seq": heads * len_s * len_t}


def _host_input(x, name: str) -> np.ndarray:
    """An input as a host NumPy array (``NumpyBackend.native``), a device array refused by name."""
    if is_device_array(x):
        raise TypeError(f"{name} is a {type(x).__module__}.{type(x).__name__} on a GPU, but OnnxFusion takes host "
                        "arrays (onnxruntime copies them to its provider's device); move it to the host")
    return _HOST.native(x, name)


def _lengths(lengths, name: str, shape: tuple, batched: bool) -> np.ndarray:
    """Valid lengths (B,) in 1..L, checked as the front end checks them (refused for unbatched inputs,
    which had (L, D) before their batch axis was added); the full length when None."""
    batch, length = shape[0], shape[1]
    if lengths is None:
        return np.full(batch, length, dtype=np.int64)
    return check_lengths(lengths, name, batch, length, batched, _HOST)
