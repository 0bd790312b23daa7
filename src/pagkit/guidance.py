"""Guidance terms, their schedules, and how branch predictions combine (the methods live in ``pagkit.methods``).

Scale conventions (the papers'):

* CFG:  ε̃ = ε_u + w·(ε_c − ε_u). ``scale`` is w, as diffusers' ``guidance_scale``: w = 1 is off.
* PAG:  ε̃ = ε + s·(ε − ε̂). ``scale`` is s of Ahn et al. (the official ADM code's g = s + 1); s = 0 is off.
* SEG:  ε̃ = ε + γ·(ε − ε_seg). ``scale`` is γ; 0 is off.
* SAG:  ε̃ = ε + s·(ε(x_t) − ε(x̃_t)). ``scale`` is s; 0 is off.
* SLG:  ε̃ = ε + s·(ε − ε_skip). ``scale`` is s, diffusers' ``skip_layer_guidance_scale``; 0 is off.
* STG:  ε̃ = ε + s·(ε − ε_ptb), video blocks skipped or their attention → identity. ``scale`` is the official
  ``stg_scale``; 0 is off.
* AutoGuidance: ε̃ = ε_weak + w·(ε − ε_weak) = ε + (w − 1)(ε − ε_weak), ε_weak from a weaker model under the
  same condition. ``scale`` is Karras' w; w = 1 is off.
* TPG:  ε̃ = ε + s·(ε − ε_tpg). ``scale`` is s, the official ``tpg_scale``; 0 is off.
* NAG:  ε_c itself, with attention outputs Z = αẐ + (1 − α)Z⁺, Z̃ = Z⁺ + φ(Z⁺ − Z⁻) capped at τ‖Z⁺‖₁.
  ``scale`` is φ of Chen et al. (the official ``nag_scale`` is φ + 1); 0 is off. Combines with CFG only.

With CFG, the perturbed branches use the condition c, so
ε̃ = ε_u + w(ε_c − ε_u) + Σ_k s_k(ε_c − ε̂_c,k), which is what diffusers' PAG pipelines compute.

Every term has a schedule: it acts on the steps whose progress i/N lies in
[start, stop) (SLG: in (start, stop), as diffusers' SD3 pipeline), with a scale that moves linearly
from ``scale`` to ``scale_end`` across that interval when ``scale_end`` is given. A term at its neutral
scale costs no forward work at that step.

Any term takes a combination rule, ``rule=APG(...)`` or ``rule=CFGZeroStar(...)``, which replaces its
difference (see ``pagkit.methods.rules``). This module re-exports them; each method's own module in ``pagkit.methods`` documents it.
"""
from .methods import (APG, CFG, METHODS, NAG, PAG, RULES, SAG, SEG, SLG, STG, TPG, AutoGuidance,  # noqa: F401
                      CFGZeroStar, ContrastTerm, GuidanceTerm, check_guidance, combine, rescale_guidance)
from .methods.base import _check_number  # noqa: F401

__all__ = ["CFG", "PAG", "SEG", "SAG", "SLG", "STG", "TPG", "NAG", "AutoGuidance", "METHODS", "APG", "CFGZeroStar",
           "RULES", "GuidanceTerm", "ContrastTerm", "check_guidance", "combine", "rescale_guidance"]
