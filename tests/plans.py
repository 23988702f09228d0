"""Counting the calls that take a model's whole path, not a plan (``CrossAttention._plan``)."""


def whole_paths(monkeypatch, model) -> list:
    """The list to which each call of ``model`` that takes its whole path (its inputs' checks) appends."""
    whole = []
    batch = model._batch
    monkeypatch.setattr(model, "_batch", lambda *a, **k: whole.append(1) or batch(*a, **k))
    return whole


def fuse_more_layouts_than_kept(model, seq, struct, inputs, check) -> None:
    """Fuse (B, L, D) ``seq`` and ``struct`` (NumPy, longer than the plans a model keeps) cut to every
    length 1..L, each a layout of its own, as ``inputs(seq_cut, struct_cut)`` gives them to ``model``; each
    result goes to ``check(result, seq_cut, struct_cut)``. The model keeps at most ``_PLANS_KEPT`` plans,
    and starts the set anew past them."""
    from crossattn_gpu.attention import _PLANS_KEPT

    assert seq.shape[1] > _PLANS_KEPT
    kept = []
    for length in range(1, seq.shape[1] + 1):
        cut = seq[:, :length], struct[:, :length]
        check(model.fuse_representations(*inputs(*cut), need_similarity=False), *cut)
        kept.append(len(model._plans))
    assert max(kept) == _PLANS_KEPT and kept[-1] < _PLANS_KEPT
