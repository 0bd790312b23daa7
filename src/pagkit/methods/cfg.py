"""CFG, classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598).

ε̃ = ε(x_t, ∅) + w·(ε(x_t, c) − ε(x_t, ∅)). ``scale`` is w, as diffusers' ``guidance_scale``: w = 1 is off.
Reference: diffusers' pipelines (``noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)``).

CFG is the base of ε̃: the denoiser runs the unconditional branch while it is active, and the other methods'
contributions are added to ε_u + w(ε_c − ε_u). Inside a diffusers pipeline (``pagkit.attach``) the pipeline's
own CFG plays this part instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Bound, GuidanceTerm


@dataclass
class CFG(GuidanceTerm):
    """Classifier-free guidance (Ho & Salimans 2022). ``scale`` = w; the unconditional branch uses the null condition."""

    scale: float = 7.5
    neutral = 1.0
    unique = True

    def bind(self, key, context):
        return BoundCFG(self, key)


class BoundCFG(Bound):
    base = True

    @staticmethod
    def combine(scale: float, eps: dict):
        """ε_u + w(ε_c − ε_u)."""
        return eps["uncond"] + scale * (eps["cond"] - eps["uncond"])
