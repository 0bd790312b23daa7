"""Find a model's self-attention layers and resolve user layer selections.

A layer's canonical name is its module path, e.g.
``mid_block.attentions.0.transformer_blocks.0.attn1``. A selection item is one of

* an exact name;
* a glob over names (``down_blocks.*.attentions.0*``);
* a short alias matching *whole path segments*: ``mid``, ``down``, ``up``,
  ``down.N``, ``up.N``, ``blocks.N`` (→ ``mid_block``, ``down_blocks.N``,
  ``up_blocks.N``, ``transformer_blocks.N``). Any path segments may follow,
  e.g. ``down.1.attentions.0``. ``blocks.1`` never selects ``blocks.10``: that
  regex-substring behaviour of diffusers is exactly what this module avoids.

An item that selects nothing is an error naming the closest valid names.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import dataclass

import torch.nn as nn
from diffusers.models.attention_processor import Attention

# first alias segment → the path segments it stands for
ALIAS_SEGMENTS = {
    "mid": ("mid", "mid_block"),
    "down": ("down", "down_blocks"),
    "up": ("up", "up_blocks"),
    "blocks": ("blocks", "transformer_blocks"),
}


@dataclass(frozen=True)
class LayerInfo:
    name: str
    grid: tuple[int, int] | None  # token grid (H, W) at the model's configured sample size
    downsampling: int | None  # input pixels (or latents) per token along each axis
    heads: int
    channels: int


def is_self_attention(module: nn.Module) -> bool:
    return isinstance(module, Attention) and not module.is_cross_attention and not module.only_cross_attention \
        and getattr(module, "added_kv_proj_dim", None) is None


def _forward_order(name: str) -> tuple:
    """UNets register up_blocks before mid_block; list layers in the order the forward pass meets them."""
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(name.split(".")[0], 0)
    return (rank,)


def self_attention_modules(model: nn.Module) -> dict[str, Attention]:
    found = [(name, m) for name, m in model.named_modules() if is_self_attention(m)]
    return dict(sorted(found, key=lambda item: _forward_order(item[0])))  # stable: module order within a part


def _downsampling_factors(model: nn.Module) -> dict[str, int]:
    """Input size ÷ token-grid size for each self-attention layer (UNets by their samplers, transformers by patch)."""
    factors: dict[str, int] = {}
    config = getattr(model, "config", {})
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        f = 1
        for i, block in enumerate(model.down_blocks):
            factors[f"down_blocks.{i}."] = f
            if getattr(block, "downsamplers", None) is not None:
                f *= 2
        factors["mid_block."] = f
        for i, block in enumerate(model.up_blocks):
            factors[f"up_blocks.{i}."] = f
            if getattr(block, "upsamplers", None) is not None:
                f //= 2
    elif config.get("patch_size"):
        factors[""] = int(config["patch_size"])
    out = {}
    for name in self_attention_modules(model):
        matches = [p for p in factors if name.startswith(p)]
        if matches:
            out[name] = factors[max(matches, key=len)]
    return out


def _sample_size(model: nn.Module) -> tuple[int, int] | None:
    size = getattr(model, "config", {}).get("sample_size")
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return tuple(size)


def grid_for(factor: int | None, height: int, width: int) -> tuple[int, int] | None:
    """Token grid of a layer for an input of height×width (ceil: stride-2 convs round up)."""
    if factor is None:
        return None
    return math.ceil(height / factor), math.ceil(width / factor)


def layers(model: nn.Module) -> list[LayerInfo]:
    """Every self-attention layer of ``model``, in module order, with its token grid at the configured size."""
    factors = _downsampling_factors(model)
    size = _sample_size(model)
    infos = []
    for name, m in self_attention_modules(model).items():
        f = factors.get(name)
        grid = grid_for(f, *size) if (f and size) else None
        infos.append(LayerInfo(name, grid, f, m.heads, m.to_q.in_features))
    return infos


def _segment_match(pattern: list[str], path: list[str]) -> bool:
    first = ALIAS_SEGMENTS.get(pattern[0], (pattern[0],))
    rest = pattern[1:]
    for i, seg in enumerate(path):
        if seg in first and path[i + 1:i + 1 + len(rest)] == rest:
            return True
    return False


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """The short aliases that select something in ``model``, each with the layers it selects."""
    names = list(self_attention_modules(model))
    candidates = ["mid", "down", "up"]
    for name in names:
        parts = name.split(".")
        for short, (_, long) in ALIAS_SEGMENTS.items():
            if short == "blocks" and parts[0] in ("down_blocks", "mid_block", "up_blocks"):
                continue  # inside a UNet, transformer_blocks.N is not a useful alias
            if long in parts:
                i = parts.index(long)
                if i + 1 < len(parts) and parts[i + 1].isdigit() and short != "mid":
                    candidates.append(f"{short}.{parts[i + 1]}")
    out = {}
    for alias in dict.fromkeys(candidates):
        selected = [n for n in names if _segment_match(alias.split("."), n.split("."))]
        if selected:
            out[alias] = selected
    return out


def resolve_layers(model: nn.Module, selection: str | list[str] | tuple[str, ...]) -> list[str]:
    """Names of the self-attention layers that ``selection`` picks, in module order, without repeats."""
    items = [selection] if isinstance(selection, str) else list(selection)
    names = list(self_attention_modules(model))
    if not names:
        raise ValueError(f"{type(model).__name__} has no diffusers self-attention (Attention) modules to perturb")
    if not items:
        raise ValueError("no layers given; pass a layer name, a glob or an alias such as 'mid'")
    chosen: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"layer selections must be non-empty strings, got {item!r}")
        item = item.strip()
        if any(c in item for c in "*?["):
            hits = fnmatch.filter(names, item)
        else:
            hits = [n for n in names if _segment_match(item.split("."), n.split("."))]
        if not hits:
            raise ValueError(_unknown_layer_message(model, item, names))
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _unknown_layer_message(model: nn.Module, item: str, names: list[str]) -> str:
    module = dict(model.named_modules()).get(item)
    if isinstance(module, Attention) and not is_self_attention(module):
        return (f"layer {item!r} is a cross-attention layer; pagkit perturbs self-attention only. "
                f"Self-attention layers: {', '.join(names[:6])}{' …' if len(names) > 6 else ''}")
    vocabulary = names + list(aliases(model))
    close = difflib.get_close_matches(item, vocabulary, n=5, cutoff=0.3)
    if not close:
        close = vocabulary[:5]
    return (f"unknown layer {item!r} in {type(model).__name__}; nearest valid names: {', '.join(close)}. "
            f"Aliases: {', '.join(aliases(model))}. List all with `pagkit layers`.")
