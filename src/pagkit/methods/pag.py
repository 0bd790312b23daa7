"""PAG, perturbed-attention guidance (Ahn et al., ECCV 2024, arXiv 2403.17377), with SoftPAG and head-level PAG
(Ahn et al. 2025, "HeadHunter", arXiv 2506.10978).

ε̂ is the same network with the self-attention map softmax(QKᵀ/√d) of the chosen sites replaced by the
identity (the output is V); ε̃ = ε + s·(ε − ε̂), and with CFG ε̃ = ε_u + w(ε_c − ε_u) + s(ε_c − ε̂_c).
``scale`` is the paper's s (0 = off); the official ADM code's ``guidance_scale`` g is s + 1
(its ε̃ = ε̂ + g(ε − ε̂)). References: KU-CVLAB/Perturbed-Attention-Guidance (ADM) and diffusers'
``PAGIdentitySelfAttnProcessor2_0`` / ``*PAGPipeline``.

**SoftPAG and heads** (HeadHunter). The perturbed map of the chosen heads is A' = (1 − α)A + αI: ``strength``
is α (1, the default, is PAG; 0 leaves the map as it is, so the term is off, like scale 0), ``heads`` the heads it acts on (None, the default: all).
As the output is linear in the map, each chosen head's output is (1 − α)·O + α·O_I (``perturb.SoftIdentity``);
on joint sites O_I follows pagkit's joint convention (image queries attend only to themselves among image tokens
and still to the text). HeadHunter's official code (cvlab-kaist/HeadHunter, ``perturb_heads`` and
``attention_identity@scale=u``, README at commit 3828d1c) uses the same interpolation
A_final = (1 − u)A + uA'; its SD3 ``attention_identity`` replaces the whole joint map by I, which differs from
pagkit's joint convention on the text queries and the image queries' attention to text.

Branch: one copy of the conditional rows, with the perturbation at every chosen site (routing.py, at the
SDPA call inside the site's own processor).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..layers import resolve_layers
from ..perturb import Perturbation, SoftIdentity, make_perturbation
from .base import Contrast, ContrastTerm, _check_number


@dataclass
class PAG(ContrastTerm):
    """Perturbed-Attention Guidance (Ahn et al. 2024), optionally soft and on chosen heads (HeadHunter, 2025).

    ``layers``: self-attention layers to perturb (names, globs or aliases; see ``pagkit.layers``).
    ``perturbation``: ``"identity"`` (the paper's), or the ablations ``"uniform"``, ``"mask"``, ``"noise"``.
    ``mask_prob`` / ``noise_std``: the strength of the ``"mask"`` / ``"noise"`` ablations; ``seed`` their RNG.
    ``heads``: the heads of each chosen site whose map is perturbed: a list of head indices used at every site
    of ``layers``, or a dict {layer selection: [head indices]} (HeadHunter's per-site head sets), whose keys then
    say which sites are perturbed (leave ``layers`` at its default); None = every head. Indices are checked
    against each site's head count when the term is bound to a model.
    ``strength``: SoftPAG's α in A' = (1 − α)A + αI, in [0, 1]; 1 = PAG. Identity perturbation only.
    """

    scale: float = 3.0
    layers: str | list[str] = "mid"
    perturbation: str = "identity"
    mask_prob: float = 0.5
    noise_std: float = 1.0
    seed: int = 0
    heads: list[int] | dict[str, list[int]] | None = None
    strength: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check_number("PAG strength", self.strength)
        if isinstance(self.heads, dict):
            if not self.heads:
                raise ValueError("PAG heads: an empty dict selects no site; give {layer: [heads]} or None")
            if self.layers != "mid":
                raise ValueError("PAG: heads given per site (a dict {layer: [heads]}) already say which sites are "
                                 f"perturbed; leave layers at its default (got layers={self.layers!r})")
            for where, heads in self.heads.items():
                if not isinstance(where, str) or not where.strip():
                    raise ValueError(f"PAG heads: the keys are layer selections (non-empty strings), got {where!r}")
                self.make_perturbation(heads)
        self.make_perturbation()  # validates the name and options now, not mid-sampling

    def active(self, progress: float) -> bool:
        """At strength α = 0 the perturbed map is A itself: the branch would equal ε_c, so it is not run (bit-identical
        to no PAG, at no cost)."""
        return self.strength != 0.0 and super().active(progress)

    def make_perturbation(self, heads=None) -> Perturbation:
        """The perturbation of one site; ``heads``: its head indices (default: ``self.heads`` if a list)."""
        if heads is None and not isinstance(self.heads, dict):
            heads = self.heads
        if heads is not None and (isinstance(heads, (str, int)) or not hasattr(heads, "__iter__")):
            raise ValueError(f"PAG heads must be a list of head indices, a dict {{layer: [heads]}} or None, "
                             f"got {heads!r}")
        soft = heads is not None or self.strength != 1.0
        if soft and self.perturbation != "identity":
            raise ValueError(f"PAG heads and strength (SoftPAG) act on the identity perturbation only, not on "
                             f"{self.perturbation!r}")
        if soft:
            return SoftIdentity(strength=self.strength, heads=None if heads is None else tuple(heads))
        options = {"mask": {"p": self.mask_prob, "seed": self.seed},
                   "noise": {"std": self.noise_std, "seed": self.seed}}.get(self.perturbation, {})
        if self.perturbation == "blur":
            raise ValueError("use pagkit.SEG(scale, sigma=...) for query blur")
        return make_perturbation(self.perturbation, **options)

    def bind(self, key, context):
        if self.heads is None:
            return attention_contrast(self, key, context)
        model = context.model
        if isinstance(self.heads, dict):
            chosen: dict[str, tuple[int, ...]] = {}
            for where, heads in self.heads.items():
                for name in resolve_layers(model, where):
                    if chosen.setdefault(name, tuple(heads)) != tuple(heads):
                        raise ValueError(f"PAG heads: site {name} is selected by two keys with different heads "
                                         f"({list(chosen[name])} and {list(heads)})")
        else:
            chosen = {name: tuple(self.heads) for name in resolve_layers(model, self.layers)}
        sites = {s.name: s for s in context.backend.sites(model)}
        for name, heads in chosen.items():
            count = sites[name].heads
            bad = [h for h in heads if count and h >= count]
            if bad:
                raise ValueError(f"PAG heads {bad} out of range at site {name}, which has {count} heads "
                                 f"(valid 0–{count - 1})")
        return Contrast(self, key, {name: self.make_perturbation(heads) for name, heads in chosen.items()})


def attention_contrast(term, key: str, context, layers=None, contrast=Contrast) -> Contrast:
    """A contrast branch with ``term.make_perturbation()`` at the sites ``layers`` (default ``term.layers``)
    selects, of kind ``term.kind`` where the term has one; the perturbation is built once per bound term, so the
    random ablations keep one RNG stream each. ``contrast``: the ``Contrast`` class to bind (STG's rescales)."""
    sites = resolve_layers(context.model, term.layers if layers is None else layers, kind=getattr(term, "kind", None))
    perturbation = term.make_perturbation()
    return contrast(term, key, {name: perturbation for name in sites})
