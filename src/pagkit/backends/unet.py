"""UNets: diffusers ``UNet2DModel`` and ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL, Kolors, ControlNet pipelines).

Sites are the image self-attention layers (``attn1`` of each transformer block, or the
``Attention`` of UNet2DModel's attention blocks); cross-attention (``attn2``) is never a site, but is listed
as ``cross_sites`` (kind ``cross``) for NAG.
The token grid of a site is the input's H×W divided by the samplers before it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

from . import Backend, Site, register


def is_self_attention(module: nn.Module) -> bool:
    """A diffusers ``Attention`` over image tokens only (no cross-attention, no added text projections)."""
    return isinstance(module, Attention) and not module.is_cross_attention and not module.only_cross_attention \
        and getattr(module, "added_kv_proj_dim", None) is None


def attention_site(name: str, module: Attention, kind: str = "self", downsampling: int | None = 1,
                   image_first: bool = True) -> Site:
    return Site(name, kind, module.heads, module.to_q.in_features, downsampling, image_first)


@register
class UNetBackend(Backend):
    name = "unet"
    model_classes = ("UNet2DModel", "UNet2DConditionModel")
    input_name = "sample"
    tested_against = ("diffusers' SD, SDXL and Kolors PAG pipelines (txt2img, img2img, inpaint), ControlNet SD "
                      "(+ inpaint) and SDXL (+ img2img) PAG pipelines, the SAG pipeline")

    def _factors(self, model) -> dict[str, int]:
        factors, f = {}, 1
        for i, block in enumerate(model.down_blocks):
            factors[f"down_blocks.{i}."] = f
            if getattr(block, "downsamplers", None) is not None:
                f *= 2
        factors["mid_block."] = f
        for i, block in enumerate(model.up_blocks):
            factors[f"up_blocks.{i}."] = f
            if getattr(block, "upsamplers", None) is not None:
                f //= 2
        return factors

    def sites(self, model):
        return self._attention_sites(model, is_self_attention, "self")

    def cross_sites(self, model):
        """The text cross-attention layers (``attn2`` of each transformer block)."""
        return self._attention_sites(model, lambda m: isinstance(m, Attention) and m.is_cross_attention, "cross")

    def _attention_sites(self, model, select, kind):
        factors = self._factors(model)
        rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # UNets register up_blocks before mid_block
        found = [(n, m) for n, m in model.named_modules() if select(m)]
        found.sort(key=lambda item: rank.get(item[0].split(".")[0], 0))
        return [attention_site(n, m, kind, downsampling=factors[max((p for p in factors if n.startswith(p)), key=len)])
                for n, m in found]

    def stages(self, model):
        names = ["conv_in"] + [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
        if getattr(model, "mid_block", None) is not None:
            names.append("mid_block")
        return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]

    def skip_blocks(self, model):
        """The attention blocks that hold the sites (``down_blocks.i.attentions.j``, ``mid_block.attentions.0``,
        ``up_blocks.i.attentions.j``): a Transformer2DModel with its residual, or UNet2DModel's Attention block.
        Down, mid and up blocks as a whole change resolution or take skip connections, so they are not skipped."""
        out = []
        for site in self.sites(model):
            parts = site.name.split(".")
            i = parts.index("attentions") if "attentions" in parts else None
            if i is not None and i + 1 < len(parts):
                out.append(".".join(parts[:i + 2]))
        return list(dict.fromkeys(out))

    def token_blocks(self, model):
        """TPG's blocks, as the official code (TaatiTeam/Token-Perturbation-Guidance): each ``BasicTransformerBlock``
        that holds a self-attention site (``….attentions.j.transformer_blocks.k``, whose input is the (B, H·W, C)
        tokens after the Transformer2DModel's norm and proj_in); on ``UNet2DModel`` the ``Attention`` block itself
        (input (B, C, H, W))."""
        out = []
        for site in self.sites(model):
            parent = site.name.rpartition(".")[0]
            holder = model.get_submodule(parent) if parent else None
            out.append(parent if isinstance(holder, BasicTransformerBlock) else site.name)
        return list(dict.fromkeys(out))

    def skip_output(self, module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        if torch.is_tensor(out):
            return x
        if isinstance(out, tuple):
            return (x,) + tuple(out[1:])
        return type(out)(sample=x)
