"""The yardstick for float16 and bfloat16: the seed's per-example, per-head loops in that dtype."""

from __future__ import annotations

import numpy as np

import reference
from tolerances import relative_error


def plain_fuse(weights, xs, xt, mask, s_len, t_len, dtype: str, library: str = "numpy") -> dict:
    """reference.fuse per example on unpadded rows, in ``dtype`` with NumPy or torch; float64 out,
    padded to the batch's shapes with zeros. bfloat16 is torch only."""
    batch = xs.shape[0]
    out = {
        "fused_sequential": np.zeros(xs.shape), "fused_structural": np.zeros(xt.shape),
        "seq_similarity": np.zeros((batch, xs.shape[1], xs.shape[1])),
        "struct_similarity": np.zeros((batch, xt.shape[1], xt.shape[1])),
    }
    for b in range(batch):
        ls, lt = s_len[b], t_len[b]
        m = None if mask is None else np.broadcast_to(mask, (batch, xs.shape[1], xt.shape[1]))[b, :ls, :lt]
        if library == "numpy" and dtype != "bfloat16":
            w = [np.asarray(p, dtype=dtype) for p in weights]
            res = reference.fuse(*w, xs[b, :ls].astype(dtype), xt[b, :lt].astype(dtype), m)
        else:
            res = _torch_fuse(weights, xs[b, :ls], xt[b, :lt], m, dtype)
        out["fused_sequential"][b, :ls] = res["fused_sequential"]
        out["fused_structural"][b, :lt] = res["fused_structural"]
        out["seq_similarity"][b, :ls, :ls] = res["seq_similarity"]
        out["struct_similarity"][b, :lt, :lt] = res["struct_similarity"]
    return out


def fuse_yardstick(want: dict, keys, weights, xs, xt, mask, s_len, t_len, dtype: str) -> float:
    """The error of the plain computation in ``dtype``: the larger of NumPy's and torch's (where torch
    is installed), since either may round luckily on a given case."""
    libraries = ["numpy"] if dtype in ("float16", "float32") else []
    if _torch() is not None and (dtype != "bfloat16" or _torch().cuda.is_available()):
        libraries.append("torch")
    errors = []
    for library in libraries:
        plain = plain_fuse(weights, xs, xt, mask, s_len, t_len, dtype, library)
        errors += [relative_error(plain[k].reshape(np.shape(want[k])), want[k]) for k in keys]
    return max(errors)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _torch_fuse(weights, xs, xt, mask, dtype: str):
    torch = _torch()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def t(x):
        return torch.tensor(np.asarray(x, dtype=np.float32), dtype=getattr(torch, dtype), device=device)

    wq, wk, wv, wo = (t(w) for w in weights)
    width = wq.shape[1]

    def mha(xq, xkv, m):
        outs = []
        for h in range(wq.shape[0]):
            scores = (xq @ wq[h]) @ (xkv @ wk[h]).T / width**0.5
            if m is not None:
                scores = scores.masked_fill(torch.tensor(m == 0, device=device), -1e9 if dtype == "float32" else -6e4)
            outs.append(torch.softmax(scores, dim=-1) @ (xkv @ wv[h]))
        return torch.cat(outs, dim=-1) @ wo

    def cosine(a, f):
        a, f = a.float(), f.float()
        na, nf = a.norm(dim=-1, keepdim=True), f.norm(dim=-1, keepdim=True)
        return (a / na.clamp_min(1e-30)) @ (f / nf.clamp_min(1e-30)).T

    fs = mha(t(xs), t(xt), mask)
    ft = mha(t(xt), t(xs), None if mask is None else mask.T)
    return {
        "fused_sequential": fs.double().cpu().numpy(), "fused_structural": ft.double().cpu().numpy(),
        "seq_similarity": cosine(t(xs), fs).double().cpu().numpy(),
        "struct_similarity": cosine(t(xt), ft).double().cpu().numpy(),
    }


def plain_attention(method: str, weights, q, k, v, mask, q_len, k_len, dtype: str) -> np.ndarray:
    """``scaled_dot_product_attention`` or ``multi_head_attention`` per example, plainly in ``dtype``."""
    out = np.zeros(q.shape[:2] + ((v.shape[2],) if method.startswith("scaled") else (q.shape[2],)))
    for b in range(q.shape[0]):
        lq, lk = q_len[b], k_len[b]
        m = None if mask is None else np.broadcast_to(mask, (q.shape[0], q.shape[1], k.shape[1]))[b, :lq, :lk]
        if dtype == "float16":
            cast = [x.astype(np.float16) for x in (q[b, :lq], k[b, :lk], v[b, :lk])]
            if method.startswith("scaled"):
                res, _ = reference.sdpa(*cast, q.shape[2], m)
            else:
                res, _ = reference.mha(*[np.asarray(w, dtype=np.float16) for w in weights], *cast, m)
        else:
            import torch

            def t(x):
                return torch.tensor(np.asarray(x, dtype=np.float32), dtype=torch.bfloat16, device="cuda")

            xq, xk, xv = t(q[b, :lq]), t(k[b, :lk]), t(v[b, :lk])
            heads = [(None, None, None)] if method.startswith("scaled") else [tuple(t(w[h]) for w in weights[:3]) for h in range(len(weights[0]))]
            outs = []
            for wq, wk, wv in heads:
                qq, kk, vv = (xq, xk, xv) if wq is None else (xq @ wq, xk @ wk, xv @ wv)
                scores = qq @ kk.T / q.shape[2] ** 0.5
                if m is not None:
                    scores = scores.masked_fill(torch.tensor(m == 0, device="cuda"), -1e9)
                outs.append(torch.softmax(scores, dim=-1) @ vv)
            res = outs[0] if wq is None else torch.cat(outs, dim=-1) @ t(weights[3])
            res = res.double().cpu().numpy()
        out[b, :lq] = res
    return out
