"""PAG, perturbed-attention guidance (Ahn et al., ECCV 2024, arXiv 2403.17377).

ε̂ is the same network with the self-attention map softmax(QKᵀ/√d) of the chosen sites replaced by the
identity (the output is V); ε̃ = ε + s·(ε − ε̂), and with CFG ε̃ = ε_u + w(ε_c − ε_u) + s(ε_c − ε̂_c).
``scale`` is the paper's s (0 = off); the official ADM code's ``guidance_scale`` g is s + 1
(its ε̃ = ε̂ + g(ε − ε̂)). References: KU-CVLAB/Perturbed-Attention-Guidance (ADM) and diffusers'
``PAGIdentitySelfAttnProcessor2_0`` / ``*PAGPipeline``.

Branch: one copy of the conditional rows, with the perturbation at every chosen site (routing.py, at the
SDPA call inside the site's own processor).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..layers import resolve_layers
from ..perturb import Perturbation, make_perturbation
from .base import Contrast, GuidanceTerm


@dataclass
class PAG(GuidanceTerm):
    """Perturbed-Attention Guidance (Ahn et al. 2024).

    ``layers``: self-attention layers to perturb (names, globs or aliases; see ``pagkit.layers``).
    ``perturbation``: ``"identity"`` (the paper's), or the ablations ``"uniform"``, ``"mask"``, ``"noise"``.
    ``mask_prob`` / ``noise_std``: the strength of the ``"mask"`` / ``"noise"`` ablations; ``seed`` their RNG.
    """

    scale: float = 3.0
    layers: str | list[str] = "mid"
    perturbation: str = "identity"
    mask_prob: float = 0.5
    noise_std: float = 1.0
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.make_perturbation()  # validates the name and options now, not mid-sampling

    def make_perturbation(self) -> Perturbation:
        options = {"mask": {"p": self.mask_prob, "seed": self.seed},
                   "noise": {"std": self.noise_std, "seed": self.seed}}.get(self.perturbation, {})
        if self.perturbation == "blur":
            raise ValueError("use pagkit.SEG(scale, sigma=...) for query blur")
        return make_perturbation(self.perturbation, **options)

    def bind(self, key, context):
        return attention_contrast(self, key, context)


def attention_contrast(term, key: str, context, layers=None, contrast=Contrast) -> Contrast:
    """A contrast branch with ``term.make_perturbation()`` at the sites ``layers`` (default ``term.layers``)
    selects, of kind ``term.kind`` where the term has one; the perturbation is built once per bound term, so the
    random ablations keep one RNG stream each. ``contrast``: the ``Contrast`` class to bind (STG's rescales)."""
    sites = resolve_layers(context.model, term.layers if layers is None else layers, kind=getattr(term, "kind", None))
    perturbation = term.make_perturbation()
    return contrast(term, key, {name: perturbation for name in sites})
