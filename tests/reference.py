"""An independent float64 implementation of the seed, written literally: per example, per head.

It shares no code with the library, so agreement means the library computes the seed's function.
"""

import numpy as np


def softmax(scores):
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def sdpa(queries, keys, values, width, mask=None):
    scores = np.dot(queries, keys.T) / np.sqrt(width)
    if mask is not None:
        scores = np.where(mask == 0, -1e9, scores)
    weights = softmax(scores)
    return np.dot(weights, values), weights


def mha(wq, wk, wv, wo, query_seq, key_seq, value_seq, mask=None):
    heads, width = wq.shape[0], wq.shape[1]
    outputs, weights = [], []
    for head in range(heads):
        queries = np.dot(query_seq, wq[head])
        keys = np.dot(key_seq, wk[head])
        values = np.dot(value_seq, wv[head])
        out, w = sdpa(queries, keys, values, width, mask)
        outputs.append(out)
        weights.append(w)
    return np.dot(np.concatenate(outputs, axis=-1), wo), weights


def cosine(a, b):
    sims = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            na, nb = np.linalg.norm(a[i]), np.linalg.norm(b[j])
            sims[i, j] = 0.0 if na == 0 or nb == 0 else np.dot(a[i], b[j]) / (na * nb)
    return sims


def fuse(wq, wk, wv, wo, seq, struct, mask=None):
    fs, ws = mha(wq, wk, wv, wo, seq, struct, struct, mask)
    ft, wt = mha(wq, wk, wv, wo, struct, seq, seq, None if mask is None else mask.T)
    return {
        "fused_sequential": fs,
        "fused_structural": ft,
        "bidirectional_fusion": fs + ft if len(seq) == len(struct) else None,
        "attention_weights_seq_to_struct": ws,
        "attention_weights_struct_to_seq": wt,
        "seq_similarity": cosine(seq, fs),
        "struct_similarity": cosine(struct, ft),
    }


def params(model):
    return [np.asarray(model.get_attention_weights()[n], dtype=np.float64)
            for n in ("query_weights", "key_weights", "value_weights", "output_weights")]
