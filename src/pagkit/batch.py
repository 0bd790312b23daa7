"""Rows of nested model inputs: take, repeat, concatenate and split the per-sample tensors.

A value is per sample when it is a tensor whose first dimension is the batch and its
name is not one the family's backend lists as shared (rotary tables, position ids):
a (1, 8) rotary table at batch size 1 is not a batch.
"""
from __future__ import annotations

from typing import Callable

import torch


def map_rows(value, batch: int, fn: Callable[[torch.Tensor], torch.Tensor], shared: frozenset = frozenset(),
             name: str | None = None):
    """Apply ``fn`` to every per-sample tensor inside dicts, lists, tuples and diffusers outputs."""
    if name is not None and name in shared:
        return value
    if torch.is_tensor(value):
        return fn(value) if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: map_rows(v, batch, fn, shared, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(map_rows(v, batch, fn, shared) for v in value)
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # diffusers BaseOutput
        return type(value)(**{k: map_rows(value[k], batch, fn, shared, k) for k in value.keys()})
    return value


def cat_rows(parts: list, batch: int, shared: frozenset = frozenset(), name: str | None = None):
    """Concatenate same-structured inputs along the batch (per-sample tensors only; others from the first)."""
    first = parts[0]
    if name is not None and name in shared:
        return first
    if torch.is_tensor(first):
        return torch.cat(parts) if first.ndim > 0 and first.shape[0] == batch else first
    if isinstance(first, dict):
        return {k: cat_rows([p[k] for p in parts], batch, shared, k) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(cat_rows([p[i] for p in parts], batch, shared) for i in range(len(first)))
    return first


def split_rows(value, batch: int, sizes: list[int], shared: frozenset = frozenset()) -> list:
    """The inverse of ``cat_rows``: the pieces of ``sizes`` rows each."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [map_rows(value, batch, lambda v, a=a, n=n: v[a:a + n], shared) for a, n in zip(starts, sizes)]


def replace_rows(value, replacement, spans: list[tuple[int, int]]):
    """``value`` with rows ``a:b`` of each span taken from ``replacement`` (same structure), for every tensor of
    the structure whose first dimension holds the rows; a ``None`` in either stays as it is in ``value``."""
    if value is None or replacement is None:
        return value
    if torch.is_tensor(value):
        pieces, pos = [], 0
        for a, b in sorted(spans):
            pieces += [value[pos:a], replacement[a:b]]
            pos = b
        return torch.cat(pieces + [value[pos:]])
    if isinstance(value, dict):
        return {k: replace_rows(v, replacement[k], spans) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(replace_rows(v, r, spans) for v, r in zip(value, replacement))
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # diffusers BaseOutput
        return type(value)(**{k: replace_rows(value[k], replacement[k], spans) for k in value.keys()})
    return value
