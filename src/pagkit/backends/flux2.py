"""Flux.2: ``Flux2Transformer2DModel``: Flux.1's layout, with the single-stream attention fused with the MLP.

Double-stream ``transformer_blocks.N.attn`` (``Flux2Attention``) are **joint** sites and
``single_transformer_blocks.N.attn`` (``Flux2ParallelSelfAttention``: one projection gives q, k,
v and the MLP input) are **single**-stream sites, both over **[text; image]**. Per-head QK-norm,
then RoPE over the joint sequence (text and image tables concatenated), all inside the model's
processors. The image grid comes from ``img_ids`` (columns h, w of its (t, h, w, l) ids); with
reference images in the image stream the ids are not one full grid, so the count is kept with no
grid for SEG. Ids and rotary tables are shared by every sample. The KV-cache modes of
Flux.2-klein editing (``kv_cache_mode``, Flux2KleinKVPipeline with reference images) are refused with a
message: there the image queries attend to keys of another sequence ([text; cached reference; image]), which
no perturbation here is written for, and step 0 returns the cache beside the prediction.
"""
from __future__ import annotations

from . import Site, register
from .flux import FluxBackend


@register
class Flux2Backend(FluxBackend):
    name = "flux2"
    model_classes = ("Flux2Transformer2DModel",)
    tested_against = "a reference joint/single-stream forward with an explicit mask"

    def sites(self, model):
        def site(name, attn, kind):
            return Site(name, kind, attn.heads, attn.query_dim, 1, image_first=False)
        return ([site(f"transformer_blocks.{i}.attn", b.attn, "joint") for i, b in enumerate(model.transformer_blocks)]
                + [site(f"single_transformer_blocks.{i}.attn", b.attn, "single")
                   for i, b in enumerate(model.single_transformer_blocks)])

    def call(self, forward, x, t, kwargs):
        if kwargs.get("kv_cache_mode") is not None:
            raise ValueError(f"pagkit does not guide Flux.2-klein's KV-cache mode (kv_cache_mode="
                             f"{kwargs['kv_cache_mode']!r}: Flux2KleinKVPipeline with reference images); use "
                             "Flux2KleinPipeline, which keeps the reference tokens in the sequence, under pagkit.attach")
        return super().call(forward, x, t, kwargs)

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("Flux.2 takes packed latents with txt_ids/img_ids: sample through diffusers' Flux2Pipeline "
                         "with pagkit.attach(pipe, ...)")
