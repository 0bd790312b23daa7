"""Guidance methods, one module each: the term users construct, the branches it needs, its contribution to ε̃.

=========  ==========================================  =====================================================
method     formula                                     scale convention
=========  ==========================================  =====================================================
``CFG``    ε_u + w(ε_c − ε_u)                          w, diffusers' ``guidance_scale``; 1 is off
``PAG``    + s(ε_c − ε̂_c), attention → identity        the paper's s (ADM code's g = s + 1); 0 is off
``SEG``    + γ(ε_c − ε_seg), queries blurred           γ; 0 is off
``SAG``    + s(ε(x_t) − ε(x̃_t)), an extra pass          s; 0 is off
``SLG``    + s(ε_c − ε_skip), blocks skipped           s, diffusers' ``skip_layer_guidance_scale``; 0 is off
``NAG``    ε_c with attention Z = αẐ + (1−α)Z⁺,          φ of the paper (official ``nag_scale`` = φ + 1); 0 is
           Z̃ = Z⁺ + φ(Z⁺ − Z⁻) capped at τ‖Z⁺‖₁ as Ẑ     off
=========  ==========================================  =====================================================

``METHODS`` names them as the command line and the evaluation do. A new method is one module here with a
``GuidanceTerm`` subclass whose ``bind`` returns a ``base.Bound`` (see base.py), and one entry in ``METHODS``.
"""
from .base import Bound, Branch, Context, Contrast, GuidanceTerm, Step, check_guidance, combine, rescale_guidance
from .cfg import CFG
from .nag import NAG
from .pag import PAG
from .sag import SAG, NoiseSchedule
from .seg import SEG
from .slg import SLG

METHODS: dict[str, type[GuidanceTerm]] = {"cfg": CFG, "pag": PAG, "seg": SEG, "sag": SAG, "slg": SLG, "nag": NAG}

__all__ = ["METHODS", "CFG", "PAG", "SEG", "SAG", "SLG", "NAG", "GuidanceTerm", "Bound", "Branch", "Context", "Contrast",
           "Step", "NoiseSchedule", "check_guidance", "combine", "rescale_guidance"]
