"""Prefix sharing: the perturbed branches equal the conditional branch up to the first perturbed layer.

The batch of one guided step is ``[uncond?, cond, perturbed_1, …]``, and every
perturbed branch reads exactly the conditional inputs. So every *stage* of the
model before the first perturbed layer (``conv_in``, the down blocks before it;
the patch embedding and the transformer blocks before it) computes the same rows
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

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

_warned: set[str] = set()


def stages(model: nn.Module) -> list[str] | None:
    """The model's top-level stages in forward order, or None if pagkit does not know its layout."""
    if all(hasattr(model, a) for a in ("conv_in", "down_blocks", "up_blocks")):
        names = ["conv_in"] + [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
        if getattr(model, "mid_block", None) is not None:
            names.append("mid_block")
        return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    if hasattr(model, "transformer_blocks"):
        embed = [n for n in ("pos_embed", "proj_in") if getattr(model, n, None) is not None][:1]
        return embed + [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    return None


def prefix_stages(model: nn.Module, perturbed_layers: list[str]) -> list[str]:
    """The stages that run before the first perturbed layer ([] if none, or the layout is unknown)."""
    order = stages(model)
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


def _rows(value, index: torch.Tensor, batch: int, shared: int, take: bool):
    """Slice per-sample tensors of size ``batch`` to the first ``shared`` rows (take) or expand them back."""
    if torch.is_tensor(value):
        if take and value.ndim > 0 and value.shape[0] == batch:
            return value[:shared]
        if not take and value.ndim > 0 and value.shape[0] == shared:
            return value.index_select(0, index.to(value.device))
        return value
    if isinstance(value, dict):
        return {k: _rows(v, index, batch, shared, take) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_rows(v, index, batch, shared, take) for v in value)
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # diffusers BaseOutput
        return type(value)(**{k: _rows(value[k], index, batch, shared, take) for k in value.keys()})
    return value


@contextmanager
def shared_prefix(model: nn.Module, stage_names: list[str], shared_rows: int, source_rows: list[int]
                  ) -> Iterator[None]:
    """Run ``stage_names`` on the first ``shared_rows`` rows; row r ≥ shared_rows copies row ``source_rows[r]``.

    ``source_rows`` lists, for the whole batch, which shared row each row equals
    (``source_rows[r] == r`` for the shared rows themselves).
    """
    modules = dict(model.named_modules())
    index = torch.tensor(source_rows, dtype=torch.long)
    batch = len(source_rows)
    patched = []
    try:
        for name in stage_names:
            module = modules[name]
            original = module.forward

            def forward(*args, __original=original, **kwargs):
                args = _rows(args, index, batch, shared_rows, take=True)
                kwargs = _rows(kwargs, index, batch, shared_rows, take=True)
                return _rows(__original(*args, **kwargs), index, batch, shared_rows, take=False)

            had_own = "forward" in vars(module)
            module.forward = forward
            patched.append((module, original, had_own))
        yield
    finally:
        for module, original, had_own in patched:
            if had_own:
                module.forward = original
            else:
                del module.forward
