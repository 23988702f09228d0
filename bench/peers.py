"""Every implementation the harness times, behind one interface.

A peer turns (weights, workload, dtype) into a ``run(pair)`` callable on its own arrays, prepared
before timing, and a ``fused(result)`` that hands the two fused outputs back as float64 NumPy for the
accuracy check (never timed). Every peer computes ``fused_sequential`` and ``fused_structural``:
the fusion without similarities or probabilities.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from crossattn_gpu import CrossAttention

WEIGHT_ORDER = ("query_weights", "key_weights", "value_weights", "output_weights")


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def gpu_available() -> bool:
    torch = torch_or_none()
    return torch is not None and torch.cuda.is_available()


@dataclass
class Prepared:
    run: object  # callable(pair) -> result
    inputs: list  # the peer's own input pairs, rotated through by the timer
    fused: object  # callable(result) -> (fused_s, fused_t) float64 NumPy, unpadded rows as computed
    context: object = contextlib.nullcontext  # entered around timing (TF32 switches)


class Peer:
    name = "peer"
    device = "cpu"  # or "gpu"
    dtypes: tuple = ()

    def unavailable(self) -> str | None:
        """Why this peer cannot run here, or None."""
        return None

    def prepare(self, model: CrossAttention, workload, pairs, dtype: str) -> Prepared:
        raise NotImplementedError


class SeedPeer(Peer):
    """The seed's algorithm as written: per example (unpadded), per head, float64 NumPy."""

    name = "seed (loops, NumPy)"
    dtypes = ("float64",)

    def prepare(self, model, workload, pairs, dtype):
        wq, wk, wv, wo = (model.get_attention_weights()[n] for n in WEIGHT_ORDER)
        lengths = workload.lengths()

        def mha(xq, xkv):
            outs = []
            for h in range(wq.shape[0]):
                q, k, v = np.dot(xq, wq[h]), np.dot(xkv, wk[h]), np.dot(xkv, wv[h])
                scores = np.dot(q, k.T) / np.sqrt(wq.shape[1])
                e = np.exp(scores - scores.max(axis=-1, keepdims=True))
                outs.append(np.dot(e / e.sum(axis=-1, keepdims=True), v))
            return np.dot(np.concatenate(outs, axis=-1), wo)

        def run(pair):
            xs, xt = pair
            fs, ft = np.zeros_like(xs), np.zeros_like(xt)
            for b in range(len(xs)):
                ls, lt = (xs.shape[1], xt.shape[1]) if lengths is None else (lengths[0][b], lengths[1][b])
                fs[b, :ls] = mha(xs[b, :ls], xt[b, :lt])
                ft[b, :lt] = mha(xt[b, :lt], xs[b, :ls])
            return fs, ft

        return Prepared(run, pairs, lambda r: r)


class OursPeer(Peer):
    """This library's ``fuse_representations`` on one backend, from the backend's own array kind."""

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"crossattn_gpu {backend}"
        self.device = "gpu" if backend in ("triton", "cupy") else "cpu"
        # tf32x3: float32 inputs, float32_precision="tf32x3" (the Triton backend's TF32 kernels).
        self.dtypes = {"numpy": ("float64", "float32"), "triton": ("float32", "tf32x3", "bfloat16"),
                       "onnx": ("float64", "float32")}.get(backend, ("float32", "bfloat16"))

    def unavailable(self):
        from crossattn_gpu.backends import backend_status

        return backend_status().get(self.backend, "unknown backend")

    def prepare(self, model, workload, pairs, dtype):
        ours = CrossAttention.from_weights(*(model.get_attention_weights()[n] for n in WEIGHT_ORDER), backend=self.backend,
                                           float32_precision="tf32x3" if dtype == "tf32x3" else "ieee")
        lengths = workload.lengths()
        if self.device == "gpu":  # torch CUDA tensors for both GPU backends (CuPy takes them through DLPack)
            torch = torch_or_none()
            tdtype = torch.float32 if dtype == "tf32x3" else getattr(torch, dtype)
            inputs = [tuple(torch.tensor(x, dtype=tdtype, device="cuda") for x in pair) for pair in pairs]
            if lengths is not None:
                lengths = tuple(torch.tensor(n, device="cuda") for n in lengths)

            def as_numpy(x):
                return x.double().cpu().numpy()
        else:
            inputs = [tuple(x.astype(dtype) for x in pair) for pair in pairs]

            def as_numpy(x):
                return np.asarray(x, dtype=np.float64)

        kwargs = dict(need_similarity=False, bidirectional=False)
        if lengths is not None:
            kwargs.update(sequential_lengths=lengths[0], structural_lengths=lengths[1])

        def run(pair):
            return ours.fuse_representations(*pair, **kwargs)

        return Prepared(run, inputs, lambda r: (as_numpy(r["fused_sequential"]), as_numpy(r["fused_structural"])))


class TorchPeer(Peer):
    """The fusion written in torch: ``eager`` (the seed's formulation, a loop over heads) or ``sdpa``
    (one GEMM per projection for all heads, then F.scaled_dot_product_attention)."""

    def __init__(self, style: str, device: str):
        self.style, self.device = style, device
        label = "eager, loop over heads" if style == "eager" else "batched projections + SDPA"
        self.name = f"torch {label}"
        self.dtypes = ("float32", "tf32", "bfloat16") if device == "gpu" else ("float64", "float32")

    def unavailable(self):
        torch = torch_or_none()
        if torch is None:
            return "torch is not installed"
        if self.device == "gpu" and not torch.cuda.is_available():
            return "no CUDA GPU"
        return None

    def prepare(self, model, workload, pairs, dtype):
        torch = torch_or_none()
        device = "cuda" if self.device == "gpu" else "cpu"
        tdtype = torch.float32 if dtype == "tf32" else getattr(torch, dtype)
        w = {n: torch.tensor(v, dtype=tdtype, device=device) for n, v in model.get_attention_weights().items()}
        heads, width = model.attention_heads, model.embedding_dim
        cat = {n: w[n].permute(1, 0, 2).reshape(width, heads * width) for n in WEIGHT_ORDER[:3]}
        inputs = [tuple(torch.tensor(x, dtype=tdtype, device=device) for x in pair) for pair in pairs]
        lengths = workload.lengths()
        keep = None
        if lengths is not None:
            pos = torch.arange(workload.len_t, device=device)
            keep_t = pos[None, :] < torch.tensor(lengths[1], device=device)[:, None]  # (B, Lt)
            pos = torch.arange(workload.len_s, device=device)
            keep_s = pos[None, :] < torch.tensor(lengths[0], device=device)[:, None]
            keep = (keep_t, keep_s)  # key padding for s->t, t->s
        scale = width**-0.5

        def split(x):
            return x.view(x.shape[0], x.shape[1], heads, width).transpose(1, 2)

        def sdpa(xq, xkv, key_keep):
            q, k, v = split(xq @ cat["query_weights"]), split(xkv @ cat["key_weights"]), split(xkv @ cat["value_weights"])
            mask = None if key_keep is None else key_keep[:, None, None, :]
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            return o.transpose(1, 2).reshape(xq.shape[0], xq.shape[1], heads * width) @ w["output_weights"]

        def eager(xq, xkv, key_keep):
            outs = []
            for h in range(heads):
                q, k, v = xq @ w["query_weights"][h], xkv @ w["key_weights"][h], xkv @ w["value_weights"][h]
                scores = (q @ k.transpose(-1, -2)) * scale
                if key_keep is not None:
                    scores = scores.masked_fill(~key_keep[:, None, :], float("-inf"))
                outs.append(torch.softmax(scores, dim=-1) @ v)
            return torch.cat(outs, dim=-1) @ w["output_weights"]

        mha = sdpa if self.style == "sdpa" else eager

        def run(pair):
            xs, xt = pair
            with torch.inference_mode():
                return mha(xs, xt, None if keep is None else keep[0]), mha(xt, xs, None if keep is None else keep[1])

        def fused(result):
            return tuple(r.double().cpu().numpy() for r in result)

        context = contextlib.nullcontext
        if dtype == "tf32":
            context = _tf32_context
        return Prepared(run, inputs, fused, context)


@contextlib.contextmanager
def _tf32_context():
    torch = torch_or_none()
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class OnnxRuntimePeer(Peer):
    """onnxruntime on the exported model (opset 17), with the CUDA provider on the GPU when offered, run
    as ``OnnxFusion`` runs it (on the CPU, in slices of the batch)."""

    dtypes = ("float32",)

    def __init__(self, device: str):
        self.device = device
        self.name = "onnxruntime (exported model)"

    def unavailable(self):
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if self.device == "gpu" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime here has no CUDA provider"
        return None

    def prepare(self, model, workload, pairs, dtype):
        from crossattn_gpu.export.onnx_export import build_fusion_model
        from crossattn_gpu.export.runner import OnnxSession

        providers = ["CUDAExecutionProvider"] if self.device == "gpu" else ["CPUExecutionProvider"]
        session = OnnxSession(build_fusion_model(model.get_attention_weights(), bidirectional=False), providers)
        lengths = workload.lengths()
        inputs = []
        for xs, xt in pairs:
            feeds = {"sequential_repr": xs.astype(np.float32), "structural_repr": xt.astype(np.float32)}
            feeds["sequential_lengths"] = np.full(len(xs), xs.shape[1]) if lengths is None else lengths[0]
            feeds["structural_lengths"] = np.full(len(xt), xt.shape[1]) if lengths is None else lengths[1]
            inputs.append(feeds)
        shape = (max(workload.len_s, workload.len_t), workload.width, workload.heads)
        return Prepared(
            lambda feeds: session.run(feeds, shape=shape), inputs,
            lambda r: (r["fused_sequential"].astype(np.float64), r["fused_structural"].astype(np.float64)),
        )


def all_peers() -> list[Peer]:
    return [
        SeedPeer(),
        TorchPeer("eager", "cpu"),
        TorchPeer("sdpa", "cpu"),
        OnnxRuntimePeer("cpu"),
        OursPeer("numpy"),
        OursPeer("onnx"),  # what `auto` takes on a CPU when onnxruntime is installed
        TorchPeer("eager", "gpu"),
        TorchPeer("sdpa", "gpu"),
        OnnxRuntimePeer("gpu"),
        OursPeer("triton"),
        OursPeer("cupy"),
    ]
