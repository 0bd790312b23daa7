"""HunyuanVideo 1.5: ``HunyuanVideo15Transformer3DModel``.

Only double-stream blocks (no single-stream ones): each ``transformer_blocks.N.attn`` is a **joint** site over
**[video; context]**, video first. Its processor (``HunyuanVideo15AttnProcessor2_0``) projects the video tokens
(``to_q/k/v``, per-head RMS QK-norm, then 3-D RoPE on them only) and the context tokens (``add_q/k/v_proj``,
their own norms) separately and concatenates ``[video, context]`` along the sequence; the output is split back
the same way. The context is the model's reordered [valid image; valid ByT5 text; valid MLLM text; padding]
tokens (image tokens are all padding for text-to-video), so its length is the text lengths plus the image
tokens, and its mask pads the video part with True: the model's own boolean mask hides the context padding
on every query (padding queries attend to nothing, which SDPA returns as 0); pagkit keeps it.
The token refiner (``context_embedder.token_refiner``) is self-attention over text only and is never a site.
Latents are (B, C, F, H, W); the grid is F/p_t × H/p × W/p. The rotary table (``freqs_cis`` in the blocks, a
(cos, sin) pair) is shared by every sample; the context mask and ``temb`` are per sample.
"""
from __future__ import annotations

from . import Site, register
from .hunyuan_video import HunyuanVideoBackend


@register
class HunyuanVideo15Backend(HunyuanVideoBackend):
    """HunyuanVideo's layout, call and sample shape, with double-stream blocks only."""

    name = "hunyuan_video15"
    model_classes = ("HunyuanVideo15Transformer3DModel",)
    pipeline = "HunyuanVideo15Pipeline"
    tested_against = ("a reference joint forward with an explicit mask (and an explicit SEG blur) at the model's "
                      "attention call, with the model's own context-padding mask")

    def sites(self, model):
        patch = int(model.config.patch_size)
        return [Site(f"transformer_blocks.{i}.attn", "joint", b.attn.heads, b.attn.to_q.in_features, patch,
                     image_first=True) for i, b in enumerate(model.transformer_blocks)]

    def stages(self, model):
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
