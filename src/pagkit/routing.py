"""Row routing: perturb the attention of chosen sites on chosen rows of the batch, and nothing else.

While ``routed(model, site_names)`` is open, each named site's attention module runs
its own forward and its own processor unchanged (same arguments, rotary embeddings,
QK-norm, masks). The one seam is the scaled-dot-product attention the processor
calls: for the rows of each ``Segment`` of ``router.plan`` that names the site, the
``Perturbation`` computes it from the processor's q, k, v and the site's token layout
(from the family's backend); every other row gets the very SDPA call the model made.
``router.capture`` records, for SAG, the attention each key receives on chosen rows.

Three more patch kinds: ``SKIP`` (a ``SkipBlock``) at a *block* (one of the backend's ``skip_blocks``) makes it
return its input(s) on the segment's rows (SLG); the backend's ``skip_output`` says which inputs those are. A
``TokenShuffle`` at a block (one of the backend's ``token_blocks``) permutes the tokens entering it on the
segment's rows, one fresh seeded permutation per call shared by those rows, before the block runs (TPG); the
backend's ``token_span`` says which tokens are image tokens. Both act on the module's call (``level =
"module"``). A ``CrossRows`` patch acts on a site's attention *output* across two row segments: on a segment
whose ``onto`` names other rows (NAG: the negative-prompt rows, onto the conditional ones) both compute their
attention unchanged, then the image tokens of both are rewritten from the pair (``CrossRows.mix``). Sites
include the backend's ``cross_sites`` (cross-attention to the text), which only such patches use. A block is
patched and restored in the same place as a site (``routed``).
On exit, even after an exception, every module is as it was.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .backends import Backend, ForwardInfo, Site, detect
from .batch import map_rows, replace_rows
from .perturb import Perturbation, _additive

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class SkipBlock:
    """Patch kind: the block returns its input(s) on the segment's rows (``Backend.skip_output``)."""

    level = "module"  # acts on the module's call; attention perturbations act at its SDPA call

    def __repr__(self):
        return "SKIP"


SKIP = SkipBlock()


class TokenShuffle:
    """Patch kind (TPG): the image tokens entering the block are permuted on the segment's rows, and the block runs
    on them; its output is left as the block computes it (in the permuted order, as the official TPG code).

    Each call draws one fresh permutation from this patch's own CPU generator (seeded with ``seed``), the same for
    every row of the segment: one instance per bound term, so runs with one seed are equal. A (B, C, H, W) input
    has its H·W positions permuted; a (B, N, C) input the tokens of ``span`` along N (text tokens stay).
    """

    level = "module"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __repr__(self):
        return f"TokenShuffle(seed={self.seed})"

    def permutation(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.generator)

    def shuffle(self, x: torch.Tensor, rows: tuple[int, int], span: tuple[int, int] | None) -> torch.Tensor:
        """``x`` with the tokens of rows ``rows`` permuted: H·W positions of a 4-D input (``span`` None), else
        positions ``span`` of dim 1."""
        a, b = rows
        out = x.clone()
        if span is None:
            if x.ndim != 4:
                raise ValueError(f"TokenShuffle: a block input of shape {tuple(x.shape)} has no H×W grid")
            perm = self.permutation(x.shape[-2] * x.shape[-1]).to(x.device)
            out[a:b] = x[a:b].flatten(2)[:, :, perm].view_as(x[a:b])
        else:
            s, e = span
            perm = self.permutation(e - s).to(x.device) + s
            out[a:b, s:e] = x[a:b, perm]
        return out


def _token_input(args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor]:
    """Where a block's token input is: its first positional argument, or ``hidden_states`` / ``sample``."""
    if args:
        return 0, args[0]
    for name in ("hidden_states", "sample"):
        if name in kwargs:
            return name, kwargs[name]
    raise ValueError(f"pagkit cannot find the token input of a block called with {sorted(kwargs)}")


class CrossRows:
    """Patch kind: acts on a site's attention output across two row segments, its own and the segment's ``onto``
    rows. Both compute the model's own attention; then ``mix(onto, own)`` (each (rows, heads, image tokens, d): the
    image tokens of ``TokenLayout.image``) returns their new image-token outputs, in that order. Text tokens of a
    joint or single-stream site keep their own outputs."""

    level = "rows"

    def mix(self, onto: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _attention_patch(patch) -> bool:
    """Whether a patch acts at a site's attention call (a perturbation, or a ``CrossRows``), not on a module."""
    return getattr(patch, "level", "attention") in ("attention", "rows")


def _cross_rows(patch) -> bool:
    return getattr(patch, "level", "attention") == "rows"


@dataclass
class Segment:
    """Rows ``start:stop`` of the batch get ``perturbations[site]`` at each site named there (or ``SKIP`` at a
    block); a ``CrossRows`` patch there also rewrites rows ``onto`` (a (start, stop) of the same size)."""

    start: int
    stop: int
    perturbations: dict[str, Perturbation] = field(default_factory=dict)
    onto: tuple[int, int] | None = None


@dataclass
class Router:
    model: nn.Module
    backend: Backend
    sites: dict[str, Site]
    plan: list[Segment] = field(default_factory=list)
    info: ForwardInfo | None = None  # token layout facts of the current forward (image grid)
    batch: int | None = None  # rows of the model call's batch, for backends whose attention rows are not those
    capture: dict[str, tuple[int, int]] = field(default_factory=dict)  # site → rows whose attention to record
    captured: dict[str, tuple[torch.Tensor, tuple[int, int] | None]] = field(default_factory=dict)

    @property
    def input_hw(self) -> tuple[int, int] | None:
        return None if self.info is None else self.info.hw

    @input_hw.setter
    def input_hw(self, hw: tuple[int, int] | None) -> None:
        self.info = ForwardInfo(hw=hw)

    def grid(self, name: str) -> tuple[int, int] | None:
        """The image grid of site ``name`` in the current forward."""
        return self.backend.layout(self.sites[name], 0, self.info).grid if self.sites[name].kind == "self" else None

    def run_module(self, name: str, forward, args, kwargs):
        """One call of a routed module: a block's ``TokenShuffle`` rows, a site's attention patches, then a block's
        ``SKIP`` rows."""
        patches = [(s.start, s.stop, s.perturbations[name]) for s in self.plan
                   if name in s.perturbations and not _attention_patch(s.perturbations[name])]
        skips = sorted((a, b) for a, b, p in patches if isinstance(p, SkipBlock))
        shuffles = [(a, b, p) for a, b, p in patches if isinstance(p, TokenShuffle)]
        if shuffles:
            args, kwargs = self._shuffle_tokens(name, args, kwargs, shuffles)
        out = self.run_site(name, forward, args, kwargs) if name in self.sites else forward(*args, **kwargs)
        if not skips:
            return out
        module = self.model.get_submodule(name)
        rows = _leading_rows(out)
        model_rows = None if rows is None else self.backend.module_rows(name, rows, self.batch)
        if model_rows is not None:  # the block's batch folds frames (AnimateDiff): its rows of each model span
            model_rows = torch.as_tensor(model_rows)
            skips = [_span(model_rows, a, b) for a, b in skips]
        return replace_rows(out, self.backend.skip_output(module, args, kwargs, out), skips)

    def _shuffle_tokens(self, name: str, args, kwargs, shuffles):
        where, x = _token_input(args, kwargs)
        if self.batch is not None and x.shape[0] != self.batch:
            raise ValueError(f"TPG: the token input of block {name} has {x.shape[0]} rows, the model's batch "
                             f"{self.batch}; pagkit shuffles blocks whose rows are the model's samples (not video "
                             "blocks that fold frames into the batch)")
        span = self.backend.token_span(self.model, name, x, self.info)
        for a, b, shuffle in shuffles:
            x = shuffle.shuffle(x, (a, b), span)
        if where == 0:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, where: x}

    def run_site(self, name: str, forward, args, kwargs):
        segments = sorted(((s.start, s.stop, s.perturbations[name], s.onto) for s in self.plan
                           if name in s.perturbations and _attention_patch(s.perturbations[name])),
                          key=lambda s: s[0])
        capture = self.capture.get(name)
        if not segments and capture is None:
            return forward(*args, **kwargs)
        if self.sites[name].attention is not None:
            return self._run_adapted(self.sites[name], forward, args, kwargs, segments, capture)
        seam = _AttentionSeam(self, self.sites[name], segments, capture)
        with seam:
            out = forward(*args, **kwargs)
        if seam.calls == 0:
            raise RuntimeError(f"site {name} computed no scaled_dot_product_attention during the call, so nothing "
                               "was perturbed (it computes attention another way: give pagkit.adapt an attention= "
                               "adapter for it)")
        return out

    def _run_adapted(self, site: Site, forward, args, kwargs, segments, capture):
        """A site whose attention is not an SDPA call: untouched rows run the module itself (on the whole batch);
        perturbed rows get q, k, v and ``finish`` from the site's adapter, and the perturbation (or the site's own
        ``attend``) in between."""
        x = args[0]
        batch = x.shape[0]

        def rows(a, b):
            return [map_rows(v, batch, lambda t: t[a:b]) for v in (args, kwargs)]

        def perturbed(a, b, perturbation):
            (x_rows, *rest), kw = rows(a, b)
            q, k, v, finish = site.attention(self.model.get_submodule(site.name), x_rows, *rest, **kw)
            if not (q.ndim == k.ndim == v.ndim == 4 and q.shape[0] == k.shape[0] == v.shape[0] == b - a
                    and q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]):
                raise ValueError(f"the attention adapter of site {site.name} must return q, k, v of shape "
                                 f"(rows={b - a}, heads, tokens, dim) each; got {tuple(q.shape)}, {tuple(k.shape)}, "
                                 f"{tuple(v.shape)}")
            layout = self.backend.layout(site, q.shape[-2], self.info)
            if site.attend is not None:
                return finish(site.attend(perturbation, q, k, v, layout))
            return finish(perturbation.attend(q, k, v, layout))

        if capture is not None:
            raise ValueError(f"SAG cannot read the attention map of adapted site {site.name}")
        if any(_cross_rows(p) for _, _, p, _ in segments):
            raise ValueError(f"site {site.name} computes its attention through an adapter; a cross-row patch (NAG) "
                             "needs a site that calls scaled_dot_product_attention")
        # untouched rows: the module on the whole batch, so they are the unrouted model's bit for bit (a GEMM over
        # fewer rows may round differently)
        plain = forward(*args, **kwargs) if sum(b - a for a, b, _, _ in segments) < batch else None
        pieces, pos = [], 0
        for a, b, perturbation, _ in segments:
            if a > pos:
                pieces.append(plain[pos:a])
            pieces.append(perturbed(a, b, perturbation))
            pos = b
        if pos < batch:
            pieces.append(plain[pos:batch])
        return torch.cat(pieces)

    def attend(self, site: Site, segments, capture, query, key, value, attn_mask=None, dropout_p=0.0,
               is_causal=False, scale=None, enable_gqa=False, *, call: int = 0):
        """The seam: SDPA for the untouched rows, each segment's perturbation for its rows, then each cross-row
        patch's mix of its rows and their ``onto`` rows.

        ``segments`` and ``capture`` name rows of the model's batch; the backend maps them to the rows of this
        (the ``call``-th) attention call where they differ (frames folded into the batch, one call per sample).
        """
        batch = query.shape[0]
        model_rows = self.backend.attention_rows(site, call, batch, self.batch)
        if model_rows is not None:
            model_rows = torch.as_tensor(model_rows)
            if model_rows.shape != (batch,) or (model_rows.diff() < 0).any():
                raise ValueError(f"site {site.name}: the backend maps its {batch} attention rows to model rows "
                                 f"{model_rows.tolist()}; pagkit needs one non-decreasing model row per attention row")

            segments = [(*_span(model_rows, a, b), p, None if onto is None else _span(model_rows, *onto))
                        for a, b, p, onto in segments if _span(model_rows, a, b)[0] < _span(model_rows, a, b)[1]]
            if capture is not None:
                capture = _span(model_rows, *capture)

        def rows(t, a, b):
            return t[a:b] if t is not None and t.ndim == 4 and t.shape[0] == batch else t

        def plain(a, b):
            return F.scaled_dot_product_attention(query[a:b], key[a:b], value[a:b], attn_mask=rows(attn_mask, a, b),
                                                  dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                                  enable_gqa=enable_gqa)
        if segments and segments[-1][1] > batch:
            raise ValueError(f"site {site.name}: the plan names rows up to {segments[-1][1]}, but its attention "
                             f"batch has {batch} rows")
        def one_layout():  # SAG's map and NAG's mix need the call's one layout
            return self.backend.layout(site, query.shape[-2], self.info)

        if capture is not None:
            a, b = capture
            self.captured[site.name] = (_attention_received(query[a:b], key[a:b], rows(attn_mask, a, b), scale),
                                        one_layout().grid)
        perturbing = [(a, b, p) for a, b, p, _ in segments if not _cross_rows(p)]
        if perturbing and not self.backend.perturbs_call(site, call, self.info):
            perturbing = []  # a call without the queries a perturbation acts on (Flux.2-klein's reference tokens)
        if not perturbing:
            out = plain(0, batch)
        else:
            if is_causal:
                raise ValueError(f"site {site.name} uses causal attention; pagkit perturbs bidirectional attention "
                                 "only")
            k, v = key, value
            if enable_gqa and k.shape[1] != query.shape[1]:  # grouped-query heads: expand K/V for the perturbation
                k = k.repeat_interleave(query.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(query.shape[1] // v.shape[1], dim=1)
            pieces, pos = [], 0
            for a, b, perturbation in perturbing:
                if a > pos:
                    pieces.append(plain(pos, a))
                for c, d, layout in self._layout_runs(site, query.shape[-2], a, b):
                    pieces.append(self.backend.attend(site, perturbation, query[c:d], k[c:d], v[c:d], layout,
                                                      rows(attn_mask, c, d), scale).to(value.dtype))
                pos = b
            if pos < batch:
                pieces.append(plain(pos, batch))
            out = torch.cat(pieces)
        for a, b, patch, onto in segments:
            if _cross_rows(patch):
                out = self._mix_rows(site, out, patch, (a, b), onto, one_layout())
        return out

    def _layout_runs(self, site: Site, seq_len: int, a: int, b: int) -> list[tuple[int, int, object]]:
        """Rows a:b of one branch as runs of rows that share a layout (one run unless the family's layout varies
        by sample: Lumina2's captions of different lengths)."""
        runs = []
        for j, layout in enumerate(self.backend.segment_layouts(site, seq_len, self.info, b - a)):
            if runs and runs[-1][2] == layout:
                runs[-1][1] = a + j + 1
            else:
                runs.append([a + j, a + j + 1, layout])
        return [tuple(r) for r in runs]

    @staticmethod
    def _mix_rows(site: Site, out: torch.Tensor, patch: CrossRows, own: tuple[int, int],
                  onto: tuple[int, int] | None, layout) -> torch.Tensor:
        """``out`` with the image tokens of rows ``onto`` and ``own`` replaced by ``patch.mix`` of the pair."""
        if onto is None or onto[1] - onto[0] != own[1] - own[0] or max(own[1], onto[1]) > out.shape[0]:
            raise ValueError(f"site {site.name}: a cross-row patch needs an onto segment of as many rows as its own "
                             f"({own}), within the {out.shape[0]} rows of the attention call; got {onto}")
        i, j = layout.image
        new_onto, new_own = patch.mix(out[onto[0]:onto[1], :, i:j], out[own[0]:own[1], :, i:j])
        out = out.clone()
        out[onto[0]:onto[1], :, i:j] = new_onto.to(out.dtype)
        out[own[0]:own[1], :, i:j] = new_own.to(out.dtype)
        return out


def _span(model_rows: torch.Tensor, a: int, b: int) -> tuple[int, int]:
    """The rows (of a call whose row r is model row ``model_rows[r]``, non-decreasing) of model rows a:b."""
    return int((model_rows < a).sum()), int((model_rows < b).sum())


def _leading_rows(out) -> int | None:
    """The batch rows of a module's output: its tensor's, or its first tensor's (tuples, diffusers outputs)."""
    if torch.is_tensor(out):
        return out.shape[0]
    values = out.values() if hasattr(out, "to_tuple") and hasattr(out, "keys") else \
        out if isinstance(out, (list, tuple)) else ()
    return next((v.shape[0] for v in values if torch.is_tensor(v) and v.ndim > 0), None)


def _attention_received(q, k, mask, scale) -> torch.Tensor:
    """(b, S): attention each key receives, mean over heads, summed over queries (mean 1); in float32 whatever the
    model's dtype (half-precision logits would round the map SAG thresholds at 1)."""
    s = scale if scale is not None else q.shape[-1] ** -0.5
    logits = q.float() @ k.float().transpose(-1, -2) * s
    if mask is not None:
        logits = logits + _additive(mask, logits.dtype)
    return torch.softmax(logits, dim=-1).mean(dim=1).sum(dim=1).detach()


class _AttentionSeam(TorchFunctionMode):
    """Active only while one routed site runs: hands its SDPA calls to the router."""

    def __init__(self, router: Router, site: Site, segments, capture):
        super().__init__()
        self.router, self.site, self.segments, self.capture = router, site, segments, capture
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        bound = dict(zip(_SDPA_ARGS, args), **kwargs)
        return self.router.attend(self.site, self.segments, self.capture, **bound, call=self.calls - 1)


@contextmanager
def routed(model: nn.Module, site_names: list[str], backend: Backend | None = None,
           sites: dict[str, Site] | None = None) -> Iterator[Router]:
    """Route the named sites (and blocks, for ``SKIP``) of ``model`` through a Router; always restore on exit.

    ``sites``: the backend's sites and cross sites of ``model`` by name, if the caller keeps them (a
    ``GuidedDenoiser`` reads them once: finding them walks every module of the model, milliseconds a step)."""
    backend = backend or detect(model)
    if sites is None:
        sites = {s.name: s for s in backend.sites(model) + backend.cross_sites(model)}
    unknown = [n for n in site_names if n not in sites]
    if unknown:
        blocks = set(backend.skip_blocks(model) or ()) | set(backend.token_blocks(model) or ())
        unknown = [n for n in unknown if n not in blocks]
    if unknown:
        raise ValueError(f"not perturbable sites of {type(model).__name__}: {unknown}")
    router = Router(model=model, backend=backend, sites=sites)
    patched = []
    try:
        for name in site_names:
            module = model.get_submodule(name)  # not dict(model.named_modules()): that walks the whole model
            if getattr(module.forward, "_pagkit_routed", False):
                raise RuntimeError(f"site {name} is already routed by pagkit; nested guidance on one model "
                                   "is not supported")
            had_own = "forward" in vars(module)
            original = module.forward

            def forward(*args, __name=name, __original=original, **kwargs):
                return router.run_module(__name, __original, args, kwargs)

            forward._pagkit_routed = True
            module.forward = forward
            patched.append((module, original, had_own))
        yield router
    finally:
        restore_forwards(patched)


def restore_forwards(patched: list[tuple[nn.Module, object, bool]]) -> None:
    """Undo instance-level ``forward`` patches: (module, original forward, whether it had its own)."""
    for module, original, had_own in patched:
        if had_own:
            module.forward = original
        else:
            del module.forward


def perturbed_call(module: nn.Module, hidden_states: torch.Tensor, perturbation: Perturbation, *,
                   kind: str = "self", grid: tuple[int, int] | None = None, image_first: bool = True, **kwargs):
    """``module(hidden_states, **kwargs)`` with ``perturbation`` on every row of its batch.

    ``grid``: the image tokens' H×W (read off a 4-D input when not given); ``kind``/``image_first``: where the
    image tokens sit, as a backend's ``Site`` says. For tests and single modules; models go through ``routed``.
    """
    if grid is None and hidden_states.ndim == 4:
        grid = tuple(hidden_states.shape[-2:])
    site = Site("module", kind, 0, 0, 1, image_first)
    router = Router(model=module, backend=Backend(), sites={"module": site}, info=ForwardInfo(hw=grid))
    router.plan = [Segment(0, hidden_states.shape[0], {"module": perturbation})]
    return router.run_site("module", module, (hidden_states,), kwargs)
