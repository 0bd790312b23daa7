"""Lumina-Image 2.0: ``Lumina2Transformer2DModel``.

Three kinds of attention, each a diffusers ``Attention`` with RMS QK-norm, complex RoPE and
grouped-query heads (the processor repeats K/V to the query heads before SDPA):

* ``context_refiner.N``: text tokens only. **Not a site.**
* ``noise_refiner.N.attn``: image tokens only, a **self** site (grid = input H×W ÷ patch).
* ``layers.N.attn``: **single**-stream sites. The model packs each sample as
  **[its valid caption tokens; image; padding]**: the image starts after the caption's
  effective length (``encoder_attention_mask.sum()``), so it sits at [T, T + H·W) and not at the
  end of the sequence when another row of the batch (e.g. CFG's negative prompt) has a longer
  caption. ``forward_info`` reads T off the conditional inputs' mask, one T per sample where the
  prompts of a batch differ in length; then each perturbed row gets its own sample's layout
  (``segment_layouts``).

Rotary tables are per sample here (built from per-sample position ids), so nothing is shared.
"""
from __future__ import annotations

import math

from ..perturb import TokenLayout
from . import Backend, ForwardInfo, Site, register


@register
class Lumina2Backend(Backend):
    name = "lumina2"
    model_classes = ("Lumina2Transformer2DModel",)
    tested_against = "a reference self/single-stream forward with an explicit mask; batched CFG = separate"

    def sites(self, model):
        patch = int(model.config.patch_size)

        def site(name, attn, kind):
            return Site(name, kind, attn.heads, attn.to_q.in_features, patch, image_first=kind == "self")
        return ([site(f"noise_refiner.{i}.attn", b.attn, "self") for i, b in enumerate(model.noise_refiner)]
                + [site(f"layers.{i}.attn", b.attn, "single") for i, b in enumerate(model.layers)])

    def stages(self, model):
        return (["x_embedder"] + [f"context_refiner.{i}" for i in range(len(model.context_refiner))]
                + [f"noise_refiner.{i}" for i in range(len(model.noise_refiner))]
                + [f"layers.{i}" for i in range(len(model.layers))])

    def forward_info(self, model, x, kwargs):
        mask = kwargs.get("encoder_attention_mask")
        if mask is None:
            return ForwardInfo(hw=tuple(x.shape[-2:]))
        lengths = tuple(int(n) for n in mask.sum(dim=1).tolist())
        if len(set(lengths)) == 1:
            return ForwardInfo(hw=tuple(x.shape[-2:]), text_tokens=lengths[0])
        return ForwardInfo(hw=tuple(x.shape[-2:]), text_tokens_per_sample=lengths)

    def layout(self, site, seq_len, info):
        if site.kind != "single":
            return super().layout(site, seq_len, info)
        if info is None or info.hw is None or info.text_tokens is None:
            raise ValueError(f"pagkit cannot tell where the image tokens of single-stream site {site.name} are: "
                             "Lumina2 places them after each caption's valid tokens, and "
                             + ("encoder_attention_mask is missing" if info is None or info.text_tokens_per_sample
                                is None else "the captions of this batch differ in length, so this use (SAG's "
                                "map, NAG's mix) has no single layout; PAG, SEG and the others take each row's own"))
        return self._single_layout(site, seq_len, info, info.text_tokens)

    def segment_layouts(self, site, seq_len, info, rows):
        per_sample = info.text_tokens_per_sample if info is not None else None
        if site.kind != "single" or per_sample is None:
            return super().segment_layouts(site, seq_len, info, rows)
        if rows % len(per_sample):
            raise ValueError(f"{site.name}: {rows} perturbed rows do not cover the {len(per_sample)} samples whole")
        return [self._single_layout(site, seq_len, info, per_sample[j % len(per_sample)]) for j in range(rows)]

    def _single_layout(self, site, seq_len, info, start):
        """[``start`` caption tokens; image; padding]."""
        if info.hw is None:
            raise ValueError(f"pagkit cannot tell where the image tokens of single-stream site {site.name} are")
        grid = (math.ceil(info.hw[0] / site.downsampling), math.ceil(info.hw[1] / site.downsampling))
        if start + grid[0] * grid[1] > seq_len:
            raise ValueError(f"{site.name}: {grid[0] * grid[1]} image tokens after {start} caption tokens do not fit "
                             f"in a sequence of {seq_len}")
        return TokenLayout(seq_len, (start, start + grid[0] * grid[1]), grid)

    def learned_sigma(self, model):
        return False
