"""Wan 2.1 / 2.2: ``WanTransformer3DModel``.

Each block's ``attn1`` is a **spatiotemporal** site: full 3-D self-attention over the F×H×W
video tokens (frame-major, as the patch embedding flattens them). Its processor applies
RMS QK-norm across all heads, then the 3-D RoPE, before pagkit sees q and k. ``attn2`` is
cross-attention to the text (and, for image-to-video, image) tokens and is never a site; it is listed as a
``cross_sites`` layer (kind ``cross``) for NAG.
``patch_size`` is a (t, h, w) tuple; the grid of a forward is F/p_t × H/p_h × W/p_w of the latent
(B, C, F, H, W). The rotary table (``rotary_emb``, passed positionally to every block) is shared by all samples.
"""
from __future__ import annotations

from . import Backend, ForwardInfo, Site, register


def _patch(model) -> tuple[int, int, int]:
    patch = model.config.patch_size
    return tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)


@register
class WanBackend(Backend):
    name = "wan"
    model_classes = ("WanTransformer3DModel",)
    shared_inputs = frozenset({"rotary_emb"})
    tested_against = "a reference forward computing the perturbed attention explicitly at the model's attention call"

    def sites(self, model):
        p_t, p_h, p_w = _patch(model)
        # a non-square patch: the forward's grid is given in tokens (forward_info) and sites divide by 1
        down = p_h if p_h == p_w else 1
        return [Site(f"blocks.{i}.attn1", "spatiotemporal", b.attn1.heads, b.attn1.to_q.in_features, down)
                for i, b in enumerate(model.blocks)]

    def cross_sites(self, model):
        down = self.sites(model)[0].downsampling if len(model.blocks) else 1
        return [Site(f"blocks.{i}.attn2", "cross", b.attn2.heads, b.attn2.to_q.in_features, down)
                for i, b in enumerate(model.blocks)]

    def stages(self, model):
        # the patch embedding reads only the per-sample latents (the condition embedder can take a flattened
        # batch × tokens timestep in Wan 2.2, so it is left to run on every row)
        return ["patch_embedding"] + [f"blocks.{i}" for i in range(len(model.blocks))]

    def forward_info(self, model, x, kwargs):
        if x.ndim != 5:
            return ForwardInfo()
        p_t, p_h, p_w = _patch(model)
        hw = tuple(x.shape[-2:]) if p_h == p_w else (x.shape[-2] // p_h, x.shape[-1] // p_w)
        return ForwardInfo(hw=hw, frames=x.shape[2] // p_t)

    def learned_sigma(self, model):
        return False

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("Wan is a video model: sample through diffusers' WanPipeline with pagkit.attach(pipe, ...)")
