"""List a model's perturbable attention sites and resolve user layer selections.

The sites come from the model family's backend (``pagkit.backends``). A site's canonical name is its module
path, e.g.
``mid_block.attentions.0.transformer_blocks.0.attn1``. A selection item is one of

* an exact name;
* a glob over names (``down_blocks.*.attentions.0*``);
* a short alias matching *whole path segments*: ``mid``, ``down``, ``up``,
  ``down.N``, ``up.N``, ``blocks.N``, ``single.N``, ``double.N`` (→ ``mid_block``,
  ``down_blocks.N``, ``up_blocks.N``, ``transformer_blocks.N`` or HunyuanDiT's ``blocks.N``,
  Flux's ``single_transformer_blocks.N``, its double-stream ``transformer_blocks.N``). Any path segments may follow,
  e.g. ``down.1.attentions.0``. ``blocks.1`` never selects ``blocks.10``: that
  regex-substring behaviour of diffusers is exactly what this module avoids. A bare block alias selects a
  video block's spatial attention, not its temporal (motion-module) attention; name or glob those.

``kind=`` keeps the sites of one kind (``Site.kind``: ``spatial``, ``temporal``, ``spatiotemporal``, ...);
with it a bare alias selects every site of that kind in the block (``"mid", kind="temporal"``: the mid block's
motion-module attention). A kind the model has no site of is an error naming the kinds it has.

An item that selects nothing is an error naming the closest valid names.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import dataclass

import torch.nn as nn

from .backends import SITE_KINDS, Site, detect

# first alias segment → the path segments it stands for
ALIAS_SEGMENTS = {
    "mid": ("mid", "mid_block"),
    "down": ("down", "down_blocks"),
    "up": ("up", "up_blocks"),
    "blocks": ("blocks", "transformer_blocks"),
    "single": ("single", "single_transformer_blocks"),
    "double": ("double", "transformer_blocks"),
}


@dataclass(frozen=True)
class LayerInfo:
    name: str
    grid: tuple[int, ...] | None  # token grid (H, W), or (F, H, W) for video, at the model's configured sample size
    downsampling: int | None  # input pixels (or latents) per token along each axis
    heads: int
    channels: int
    kind: str = "self"  # self | joint (text + image, one softmax) | single (one [text; image] stream)
    #                     | spatial | temporal | spatiotemporal (video: within a frame, across frames, both)


def sites(model: nn.Module) -> dict[str, Site]:
    """The perturbable attention sites of ``model``, in forward order, by name."""
    return {site.name: site for site in detect(model).sites(model)}


def grid_for(factor: int | None, height: int, width: int) -> tuple[int, int] | None:
    """Token grid of a layer for an input of height×width (ceil: stride-2 convs round up)."""
    if factor is None:
        return None
    return math.ceil(height / factor), math.ceil(width / factor)


def layers(model: nn.Module) -> list[LayerInfo]:
    """Every perturbable attention site of ``model``, in forward order, with its token grid at the configured size."""
    backend = detect(model)
    info = backend.sample_info(model)
    return [LayerInfo(s.name, backend.grid(s, info), s.downsampling, s.heads, s.channels, s.kind)
            for s in backend.sites(model)]


def _segment_match(pattern: list[str], path: list[str]) -> bool:
    first = ALIAS_SEGMENTS.get(pattern[0], (pattern[0],))
    rest = pattern[1:]
    for i, seg in enumerate(path):
        if seg in first and path[i + 1:i + 1 + len(rest)] == rest:
            return True
    return False


def _alias_hits(model: nn.Module, item: str, names: list[str], kind: str | None = None,
                kinds: dict[str, str] | None = None) -> list[str]:
    """The sites an exact name or alias selects. A bare block alias (``mid``, ``down.1``) selects the block's
    spatial attention: its temporal sites (video motion modules) only when it holds nothing else; a name or glob
    that goes into them (``mid.motion_modules.0``, ``mid_block.motion_modules.*``) reaches them. With ``kind``
    the caller keeps that kind's sites, so nothing is dropped here."""
    parts = item.split(".")
    hits = [n for n in names if _segment_match(parts, n.split("."))]
    bare = parts[0] in ALIAS_SEGMENTS and (len(parts) == 1 or (len(parts) == 2 and parts[1].isdigit()))
    if bare and item not in names and kind is None:
        kinds = kinds or {s.name: s.kind for s in detect(model).sites(model)}
        return [n for n in hits if kinds[n] != "temporal"] or hits
    return hits


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """The short aliases that select something in ``model``, each with the layers it selects."""
    names = list(sites(model))
    two_streams = any("single_transformer_blocks" in n for n in names)  # Flux-style double + single blocks
    candidates = ["mid", "down", "up"] + (["double", "single"] if two_streams else [])
    for name in names:
        parts = name.split(".")
        for short, segments in ALIAS_SEGMENTS.items():
            if short == "blocks" and (parts[0] in ("down_blocks", "mid_block", "up_blocks") or two_streams):
                continue  # inside a UNet transformer_blocks.N is not a useful alias; in Flux it is double.N
            if short == "double" and not two_streams:
                continue
            for i, part in enumerate(parts[:-1]):
                if part in segments and parts[i + 1].isdigit() and short != "mid":
                    candidates.append(f"{short}.{parts[i + 1]}")
    out = {}
    for alias in dict.fromkeys(candidates):
        selected = _alias_hits(model, alias, names)
        if selected:
            out[alias] = selected
    return out


def resolve_layers(model: nn.Module, selection: str | list[str] | tuple[str, ...], kind: str | None = None,
                   among: list[Site] | None = None) -> list[str]:
    """Names of the self-attention layers that ``selection`` picks, in module order, without repeats.

    ``kind``: keep only the sites of that kind (see the module docstring); every item must select one.
    ``among``: the sites to choose from instead of the perturbable ones (NAG: cross-, joint and single-stream
    attention)."""
    items = [selection] if isinstance(selection, str) else list(selection)
    found = sites(model) if among is None else {s.name: s for s in among}
    names = list(found)
    kinds = {n: s.kind for n, s in found.items()}
    if not names:
        raise ValueError(f"{type(model).__name__} has no perturbable attention sites")
    if not items:
        raise ValueError("no layers given; pass a layer name, a glob or an alias such as 'mid'")
    if kind is not None:
        check_kind(model, kind)
    chosen: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"layer selections must be non-empty strings, got {item!r}")
        item = item.strip()
        if any(c in item for c in "*?["):
            hits = fnmatch.filter(names, item)
        else:
            hits = _alias_hits(model, item, names, kind, kinds)
        if not hits:
            raise ValueError(_unknown_layer_message(model, item, names) if among is None else
                             f"layer {item!r} selects none of the {len(names)} layers of {type(model).__name__} "
                             f"it can choose from here: {', '.join(names[:6])}{' …' if len(names) > 6 else ''}")
        if kind is not None:
            of_kind = [n for n in hits if found[n].kind == kind]
            if not of_kind:
                raise ValueError(f"layer {item!r} selects no {kind} site of {type(model).__name__}, only "
                                 f"{_kinds_of(hits, found)} ones: {', '.join(hits[:4])}{' …' if len(hits) > 4 else ''}")
            hits = of_kind
        chosen.update(hits)
    return [n for n in names if n in chosen]


def check_kind(model: nn.Module, kind) -> None:
    """One clear error unless ``model`` has sites of ``kind`` (naming the valid kinds, or the kinds it has)."""
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown site kind {kind!r}; valid kinds: {', '.join(SITE_KINDS)}")
    found = sites(model)
    if not any(s.kind == kind for s in found.values()):
        raise ValueError(f"{type(model).__name__} has no {kind} attention sites; its sites are of kind: "
                         f"{_kinds_of(list(found), found)}")


def _kinds_of(names: list[str], found: dict[str, Site]) -> str:
    return ", ".join(dict.fromkeys(found[n].kind for n in names))


def _unknown_layer_message(model: nn.Module, item: str, names: list[str]) -> str:
    module = dict(model.named_modules()).get(item)
    if module is not None and any(hasattr(module, a) for a in ("to_q", "to_k", "processor")):
        what = "a cross-attention layer" if getattr(module, "is_cross_attention", False) else \
            "not a perturbable site (text-only or cross-attention)"
        return (f"layer {item!r} is {what}; pagkit perturbs attention over image tokens. "
                f"Sites: {', '.join(names[:6])}{' …' if len(names) > 6 else ''}")
    vocabulary = names + list(aliases(model))
    close = difflib.get_close_matches(item, vocabulary, n=5, cutoff=0.3)
    if not close:
        close = vocabulary[:5]
    return (f"unknown layer {item!r} in {type(model).__name__}; nearest valid names: {', '.join(close)}. "
            f"Aliases: {', '.join(aliases(model))}. List all with `pagkit layers`.")
