"""Your own PyTorch model: name its attention modules and say how it is called.

    model = pagkit.adapt(my_dit, sites="blocks.*.attn", patch_size=2,
                         call=lambda model, x, t, cond: model(x, t, **cond))
    images = pagkit.sample(model, scheduler, guidance=[pagkit.PAG(2.0, layers="blocks.6.attn")], ...)

A site is any module whose forward calls ``torch.nn.functional.scaled_dot_product_attention``
(timm, facebookresearch DiT, most modern code): pagkit perturbs that call on the perturbed rows,
nothing else. Attention written with einsum and softmax (guided-diffusion's ``QKVAttention``,
EDM2) takes a one-function adapter, ``attention(module, x, *args, **kwargs) -> (q, k, v, finish)``:
q, k, v as (B, heads, tokens, dim) and ``finish(out)`` turning the (B, heads, tokens, dim)
attention output into the module's output. Untouched rows always run the module itself.
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch
import torch.nn as nn

from . import Backend, ForwardInfo, Site


class CustomBackend(Backend):
    """A backend built from a description of one model (``pagkit.adapt``), not registered for a class."""

    name = "custom"
    tested_against = "a timm-style DiT and an ADM QKVAttention UNet block written in the tests"

    def __init__(self, sites: list[str], call: Callable | None, output: Callable | None, learned_sigma: bool,
                 patch_size: int, attention: Callable | None, shape: tuple[int, ...] | None, stages: list[str] | None,
                 shared_inputs: frozenset):
        self.site_patterns, self._call_fn, self._output = sites, call, output
        self._learned_sigma, self.patch_size, self.attention = learned_sigma, patch_size, attention
        self.shape, self._stages, self.shared_inputs = shape, stages, shared_inputs

    def sites(self, model):
        names = [n for n, _ in model.named_modules() if n]
        found = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.site_patterns)]
        if not found:
            raise ValueError(f"pagkit.adapt: no module of {type(model).__name__} matches sites={self.site_patterns}; "
                             f"modules: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}")
        modules = dict(model.named_modules())
        return [Site(n, "self", int(getattr(modules[n], "num_heads", getattr(modules[n], "heads", 0)) or 0), 0,
                     self.patch_size, attention=self.attention) for n in found]

    def stages(self, model):
        return self._stages

    def forward_info(self, model, x, kwargs):
        return ForwardInfo(hw=tuple(x.shape[-2:]) if x.ndim == 4 else None)

    def call(self, forward, x, t, kwargs):
        out = self._call_fn(forward, x, t, kwargs) if self._call_fn else forward(x, t, **kwargs)
        out = self._output(out) if self._output else out
        if not torch.is_tensor(out):
            raise TypeError(f"pagkit.adapt: the model's call returned {type(out).__name__}; pass output= to pick the "
                            "prediction tensor from it")
        return out

    def learned_sigma(self, model):
        return self._learned_sigma

    def sample_shape(self, model, batch_size, height, width):
        if self.shape is None:
            raise ValueError("pagkit.adapt: pass shape=(channels, height, width) to sample from this model")
        c, h, w = self.shape
        return (batch_size, c, height or h, width or w)


def adapt(model: nn.Module, sites: str | list[str], *, call: Callable | None = None, output: Callable | None = None,
          learned_sigma: bool = False, patch_size: int = 1, attention: Callable | None = None,
          shape: tuple[int, int, int] | None = None, stages: list[str] | None = None,
          shared_inputs=()) -> nn.Module:
    """Describe your own model to pagkit; returns ``model`` (now usable by ``guide``, ``sample`` and ``layers``).

    ``sites``: names or globs of the modules whose attention may be perturbed (``"blocks.*.attn"``).
    ``call(forward, x, t, cond) -> output``: how to call the model (default ``forward(x, t, **cond)``), and
    ``output(out) -> tensor``: where the prediction is in what it returns (default: the output itself).
    ``learned_sigma``: the output holds ε and a variance (ADM's 2C channels); only the first C are guided.
    ``patch_size``: input pixels per token, for SEG's grid. ``attention``: the adapter for einsum attention (above).
    ``shape``: (C, H, W) of x_t, for ``pagkit.sample``. ``stages``: top-level modules in forward order whose
    inputs are all per sample, for prefix sharing (default: none, the plain batched pass).
    ``shared_inputs``: names of model or stage inputs that are not per sample.
    """
    patterns = [sites] if isinstance(sites, str) else list(sites)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"pagkit.adapt: sites must be module names or globs, got {sites!r}")
    if attention is not None and not callable(attention):
        raise TypeError("pagkit.adapt: attention= must be a function (module, x, ...) -> (q, k, v, finish)")
    backend = CustomBackend(patterns, call, output, learned_sigma, patch_size, attention, shape, stages,
                            frozenset(shared_inputs))
    model._pagkit_backend = backend
    backend.sites(model)  # an unmatched name fails now
    return model
