"""Image DiTs with self-attention plus cross-attention: DiT, PixArt-α/Σ, HunyuanDiT (2-D RoPE).

Sites are ``attn1`` of each block: image tokens only, grid = input H×W ÷ patch size.
HunyuanDiT's rotary table is passed to every block and is not per sample.
"""
from __future__ import annotations

import torch

from . import Backend, register
from .unet import attention_site, is_self_attention


@register
class Transformer2DBackend(Backend):
    name = "transformer2d"
    model_classes = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "HunyuanDiT2DModel",
                                      "Transformer2DModel")
    shared_inputs = frozenset({"image_rotary_emb"})
    tested_against = "diffusers PixArtSigmaPAGPipeline, HunyuanDiTPAGPipeline"

    def _blocks(self, model) -> str:
        return "blocks" if type(model).__name__ == "HunyuanDiT2DModel" else "transformer_blocks"

    def sites(self, model):
        patch = int(model.config.get("patch_size") or 1)
        return [attention_site(n, m, downsampling=patch) for n, m in model.named_modules() if is_self_attention(m)]

    def stages(self, model):
        blocks = self._blocks(model)
        return [f"{blocks}.{i}" for i in range(len(getattr(model, blocks)))]

    def call(self, forward, x, t, kwargs):
        # their timestep embeddings take one timestep per row (get_timestep_embedding asserts a 1-D tensor), which
        # their pipelines give by t.expand(batch); pagkit.sample's is the scheduler's 0-d one
        if torch.is_tensor(t) and t.ndim == 0:
            t = t.expand(x.shape[0])
        return super().call(forward, x, t, kwargs)
