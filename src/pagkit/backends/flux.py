"""Flux.1: ``FluxTransformer2DModel``: double-stream blocks, then single-stream blocks.

Both attend over **[text; image]** (text first: a node that assumes image-first tokens
perturbs the wrong block). Double-stream ``transformer_blocks.N.attn`` are **joint** sites
(separate projections, concatenated inside the processor); ``single_transformer_blocks.N.attn``
are **single**-stream sites (the block concatenates [text; image] before attention). The
processor applies per-head QK-norm and then RoPE over the whole joint sequence before
pagkit sees q and k. Latents are packed 2×2 patches, so the image grid comes from ``img_ids``.
``txt_ids``, ``img_ids`` and the rotary table are shared by every sample.
"""
from __future__ import annotations

import torch

from . import Backend, ForwardInfo, Site, register


@register
class FluxBackend(Backend):
    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    shared_inputs = frozenset({"txt_ids", "img_ids", "image_rotary_emb"})
    timestep_divisor = 1000.0  # FluxPipeline calls the transformer with t / 1000
    tested_against = "a reference joint/single-stream forward with an explicit mask; FluxPipeline through attach"

    def sites(self, model):
        def site(name, attn, kind):
            return Site(name, kind, attn.heads, attn.to_q.in_features, 1, image_first=False)
        return ([site(f"transformer_blocks.{i}.attn", b.attn, "joint") for i, b in enumerate(model.transformer_blocks)]
                + [site(f"single_transformer_blocks.{i}.attn", b.attn, "single")
                   for i, b in enumerate(model.single_transformer_blocks)])

    def stages(self, model):
        # the embedders read only per-sample inputs (pos_embed reads the shared ids: not a stage)
        embedders = [n for n in ("x_embedder", "context_embedder", "time_text_embed") if hasattr(model, n)]
        return (embedders + [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
                + [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))])

    def forward_info(self, model, x, kwargs):
        ids = kwargs.get("img_ids")
        if ids is None:
            return ForwardInfo()
        ids = ids[0] if ids.ndim == 3 else ids
        hw = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        if hw[0] * hw[1] != x.shape[1]:  # ids not a full row-major grid: keep the count, no grid for SEG
            return ForwardInfo(hw=(1, x.shape[1]))
        return ForwardInfo(hw=hw)

    def learned_sigma(self, model):
        return False

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("Flux takes packed latents with txt_ids/img_ids: sample through diffusers' FluxPipeline "
                         "with pagkit.attach(pipe, ...)")
