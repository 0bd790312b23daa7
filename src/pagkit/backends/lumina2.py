"""Lumina-Image 2.0: ``Lumina2Transformer2DModel``.

Three kinds of attention, each a diffusers ``Attention`` with RMS QK-norm, complex RoPE and
grouped-query heads (the processor repeats K/V to the query heads before SDPA):

* ``context_refiner.N``: text tokens only. **Not a site.**
* ``noise_refiner.N.attn``: image tokens only, a **self** site (grid = input H×W ÷ patch).
* ``layers.N.attn``: **single**-stream sites. The model packs each sample as
  **[its valid caption tokens; image; padding]**: the image starts after the caption's
  effective length (``encoder_attention_mask.sum()``), so it sits at [T, T + H·W) and not at the
  end of the sequence when another row of the batch (e.g. CFG's negative prompt) has a longer
  caption. ``forward_info`` reads T off the conditional inputs' mask; a batch whose conditional
  captions differ in length has no single layout, and perturbing a single-stream site there is
  an error (the noise refiner is still fine).

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
        lengths = set() if mask is None else set(mask.sum(dim=1).tolist())
        return ForwardInfo(hw=tuple(x.shape[-2:]), text_tokens=int(lengths.pop()) if len(lengths) == 1 else None)

    def layout(self, site, seq_len, info):
        if site.kind != "single":
            return super().layout(site, seq_len, info)
        if info is None or info.hw is None or info.text_tokens is None:
            raise ValueError(f"pagkit cannot tell where the image tokens of single-stream site {site.name} are: "
                             "Lumina2 places them after each caption's valid tokens, and the conditional "
                             "captions of this batch differ in length (or encoder_attention_mask is missing)")
        grid = (math.ceil(info.hw[0] / site.downsampling), math.ceil(info.hw[1] / site.downsampling))
        start = info.text_tokens
        if start + grid[0] * grid[1] > seq_len:
            raise ValueError(f"{site.name}: {grid[0] * grid[1]} image tokens after {start} caption tokens do not fit "
                             f"in a sequence of {seq_len}")
        return TokenLayout(seq_len, (start, start + grid[0] * grid[1]), grid)

    def learned_sigma(self, model):
        return False
