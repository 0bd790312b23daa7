"""CogVideoX 1.0 / 1.5: ``CogVideoXTransformer3DModel``.

Each block's ``attn1`` is a **joint** site over **[text; video]** (text first): one sequence through
shared projections (one ``to_q``/``to_k``/``to_v`` for both streams), LayerNorm QK-norm per head,
then 3-D RoPE on the video tokens only, all inside the model's own processor. The video tokens are
frame-major F×H×W; latents are (B, F, C, H, W) (frames before channels), so F is ``x.shape[1]``,
÷ ``patch_size_t`` for CogVideoX 1.5. The rotary table (``image_rotary_emb``, built by the pipeline)
is shared by every sample.
"""
from __future__ import annotations

from . import Backend, ForwardInfo, Site, register, skip_video_and_text


@register
class CogVideoXBackend(Backend):
    name = "cogvideox"
    model_classes = ("CogVideoXTransformer3DModel",)
    shared_inputs = frozenset({"image_rotary_emb"})
    tested_against = ("a reference joint forward with an explicit mask (and an explicit SEG blur) at the model's "
                      "attention call")

    def sites(self, model):
        patch = int(model.config.patch_size)
        return [Site(f"transformer_blocks.{i}.attn1", "joint", b.attn1.heads, b.attn1.to_q.in_features, patch,
                     image_first=False) for i, b in enumerate(model.transformer_blocks)]

    def stages(self, model):
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def _frames(self, model, latent_frames: int) -> int:
        p_t = model.config.patch_size_t or 1
        return -(-latent_frames // p_t)  # CogVideoX 1.5's pipeline pads the latent frames to a multiple of p_t

    def forward_info(self, model, x, kwargs):
        if x.ndim != 5:
            return ForwardInfo()
        return ForwardInfo(hw=tuple(x.shape[-2:]), frames=self._frames(model, x.shape[1]),
                           text_tokens=kwargs["encoder_hidden_states"].shape[1]
                           if "encoder_hidden_states" in kwargs else None)

    def sample_info(self, model):
        c = model.config  # sample_frames counts video frames: latents are (frames - 1) / compression + 1
        latent = (c.sample_frames - 1) // c.temporal_compression_ratio + 1
        return ForwardInfo(hw=(c.sample_height, c.sample_width), frames=self._frames(model, latent))

    skip_output = staticmethod(skip_video_and_text)  # STG-R / SLG: a skipped block returns both streams

    def learned_sigma(self, model):
        return False

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("CogVideoX is a video model: sample through diffusers' CogVideoXPipeline with "
                         "pagkit.attach(pipe, ...)")
