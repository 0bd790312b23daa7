"""Mochi 1: ``MochiTransformer3DModel``.

Each block's ``attn1`` is a **joint** site over **[video; valid text]** (video first, separate
projections): the processor attends one sample at a time, with that sample's text padding dropped
(from ``encoder_attention_mask``), so each attention call holds one row of the batch and its
sequence length is the video tokens plus that sample's valid text tokens. ``attention_rows`` tells
routing so: the i-th call of a site is row i. Per-head RMS QK-norm on both streams, RoPE on the video
tokens only, all in the model's own processor. Latents are (B, C, F, H, W); grid F × H/p × W/p (no
temporal patching). The rotary table (``image_rotary_emb``) is shared by every sample.
"""
from __future__ import annotations

from . import Backend, ForwardInfo, Site, register, skip_video_and_text


@register
class MochiBackend(Backend):
    name = "mochi"
    model_classes = ("MochiTransformer3DModel",)
    shared_inputs = frozenset({"image_rotary_emb"})
    tested_against = ("a reference joint forward with an explicit mask (and an explicit SEG blur) at the model's "
                      "per-sample attention calls, text padding dropped as the model drops it")

    def sites(self, model):
        patch = int(model.config.patch_size)
        return [Site(f"transformer_blocks.{i}.attn1", "joint", b.attn1.heads, b.attn1.to_q.in_features, patch,
                     image_first=True) for i, b in enumerate(model.transformer_blocks)]

    def stages(self, model):
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def forward_info(self, model, x, kwargs):
        if x.ndim != 5:
            return ForwardInfo()
        return ForwardInfo(hw=tuple(x.shape[-2:]), frames=x.shape[2])

    def attention_rows(self, site, call, attention_batch, model_batch):
        if attention_batch != 1:
            raise ValueError(f"Mochi site {site.name}: expected one sample per attention call, got {attention_batch}")
        return [call]

    skip_output = staticmethod(skip_video_and_text)  # STG-R / SLG: a skipped block returns both streams

    def learned_sigma(self, model):
        return False

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("Mochi is a video model: sample through diffusers' MochiPipeline with "
                         "pagkit.attach(pipe, ...)")
