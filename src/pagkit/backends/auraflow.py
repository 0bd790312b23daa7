"""AuraFlow: ``AuraFlowTransformer2DModel``: MMDiT blocks, then single-stream DiT blocks.

``joint_transformer_blocks.N.attn`` are **joint** sites: one softmax over
**[register + text; image]** (8 learned register tokens are prepended to the text), separate
projections, fp32 LayerNorm QK-norm on both streams, no RoPE. ``single_transformer_blocks.N.attn``
are **single**-stream sites: the model concatenates [register + text; image] before the block, and
the block's ``Attention`` is a plain self-attention module, so read as one (as the generic backend
would) it would make every text token output its own value; here its image tokens are the last
H×W ÷ patch² positions. Grid = input H×W ÷ patch size.
"""
from __future__ import annotations

from . import Backend, Site, register


@register
class AuraFlowBackend(Backend):
    name = "auraflow"
    model_classes = ("AuraFlowTransformer2DModel",)
    timestep_divisor = 1000.0  # AuraFlowPipeline calls the transformer with t / 1000
    tested_against = "a reference joint/single-stream forward with an explicit mask"

    def sites(self, model):
        patch = int(model.config.patch_size)

        def site(name, attn, kind):
            return Site(name, kind, attn.heads, attn.to_q.in_features, patch, image_first=False)
        return ([site(f"joint_transformer_blocks.{i}.attn", b.attn, "joint")
                 for i, b in enumerate(model.joint_transformer_blocks)]
                + [site(f"single_transformer_blocks.{i}.attn", b.attn, "single")
                   for i, b in enumerate(model.single_transformer_blocks)])

    def stages(self, model):
        return (["pos_embed"] + [f"joint_transformer_blocks.{i}" for i in range(len(model.joint_transformer_blocks))]
                + [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))])

    def learned_sigma(self, model):
        return False
