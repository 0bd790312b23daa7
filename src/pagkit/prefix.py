"""Prefix sharing: the perturbed branches equal the conditional branch up to the first perturbed layer.

The batch of one guided step is ``[uncond?, cond, perturbed_1, …]``, and every
perturbed branch reads exactly the conditional inputs. So every *stage* of the
model before the first perturbed layer (``conv_in``, the down blocks before it;
the patch embedding and the transformer blocks before it; the stages come from the
family's backend) computes the same rows
for ``cond`` and for each perturbed branch. While ``shared_prefix`` is open those
stages run on the unperturbed rows only and their outputs are copied into the
perturbed rows. The model's own forward runs unchanged around them, so skip
connections, embeddings, ControlNet residuals and everything else a later layer
reads are simply the full batch, as before.

Savings: the prefix's share of the forward for each perturbed branch (about a
third of an SD-shaped UNet for ``mid``). The split is at stage granularity: the
stage holding the first perturbed layer runs in full.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from .backends import detect
from .batch import map_rows
from .routing import restore_forwards

_warned: set[str] = set()


def prefix_stages(model: nn.Module, perturbed_layers: list[str]) -> list[str]:
    """The stages that run before the first perturbed site ([] if none, or the family has no stage list)."""
    order = detect(model).stages(model)
    if order is None:
        name = type(model).__name__
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"pagkit: prefix sharing does not know the layout of {name}; using the plain batched "
                          "pass (same results, no saving)", stacklevel=3)
        return []
    first = min((i for i, stage in enumerate(order) for layer in perturbed_layers
                 if layer == stage or layer.startswith(stage + ".")), default=None)
    return order[:first] if first is not None else []


@contextmanager
def shared_prefix(model: nn.Module, stage_names: list[str], shared_rows: int, source_rows: list[int]
                  ) -> Iterator[None]:
    """Run ``stage_names`` on the first ``shared_rows`` rows; row r ≥ shared_rows copies row ``source_rows[r]``.

    ``source_rows`` lists, for the whole batch, which shared row each row equals
    (``source_rows[r] == r`` for the shared rows themselves). Inputs the family's backend lists as shared
    (rotary tables, position ids) pass through whole.
    """
    shared = detect(model).shared_inputs
    modules = dict(model.named_modules())
    index = torch.tensor(source_rows, dtype=torch.long)
    batch = len(source_rows)

    def take(value, name=None):
        return map_rows(value, batch, lambda v: v[:shared_rows], shared, name)

    def expand(value):
        return map_rows(value, shared_rows, lambda v: v.index_select(0, index.to(v.device)), shared)

    patched = []
    try:
        for name in stage_names:
            module = modules[name]
            original = module.forward
            # positional arguments keep their names, so a shared input passed positionally is not sliced
            try:
                names = [p.name for p in inspect.signature(original).parameters.values()
                         if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            except (TypeError, ValueError):  # no signature to read: positional arguments go unnamed
                names = []

            def forward(*args, __original=original, __names=names, **kwargs):
                args = tuple(take(a, __names[i] if i < len(__names) else None) for i, a in enumerate(args))
                return expand(__original(*args, **take(kwargs)))

            had_own = "forward" in vars(module)
            module.forward = forward
            patched.append((module, original, had_own))
        yield
    finally:
        restore_forwards(patched)
