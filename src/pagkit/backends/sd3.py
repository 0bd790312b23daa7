"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` (MMDiT).

Each block's ``attn`` is a **joint** site: one softmax over [image; text] with separate
projections; SD3.5 adds per-head RMS QK-norm (``norm_q``, ``norm_k``, ``norm_added_q``,
``norm_added_k``), which the model's own processor applies before pagkit's perturbation
sees q and k (diffusers' own SD3 PAG processors skip it). SD3.5's dual-attention blocks
add ``attn2``, a plain image **self** site. Grid = input H×W ÷ patch size.
"""
from __future__ import annotations

import inspect

from . import Backend, register
from .unet import attention_site


@register
class SD3Backend(Backend):
    name = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    tested_against = ("diffusers StableDiffusion3(Img2Img)PAGPipeline (SD3 without QK-norm); a reference joint "
                      "forward with an explicit mask and StableDiffusion3Pipeline against a hand reference (SD3.5)")

    def sites(self, model):
        patch = int(model.config.patch_size)
        out = []
        for i, block in enumerate(model.transformer_blocks):
            out.append(attention_site(f"transformer_blocks.{i}.attn", block.attn, "joint", patch, image_first=True))
            if getattr(block, "attn2", None) is not None:
                out.append(attention_site(f"transformer_blocks.{i}.attn2", block.attn2, "self", patch))
        return out

    def stages(self, model):
        return ["pos_embed"] + [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def skip_output(self, module, args, kwargs, out):
        """A skipped joint block returns (encoder_hidden_states, hidden_states) as they came in, as diffusers'
        ``skip_layers`` leaves both streams; the last block's text output stays None."""
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
        return (None if out[0] is None else bound["encoder_hidden_states"], bound["hidden_states"])
