"""LTX-2: ``LTX2VideoTransformer3DModel`` (joint audio-video generation, two streams in every block).

Each ``transformer_blocks.N`` (``LTX2VideoTransformerBlock``) holds six attention layers, all
``LTX2Attention`` with the model's own processor (RMS QK-norm across heads, then RoPE, then
``dispatch_attention_fn``), read off the block's forward:

* ``attn1``: **video self-attention**, a **spatiotemporal** site over the F×H×W video tokens (packed
  frame-major, as LTX-Video; grid from ``num_frames``, ``height``, ``width`` ÷ the patch sizes).
* ``audio_attn1``: **audio self-attention** over the audio tokens (one per latent audio frame), a site of kind
  **temporal** (attention along time only; its grid is T_a × 1 × 1, read off its sequence). A bare block alias
  (``blocks.3``) never selects it, as it never selects AnimateDiff's temporal attention: name it
  (``transformer_blocks.3.audio_attn1``), glob it, or ask ``kind="temporal"``. STG given block indices
  (``STG(layers=[3], mode="attention")``) takes every site of the block, video and audio: that is what the
  model's own STG (``spatio_temporal_guidance_blocks``, ``LTX2PerturbedAttnProcessor``) perturbs.
* ``attn2``: video → text cross-attention, never a site; listed in ``cross_sites`` (kind ``cross``) for NAG.
* ``audio_attn2`` (audio → text), ``audio_to_video_attn`` (video queries, audio keys) and
  ``video_to_audio_attn`` (audio queries, video keys): cross-modal or text cross-attention, never sites.

The model returns (video, audio); ``call`` gives the video prediction (``GuidedDenoiser`` on the bare model guides
the video stream). ``pagkit.attach`` on LTX2Pipeline guides both streams: it packs them into one tensor per row
for the denoiser and divides each by its own factor in the pipeline's combination (pipelines.py). All
rotary tables are built per sample from ``video_coords``/``audio_coords``, so prefix sharing slices them with
the rows; nothing is shared. A skipped block (STG-R, SLG) returns its video and audio inputs.
"""
from __future__ import annotations

import inspect

from ..perturb import TokenLayout
from . import Site, register
from .ltx import LTXVideoBackend


@register
class LTX2VideoBackend(LTXVideoBackend):
    """LTX-Video's stages and grid, with the audio stream's self-attention as temporal sites beside the video's."""

    name = "ltx2"
    model_classes = ("LTX2VideoTransformer3DModel",)
    shared_inputs = frozenset()
    tested_against = ("a reference forward computing the perturbed attention explicitly at the model's attention "
                      "call (video and audio self-attention); the model's own STG (spatio_temporal_guidance_blocks)")

    def sites(self, model):
        patch = int(model.config.patch_size)
        out = []
        for i, b in enumerate(model.transformer_blocks):
            out.append(Site(f"transformer_blocks.{i}.attn1", "spatiotemporal", b.attn1.heads,
                            b.attn1.to_q.in_features, patch))
            out.append(Site(f"transformer_blocks.{i}.audio_attn1", "temporal", b.audio_attn1.heads,
                            b.audio_attn1.to_q.in_features, None))
        return out

    def cross_sites(self, model):
        patch = int(model.config.patch_size)
        return [Site(f"transformer_blocks.{i}.attn2", "cross", b.attn2.heads, b.attn2.to_q.in_features, patch)
                for i, b in enumerate(model.transformer_blocks)]

    def layout(self, site, seq_len, info):
        if site.name.endswith(".audio_attn1"):  # audio tokens: one sequence along time
            return TokenLayout.self_attention(seq_len, (seq_len, 1, 1))
        return super().layout(site, seq_len, info)

    def skip_output(self, module, args, kwargs, out):
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
        return bound["hidden_states"], bound["audio_hidden_states"]

    def sample_shape(self, model, batch_size, height, width):
        raise ValueError("LTX-2 takes packed video and audio latents: sample through diffusers' LTX2Pipeline")
