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


def _map_tensors(value, fn, shared: frozenset, name: str | None = None):
    """``fn`` on every tensor inside dicts, lists, tuples and diffusers outputs, except inputs named in ``shared``."""
    if name is not None and name in shared:
        return value
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn, shared, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_map_tensors(v, fn, shared) for v in value)
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # diffusers BaseOutput
        return type(value)(**{k: _map_tensors(value[k], fn, shared, k) for k in value.keys()})
    return value


_class_forward_names: dict = {}  # a class's forward function -> its positional parameters after self


def _positional_names(forward) -> list[str]:
    """The names of ``forward``'s positional parameters ([] where it has no signature to read). A stage's forward
    is mostly its class's method: its names are kept per function, since reading a signature is slow (each step
    opens ``shared_prefix`` anew); any other callable (a wrapper of someone's) is read each time."""
    func = getattr(forward, "__func__", None) if inspect.ismethod(forward) else None
    if func is not None and func in _class_forward_names:
        return _class_forward_names[func]
    try:
        names = [p.name for p in inspect.signature(forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # no signature to read: positional arguments go unnamed
        names = []
    if func is not None and inspect.isfunction(func):
        _class_forward_names[func] = names
    return names


@contextmanager
def shared_prefix(model: nn.Module, stage_names: list[str], shared_rows: int, source_rows: list[int]
                  ) -> Iterator[None]:
    """Run ``stage_names`` on the first ``shared_rows`` rows; row r ≥ shared_rows copies row ``source_rows[r]``.

    ``source_rows`` lists, for the whole batch, which shared row each row equals
    (``source_rows[r] == r`` for the shared rows themselves). Inputs the family's backend lists as shared
    (rotary tables, position ids) pass through whole. A stage tensor with k rows per sample (a family that folds
    frames into its stages' batch, sample outermost: ``Backend.module_rows``) is sliced and copied k rows a
    sample.
    """
    backend = detect(model)
    shared = backend.shared_inputs
    index = torch.tensor(source_rows, dtype=torch.long)
    batch = len(source_rows)

    def fold(stage, rows, model_rows):
        """k when a stage tensor of ``rows`` rows holds k rows per sample of ``model_rows`` samples, sample
        outermost (the family folds frames into its stages' batch: ``Backend.module_rows``); else None."""
        if rows == model_rows:
            return 1
        if rows % model_rows:
            return None
        try:
            return rows // model_rows if backend.module_rows(stage, rows, model_rows) is not None else None
        except ValueError:
            return None

    def take(stage, value, name=None):
        def first_rows(v):
            k = fold(stage, v.shape[0], batch) if v.ndim else None
            return v if k is None else v[:shared_rows * k]
        return _map_tensors(value, first_rows, shared, name)

    def expand(stage, value):
        def all_rows(v):
            k = fold(stage, v.shape[0], shared_rows) if v.ndim else None
            if k is None:
                return v
            rows = index if k == 1 else (index[:, None] * k + torch.arange(k)).flatten()
            return v.index_select(0, rows.to(v.device))
        return _map_tensors(value, all_rows, shared)

    patched = []
    try:
        for name in stage_names:
            module = model.get_submodule(name)  # not dict(model.named_modules()): that walks the whole model
            original = module.forward
            # positional arguments keep their names, so a shared input passed positionally is not sliced
            names = _positional_names(original)

            def forward(*args, __original=original, __names=names, __stage=name, **kwargs):
                args = tuple(take(__stage, a, __names[i] if i < len(__names) else None) for i, a in enumerate(args))
                return expand(__stage, __original(*args, **take(__stage, kwargs)))

            had_own = "forward" in vars(module)
            module.forward = forward
            patched.append((module, original, had_own))
        yield
    finally:
        restore_forwards(patched)
