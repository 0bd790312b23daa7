"""CogView4: ``CogView4Transformer2DModel``.

Each ``transformer_blocks.N.attn1`` is a **joint** site: the block keeps a text and an image
stream (own modulation and norms), and its processor concatenates them as **[text; image]**
and projects them with one shared set of q/k/v weights, applies LayerNorm QK-norm (no affine)
over each head, then RoPE on the image tokens only. The text mask (``attention_mask``, per
sample) becomes a (S × S) mask there; the perturbation keeps it. Grid = input H×W ÷ patch size.
The rotary table, passed positionally to every block, is shared by every sample.
"""
from __future__ import annotations

from . import Backend, Site, register


@register
class CogView4Backend(Backend):
    name = "cogview4"
    model_classes = ("CogView4Transformer2DModel",)
    shared_inputs = frozenset({"image_rotary_emb"})
    tested_against = "a reference joint forward with an explicit mask (text padding mask kept)"

    def sites(self, model):
        patch = int(model.config.patch_size)
        return [Site(f"transformer_blocks.{i}.attn1", "joint", b.attn1.heads, b.attn1.to_q.in_features, patch,
                     image_first=False) for i, b in enumerate(model.transformer_blocks)]

    def stages(self, model):
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def learned_sigma(self, model):
        return False
