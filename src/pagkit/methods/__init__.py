"""Guidance methods, one module each: the term users construct, the branches it needs, its contribution to ε̃.

=========  ==========================================  =====================================================
method     formula                                     scale convention
=========  ==========================================  =====================================================
``CFG``    ε_u + w(ε_c − ε_u)                          w, diffusers' ``guidance_scale``; 1 is off
``PAG``    + s(ε_c − ε̂_c), attention → identity        the paper's s (ADM code's g = s + 1); 0 is off
           (SoftPAG: A' = (1 − α)A + αI on ``heads``)   α = ``strength`` in [0, 1], 1 = PAG
``SEG``    + γ(ε_c − ε_seg), queries blurred           γ; 0 is off
``SAG``    + s(ε(x_t) − ε(x̃_t)), an extra pass          s; 0 is off
``SLG``    + s(ε_c − ε_skip), blocks skipped           s, diffusers' ``skip_layer_guidance_scale``; 0 is off
``STG``    + s(ε_c − ε_ptb), video blocks skipped      s, the official ``stg_scale``; 0 is off
           (STG-R) or their attention → identity
           (STG-A); optional std rescale
``AutoG``  + (w − 1)(ε_c − ε_weak), a weaker model      Karras' w (ε_weak + w(ε − ε_weak)); 1 is off
``TPG``    + s(ε_c − ε_tpg), block tokens shuffled     s, the official ``tpg_scale``; 0 is off
``NAG``    ε_c with attention Z = αẐ + (1−α)Z⁺,          φ of the paper (official ``nag_scale`` = φ + 1); 0 is
           Z̃ = Z⁺ + φ(Z⁺ − Z⁻) capped at τ‖Z⁺‖₁ as Ẑ     off
=========  ==========================================  =====================================================

``AutoG`` is ``AutoGuidance`` (Karras et al. 2024): ε_weak is a weaker model's, under the condition c, in a
pass of its own.

Combination rules (``rules.py``; ``rule=`` on any term; ``RULES`` names them) replace a term's difference
Δ = D_pos − D_neg in its contribution k·Δ (CFG: k = w − 1, ε_c + (w − 1)(ε_c − ε_u); the others: k = s):

=================  ================================================  ==========================================
rule               Δ'                                                neutral
=================  ================================================  ==========================================
``APG``            momentum β, cap r on ‖Δ‖, Δ⊥ + ηΔ∥ relative to D_pos   η = 1, r = None, β = 0
``CFGZeroStar``    D_pos − s*·D_neg, s* = ⟨D_pos, D_neg⟩/‖D_neg‖²; ε̃ = 0  ``optimized_scale=False, zero_init_steps=0``
                   on the first ``zero_init_steps``
=================  ================================================  ==========================================

Cheaper variants (``base.ContrastTerm``; options of PAG, SEG, SLG, STG and TPG, issue 19):

================  ==========================================  =============================================
option            ε̃                                           cost
================  ==========================================  =============================================
``cache=k``       D = ε_c − ε̂ computed every k-th active      the perturbed rows on 1 step in k
``cache_mode=``   step; s_i·D̃ in between, D̃ the last D
                  (``"reuse"``) or the line through the last
                  two (``"extrapolate"``)
``fold=True``     ε̂_u + w(ε_c − ε̂_u): CFG's uncond rows        CFG's two rows; the term's scale only switches
                  perturbed (needs ``CFG``)                    it (≠ 0 on, 0 off), the strength is CFG's w
================  ==========================================  =============================================

``METHODS`` names them as the command line and the evaluation do. A new method is one module here with a
``GuidanceTerm`` subclass whose ``bind`` returns a ``base.Bound`` (see base.py), and one entry in ``METHODS``;
its text form (``pagkit sample --guidance "pag:1,layers=mid"``, ``pagkit eval --methods … --options …``) is
read off its dataclass fields by ``pagkit.spec``, so the command line needs no change.
"""
from .base import Bound, Branch, Context, Contrast, ContrastTerm, GuidanceTerm, Step, check_guidance, combine, rescale_guidance
from .autoguidance import AutoGuidance
from .cfg import CFG
from .rules import APG, RULES, CFGZeroStar, Rule
from .nag import NAG
from .pag import PAG
from .sag import SAG, NoiseSchedule
from .seg import SEG
from .slg import SLG
from .stg import STG
from .tpg import TPG

METHODS: dict[str, type[GuidanceTerm]] = {"cfg": CFG, "pag": PAG, "seg": SEG, "sag": SAG, "slg": SLG, "stg": STG,
                                      "tpg": TPG, "nag": NAG, "autoguidance": AutoGuidance}

__all__ = ["METHODS", "CFG", "PAG", "SEG", "SAG", "SLG", "STG", "TPG", "NAG", "AutoGuidance", "RULES", "APG",
           "CFGZeroStar", "Rule", "GuidanceTerm", "ContrastTerm", "Bound", "Branch", "Context", "Contrast", "Step", "NoiseSchedule",
           "check_guidance", "combine", "rescale_guidance"]
