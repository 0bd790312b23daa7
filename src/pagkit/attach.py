"""Install and restore per-slice attention routing on a model.

While ``routed(model, layer_names)`` is open, each named self-attention layer runs a
``RoutingProcessor``. Before a forward, the caller sets ``router.plan``: which rows
of the batch get which perturbation at which layer. Rows no segment names go
through the layer's *original* processor, untouched, so they compute exactly what
the unpatched model computes. On exit, even after an exception, every original
processor is put back.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from .layers import _downsampling_factors, grid_for, self_attention_modules
from .perturb import Perturbation, perturbed_self_attention


@dataclass
class Segment:
    """Rows ``start:stop`` of the batch get ``perturbations[layer]`` at each layer named there."""

    start: int
    stop: int
    perturbations: dict[str, Perturbation] = field(default_factory=dict)


@dataclass
class Router:
    model: nn.Module
    factors: dict[str, int]
    plan: list[Segment] = field(default_factory=list)
    input_hw: tuple[int, int] | None = None  # H×W of the model input of the current forward
    capture: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer → rows whose attention to record
    captured: dict[str, tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=dict)

    def grid(self, name: str) -> tuple[int, int] | None:
        if self.input_hw is None:
            return None
        return grid_for(self.factors.get(name), *self.input_hw)


def _slice_rows(value, start: int, stop: int, batch: int):
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value[start:stop]
    return value


class RoutingProcessor:
    """Wraps a layer's original processor; perturbs only the rows the router's plan names."""

    def __init__(self, router: Router, name: str, original):
        self.router, self.name, self.original = router, name, original
        params = inspect.signature(original.__call__).parameters
        self._takes_var_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
        self._accepted = set(params)

    def _run_original(self, attn, hidden_states, kwargs):
        if not self._takes_var_kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k in self._accepted}
        return self.original(attn, hidden_states, **kwargs)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        kwargs = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, temb=temb, **kwargs)
        if temb is None:
            kwargs.pop("temb")
        batch = hidden_states.shape[0]
        segments = sorted(((s.start, s.stop, s.perturbations[self.name]) for s in self.router.plan
                           if self.name in s.perturbations), key=lambda s: s[0])
        if self.name in self.router.capture:
            self._capture(attn, hidden_states, temb)
        if not segments:
            return self._run_original(attn, hidden_states, kwargs)

        grid = tuple(hidden_states.shape[-2:]) if hidden_states.ndim == 4 else self.router.grid(self.name)
        pieces, pos = [], 0
        for start, stop, perturbation in segments:
            if start > pos:
                pieces.append(self._run_rows(attn, hidden_states, kwargs, pos, start, batch))
            rows = {k: _slice_rows(v, start, stop, batch) for k, v in kwargs.items()}
            pieces.append(perturbed_self_attention(attn, hidden_states[start:stop], perturbation, grid=grid,
                                                   attention_mask=rows.get("attention_mask"), temb=rows.get("temb")))
            pos = stop
        if pos < batch:
            pieces.append(self._run_rows(attn, hidden_states, kwargs, pos, batch, batch))
        return torch.cat(pieces)

    def _run_rows(self, attn, hidden_states, kwargs, start, stop, batch):
        rows = {k: _slice_rows(v, start, stop, batch) for k, v in kwargs.items()}
        return self._run_original(attn, hidden_states[start:stop], rows)

    def _capture(self, attn, hidden_states, temb):
        """Record, for SAG, how much attention each key receives (mean over heads, sum over queries)."""
        start, stop = self.router.capture[self.name]
        x = hidden_states[start:stop]
        grid = tuple(x.shape[-2:]) if x.ndim == 4 else self.router.grid(self.name)
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb[start:stop] if temb is not None else None)
        if x.ndim == 4:
            x = x.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        b, n, _ = x.shape
        q = attn.to_q(x).view(b, n, attn.heads, -1).transpose(1, 2)
        k = attn.to_k(x).view(b, n, attn.heads, -1).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        received = probs.mean(dim=1).sum(dim=1)  # (b, n): attention each key receives; mean is 1
        self.router.captured[self.name] = (received.detach(), grid)


@contextmanager
def routed(model: nn.Module, layer_names: list[str]) -> Iterator[Router]:
    """Route the named self-attention layers of ``model`` through a Router; always restore on exit."""
    modules = self_attention_modules(model)
    unknown = [n for n in layer_names if n not in modules]
    if unknown:
        raise ValueError(f"not self-attention layers of {type(model).__name__}: {unknown}")
    router = Router(model=model, factors=_downsampling_factors(model))
    originals = {}
    try:
        for name in layer_names:
            module = modules[name]
            if isinstance(module.processor, RoutingProcessor):
                raise RuntimeError(f"layer {name} is already routed by pagkit; nested guidance on one model "
                                   "is not supported")
            originals[name] = module.processor
            module.set_processor(RoutingProcessor(router, name, module.processor))
        yield router
    finally:
        for name, processor in originals.items():
            modules[name].set_processor(processor)
