"""A user's own module that holds diffusers ``Attention`` self-attention layers (e.g. a wrapper around a UNet).

Not for diffusers' own model classes: one without a backend (a VAE, a family not written yet) gets
``detect``'s error rather than a guess.

Sites are those layers, kind self; their grid is not known from the model, so SEG's blur
assumes a square grid (and says so when the token count is not a square). There is no
stage list, so prefix sharing falls back to the plain batched pass with one warning.
Tried last: a family with its own backend always wins.
"""
from __future__ import annotations

from . import Backend, register
from .unet import attention_site, is_self_attention


@register
class GenericBackend(Backend):
    name = "generic"
    model_classes = ("your own torch module around diffusers Attention layers",)
    tested_against = "pagkit's own batched-vs-separate and prefix fallback tests"

    def matches(self, model):
        from diffusers import ModelMixin
        return not isinstance(model, ModelMixin) and any(is_self_attention(m) for m in model.modules())

    def sites(self, model):
        return [attention_site(n, m, downsampling=None) for n, m in model.named_modules() if is_self_attention(m)]
