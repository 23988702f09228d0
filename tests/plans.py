"""Counting the calls that take a model's whole path, not a plan (``CrossAttention._plan``)."""


def whole_paths(monkeypatch, model) -> list:
    """The list to which each call of ``model`` that takes its whole path (its inputs' checks) appends."""
    whole = []
    batch = model._batch
    monkeypatch.setattr(model, "_batch", lambda *a, **k: whole.append(1) or batch(*a, **k))
    return whole
