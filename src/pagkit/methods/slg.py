"""SLG, skip-layer guidance (Stability AI, with SD3.5; reference implementations: Stability-AI/sd3.5
``sd3_infer.py`` ``SkipLayerCFGDenoiser`` and diffusers' ``StableDiffusion3Pipeline(skip_guidance_layers=...)``,
which pagkit is tested against).

In the perturbed branch whole blocks return their input(s): ε_skip is the conditional prediction with the
chosen blocks skipped, and ε̃ = ε_u + w(ε_c − ε_u) + s·(ε_c − ε_skip) (without CFG: ε_c + s(ε_c − ε_skip)).
``scale`` is s (0 = off), the same number as diffusers' ``skip_layer_guidance_scale``.

Defaults are diffusers' (its recommendation for SD3.5 Medium): blocks 7, 8, 9, s = 2.8, steps 1–20 %.

**Interval.** diffusers and Stability apply SLG at step i (from 0) of N when ``i > N·start and i < N·stop``,
open at both ends, unlike pagkit's other terms ([start, stop)). ``SLG`` follows them: it acts where
start < i/N < stop, so ``SLG(start=a, stop=b)`` equals the pipeline's ``skip_layer_guidance_start=a,
skip_layer_guidance_stop=b`` step for step (with N = 28: steps 1–5 of 0–27). ``start=0`` therefore still
skips step 0; a ramp (``scale_end``) runs linearly over (start, stop).

**What a block is** (``Backend.skip_blocks``): on transformer families the stages that hold a site, i.e. the
transformer blocks (SD3: ``transformer_blocks.i``, joint attention and feed-forward of image and text, and
on SD3.5's dual-attention blocks ``attn2`` too). On UNets the attention (transformer) blocks that hold the
self-attention sites: ``down_blocks.i.attentions.j``, ``mid_block.attentions.0``, ``up_blocks.i.attentions.j``
(for ``UNet2DConditionModel`` a ``Transformer2DModel``: norm, proj_in, self- and cross-attention and the
feed-forward, proj_out and its residual; for ``UNet2DModel`` the ``Attention`` block with its residual). A
skipped one is the identity; the resnets and samplers around it still run. A UNet's down/up blocks change
the resolution and cannot return their inputs.

``layers``: block indices into that list (diffusers' ``skip_guidance_layers``, e.g. ``[7, 8, 9]``), block
names or globs over them, or any layer selection of ``pagkit.layers`` (``"mid"``, ``"blocks.7"``,
``"down.1"``), which selects the blocks holding those sites.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ..layers import resolve_layers
from ..routing import SKIP
from .base import Contrast, ContrastTerm


@dataclass
class SLG(ContrastTerm):
    """Skip-layer guidance: ε̃ = CFG + s(ε_c − ε_skip), ε_skip with ``layers`` (blocks) returning their inputs.

    Scale s as diffusers' ``skip_layer_guidance_scale`` (0 = off). The interval is open at both ends:
    start < i/N < stop, as diffusers' SD3 pipeline (see ``pagkit.methods.slg``).
    """

    scale: float = 2.8
    layers: int | str | tuple | list = (7, 8, 9)
    start: float = field(default=0.01, kw_only=True)
    stop: float = field(default=0.2, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        check_blocks("SLG", self.layers)

    def in_interval(self, progress):
        return self.start < progress < self.stop

    def bind(self, key, context):
        blocks = resolve_blocks(context.model, context.backend, self.layers)
        return Contrast(self, key, {name: SKIP for name in blocks})


def check_blocks(method: str, selection) -> None:
    """One clear error unless ``selection`` is block indices (>= 0), block names or layer selections."""
    items = _items(selection)
    if not items:
        raise ValueError(f"{method} needs at least one block (layers=...)")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)) or \
                (isinstance(item, int) and item < 0) or (isinstance(item, str) and not item.strip()):
            raise ValueError(f"{method} layers are block indices (>= 0), block names or layer selections; "
                             f"got {item!r}")


def _items(selection) -> list:
    return [selection] if isinstance(selection, (int, str)) else list(selection)


def resolve_blocks(model, backend, selection, blocks: list[str] | None = None, method: str = "SLG", *,
                   kind: str | None = None) -> list[str]:
    """The names of the blocks ``selection`` picks (see the module docstring), in forward order.

    ``kind``: only blocks holding a site of that kind (``Site.kind``); a layer selection picks the blocks holding
    its sites of that kind, and a block given by index or name must hold one.
    ``blocks``: the list to pick from (default: the backend's ``skip_blocks``; TPG passes its ``token_blocks``);
    ``method`` names the caller in errors."""
    what = "skip" if blocks is None else "perturb"
    blocks = backend.skip_blocks(model) if blocks is None else blocks
    if not blocks:
        raise ValueError(f"pagkit knows no blocks it can {what} in {type(model).__name__} ({backend.name} family)")
    chosen: set[str] = set()
    for item in _items(selection):
        if isinstance(item, int):
            if not 0 <= item < len(blocks):
                raise ValueError(f"{method} block index {item} is out of range: {type(model).__name__} has "
                                 f"{len(blocks)} blocks it can {what} (0–{len(blocks) - 1}): "
                                 f"{', '.join(blocks[:4])}{' …' if len(blocks) > 4 else ''}")
            chosen.add(blocks[item])
        elif item in blocks:
            chosen.add(item)
        elif any(c in item for c in "*?["):
            hits = fnmatch.filter(blocks, item)
            if not hits:
                raise ValueError(f"{method}: {item!r} matches no block of {type(model).__name__}; blocks: "
                                 f"{', '.join(blocks[:6])}{' …' if len(blocks) > 6 else ''}")
            chosen.update(hits)
        else:
            for site in resolve_layers(model, item, kind=kind):
                holders = [b for b in blocks if site == b or site.startswith(b + ".")]
                if not holders:
                    raise ValueError(f"{method}: site {site} (from {item!r}) lies in no block pagkit can {what}")
                chosen.add(max(holders, key=len))
    if kind is not None:
        of_kind = resolve_layers(model, "*", kind=kind)  # one clear error if the model has no such site
        for block in chosen:
            if not any(s == block or s.startswith(block + ".") for s in of_kind):
                raise ValueError(f"block {block} holds no {kind} attention site; blocks with {kind} sites: "
                                 f"{', '.join(b for b in blocks if any(s.startswith(b + '.') for s in of_kind))}")
    return [b for b in blocks if b in chosen]
