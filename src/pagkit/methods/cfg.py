"""CFG, classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598).

ε̃ = ε(x_t, ∅) + w·(ε(x_t, c) − ε(x_t, ∅)). ``scale`` is w, as diffusers' ``guidance_scale``: w = 1 is off.
Reference: diffusers' pipelines (``noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)``).

With a combination rule (``rule=``, see pagkit.methods.rules) CFG is written ε_c + (w − 1)·Δ' with
Δ' the rule's modified Δ = ε_c − ε_u (APG's paper form; CFG-Zero*'s s*·ε_u + w(ε_c − s*·ε_u)).

CFG is the base of ε̃: the denoiser runs the unconditional branch while it is active, and the other methods'
contributions are added to ε_u + w(ε_c − ε_u). Inside a diffusers pipeline (``pagkit.attach``) the pipeline's
own CFG plays this part instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Bound, GuidanceTerm


@dataclass
class CFG(GuidanceTerm):
    """Classifier-free guidance (Ho & Salimans 2022). ``scale`` = w; the unconditional branch uses the null condition.

    ``rule``: a combination rule for ε_c − ε_u (``pagkit.APG``, ``pagkit.CFGZeroStar``), or None.
    """

    scale: float = 7.5
    neutral = 1.0
    unique = True

    def bind(self, key, context):
        return BoundCFG(self, key)


class BoundCFG(Bound):
    base = True

    def combine(self, scale: float, step):
        """ε_u + w(ε_c − ε_u); with a rule, ε_c + (w − 1)·Δ' (Δ' the rule's, of Δ = ε_c − ε_u)."""
        eps = step.eps
        if not self.rule_acts:
            return eps["uncond"] + scale * (eps["cond"] - eps["uncond"])
        return eps["cond"] + self.scaled_difference(scale - 1.0, eps["cond"], eps["uncond"], step)
