"""HunyuanVideo: ``HunyuanVideoTransformer3DModel`` (text-to-video and its token-replace image-to-video form).

Double-stream ``transformer_blocks.N.attn`` are **joint** sites over **[video; text]** (video first:
separate projections, concatenated inside the processor); ``single_transformer_blocks.N.attn`` are
**single**-stream sites, the block's [video; text] sequence split back into the two streams and
concatenated by the processor in that order. The processor applies per-head RMS QK-norm, then 3-D RoPE
on the video tokens only. The model's own boolean mask hides the text padding (from
``encoder_attention_mask``) on every query; pagkit keeps it. The token refiner
(``context_embedder.token_refiner``) is self-attention over text only and is never a site.
Latents are (B, C, F, H, W); the grid is F/p_t × H/p × W/p. The rotary table (``image_rotary_emb``, called
``freqs_cis`` by the single-stream blocks) is shared by every sample.
"""
from __future__ import annotations

from . import Backend, ForwardInfo, Site, register, skip_video_and_text


@register
class HunyuanVideoBackend(Backend):
    name = "hunyuan_video"
    model_classes = ("HunyuanVideoTransformer3DModel",)
    pipeline = "HunyuanVideoPipeline"  # what to sample through (sample_shape's error)
    shared_inputs = frozenset({"image_rotary_emb", "freqs_cis"})
    tested_against = ("a reference joint/single-stream forward with an explicit mask (and an explicit SEG blur) at "
                      "the model's attention call, with the model's own text-padding mask")

    def sites(self, model):
        patch = int(model.config.patch_size)

        def site(name, attn, kind):
            return Site(name, kind, attn.heads, attn.to_q.in_features, patch, image_first=True)
        return ([site(f"transformer_blocks.{i}.attn", b.attn, "joint") for i, b in enumerate(model.transformer_blocks)]
                + [site(f"single_transformer_blocks.{i}.attn", b.attn, "single")
                   for i, b in enumerate(model.single_transformer_blocks)])

    def stages(self, model):
        return ([f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
                + [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))])

    def forward_info(self, model, x, kwargs):
        if x.ndim != 5:
            return ForwardInfo()
        return ForwardInfo(hw=tuple(x.shape[-2:]), frames=x.shape[2] // model.config.patch_size_t)

    skip_output = staticmethod(skip_video_and_text)  # STG-R / SLG: a skipped block returns both streams

    def learned_sigma(self, model):
        return False

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError(f"{type(model).__name__} is a video model: sample through diffusers' {self.pipeline} "
                         "with pagkit.attach(pipe, ...)")
