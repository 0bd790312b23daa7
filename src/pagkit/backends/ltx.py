"""LTX-Video: ``LTXVideoTransformer3DModel``.

Each block's ``attn1`` is a **spatiotemporal** site: 3-D self-attention over the video tokens, with
RMS QK-norm across all heads and then 3-D RoPE in the model's own processor; ``attn2`` is
cross-attention to the text and is never a site. Latents come packed, (B, F·H·W, C) frame-major, with
the grid passed as ``num_frames``, ``height``, ``width`` (latent units; ÷ the patch sizes for tokens).
``rope_interpolation_scale`` is shared by every sample; the rotary table is not (the model builds it per
sample, from each sample's video coordinates), so prefix sharing slices it with the rows.
"""
from __future__ import annotations

from . import Backend, ForwardInfo, Site, register


@register
class LTXVideoBackend(Backend):
    name = "ltx"
    model_classes = ("LTXVideoTransformer3DModel",)
    shared_inputs = frozenset({"rope_interpolation_scale"})
    tested_against = "a reference forward computing the perturbed attention explicitly at the model's attention call"

    def sites(self, model):
        patch = int(model.config.patch_size)
        return [Site(f"transformer_blocks.{i}.attn1", "spatiotemporal", b.attn1.heads, b.attn1.to_q.in_features,
                     patch) for i, b in enumerate(model.transformer_blocks)]

    def stages(self, model):
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def forward_info(self, model, x, kwargs):
        f, h, w = (kwargs.get(k) for k in ("num_frames", "height", "width"))
        if f is None or h is None or w is None:
            return ForwardInfo()  # video_coords alone: the token count only, no grid for SEG
        return ForwardInfo(hw=(int(h), int(w)), frames=int(f) // model.config.patch_size_t)

    def learned_sigma(self, model):
        return False

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("LTX-Video takes packed latents: sample through diffusers' LTXPipeline with "
                         "pagkit.attach(pipe, ...)")
