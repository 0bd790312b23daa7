"""Any other module that holds diffusers ``Attention`` self-attention layers (e.g. a user's wrapper around a UNet).

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
    model_classes = ("any module with diffusers self-attention",)
    tested_against = "pagkit's own batched-vs-separate and prefix fallback tests"

    def matches(self, model):
        return any(is_self_attention(m) for m in model.modules())

    def sites(self, model):
        return [attention_site(n, m, downsampling=None) for n, m in model.named_modules() if is_self_attention(m)]
