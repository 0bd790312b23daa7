"""Chroma: ``ChromaTransformer2DModel``, Flux.1's layout with pruned modulation.

The blocks are Flux's: double-stream ``transformer_blocks.N.attn`` are **joint** sites and
``single_transformer_blocks.N.attn`` **single**-stream sites, both over **[text; image]**, built
from ``FluxAttention`` with Flux's processor (per-head QK-norm, then RoPE over the whole joint
sequence). Its ``attention_mask`` covers [text; image] per sample and becomes a (S × S) mask in
each block; the perturbation keeps it. Grid from ``img_ids``; ids and rotary table are shared.
"""
from __future__ import annotations

from . import register
from .flux import FluxBackend


@register
class ChromaBackend(FluxBackend):
    name = "chroma"
    model_classes = ("ChromaTransformer2DModel",)
    tested_against = "a reference joint/single-stream forward with an explicit mask (text padding mask kept)"

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("Chroma takes packed latents with txt_ids/img_ids: sample through diffusers' ChromaPipeline "
                         "with pagkit.attach(pipe, ...)")
