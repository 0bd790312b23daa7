"""Sana / Sana 1.5: ``SanaTransformer2DModel``: linear self-attention plus cross-attention.

Sites are ``transformer_blocks.N.attn1``: image tokens only, **self**, grid = input H×W ÷ patch
size. ``attn2`` is cross-attention to the caption and never a site. ``attn1`` runs
``SanaLinearAttnProcessor2_0``, ReLU-kernel linear attention with no softmax and no
scaled-dot-product call, so the site carries an ``attention`` adapter: q, k, v exactly as the
processor builds them (Sana 1.5's ``norm_q``/``norm_k`` included; before the ReLU feature map)
and ``finish`` doing the rest (output projection, dropout, the fp16 clip). Untouched rows run
the module itself.

What a perturbation means here (``attend_linear``). Write φ = ReLU; the processor computes
``out_i = Σ_j (φ(q_i)·φ(k_j)) v_j / Σ_j φ(q_i)·φ(k_j)``, an attention map whose unnormalised
entries are φ(q_i)·φ(k_j):

* ``identity`` (PAG): the map is the identity, so the output is V (diffusers'
  ``PAGIdentitySanaLinearAttnProcessor2_0`` does the same: ``to_v`` then ``to_out``);
* SoftPAG / chosen heads (``SoftIdentity``): the normalised map is row-stochastic, so
  A' = (1 − α)A + αI is as well defined as for softmax: (1 − α)·(linear attention) + α·V per chosen head;
* ``blur`` (SEG): the unnormalised map is blurred along the query axes by a Gaussian over the
  H×W grid, which is blurring the query features φ(Q) (the map is linear in them, as softmax
  logits are linear in Q), then each row is normalised as the processor does. The queries are
  blurred *after* the ReLU: blurring Q before it is not a blur of the map;
* ``uniform`` (σ = ∞): every query feature is the mean φ(q), so every token gets the same
  weights, hence the same output;
* ``mask`` and ``noise`` act on softmax logits, which linear attention does not have: refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..perturb import Identity, QueryBlur, SoftIdentity
from . import Backend, Site, register


def linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sana's linear attention on (B, H, S, d) kernel features, as ``SanaLinearAttnProcessor2_0`` computes it
    (in float32, with its padded-value normaliser and 1e-15)."""
    value = F.pad(v.float().transpose(2, 3), (0, 0, 0, 1), mode="constant", value=1.0)  # (B, H, d + 1, S)
    out = value @ phi_k.float() @ phi_q.float().transpose(2, 3)  # (B, H, d + 1, S)
    return (out[:, :, :-1] / (out[:, :, -1:] + 1e-15)).transpose(2, 3)


def attend_linear(perturbation, q, k, v, layout):
    """A perturbation of ReLU-kernel linear attention on (B, H, S, d) pre-kernel q, k and v (module docstring)."""
    if isinstance(perturbation, Identity):
        return v
    if isinstance(perturbation, SoftIdentity):
        return perturbation.mix(linear_attention(F.relu(q), F.relu(k), v).to(v.dtype), v)
    if isinstance(perturbation, QueryBlur):
        phi_q = perturbation.blur_queries(F.relu(q).float(), layout.grid)
        return linear_attention(phi_q, F.relu(k), v).to(v.dtype)
    raise ValueError(f"Sana's attention is linear (ReLU kernel, no softmax logits), so the {type(perturbation).__name__} "
                     "perturbation has nothing to act on; PAG (identity) and SEG (blur, uniform) work on Sana")


def sana_qkv(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
    """q, k, v of ``SanaLinearAttnProcessor2_0`` (before its ReLU) as (B, H, S, d), and ``finish``."""
    dtype = hidden_states.dtype
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))

    def finish(out):
        out = out.transpose(1, 2).flatten(2).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.clip(-65504, 65504) if dtype == torch.float16 else out
    return q, k, v, finish


@register
class SanaBackend(Backend):
    name = "sana"
    model_classes = ("SanaTransformer2DModel",)
    tested_against = ("a reference linear-attention forward written in the tests; diffusers SanaPAGPipeline "
                      "(without QK-norm: with it diffusers skips norm_q/norm_k)")

    def sites(self, model):
        patch = int(model.config.patch_size or 1)
        return [Site(f"transformer_blocks.{i}.attn1", "self", b.attn1.heads, b.attn1.to_q.in_features, patch,
                     attention=sana_qkv, attend=attend_linear) for i, b in enumerate(model.transformer_blocks)]

    def stages(self, model):
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
