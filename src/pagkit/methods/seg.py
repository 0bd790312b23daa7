"""SEG, smoothed energy guidance (Hong, NeurIPS 2024, arXiv 2408.00760).

The perturbed branch blurs the queries of the chosen sites with a Gaussian of width σ over the real token
grid (kernel ceil(6σ)+1, forced odd; σ = ∞, or the official code's σ > 9999, gives the mean query, i.e.
uniform attention); ε̃ = ε + γ·(ε − ε_seg). ``scale`` is γ (0 = off). Reference: SusungHong/SEG-SDXL.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..perturb import Perturbation, QueryBlur
from .base import ContrastTerm
from .pag import attention_contrast


@dataclass
class SEG(ContrastTerm):
    """Smoothed Energy Guidance (Hong 2024): blur the queries of ``layers`` with a Gaussian of width ``sigma``.

    ``sigma=float("inf")`` (or anything above 9999) replaces every query by the mean query. On video sites the
    blur is 3-D over F×H×W; ``per_frame=True`` blurs within each frame only.
    """

    scale: float = 3.0
    sigma: float = float("inf")
    layers: str | list[str] = "mid"
    per_frame: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.make_perturbation()

    def make_perturbation(self) -> Perturbation:
        return QueryBlur(sigma=self.sigma, per_frame=self.per_frame)

    def bind(self, key, context):
        return attention_contrast(self, key, context)
