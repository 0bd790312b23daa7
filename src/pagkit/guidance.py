"""Guidance terms, their schedules, and how branch predictions combine.

Scale conventions (the papers'):

* CFG:  ε̃ = ε_u + w·(ε_c − ε_u). ``scale`` is w, as diffusers' ``guidance_scale``: w = 1 is off.
* PAG:  ε̃ = ε + s·(ε − ε̂). ``scale`` is s of Ahn et al. (the official ADM code's g = s + 1); s = 0 is off.
* SEG:  ε̃ = ε + γ·(ε − ε_seg). ``scale`` is γ; 0 is off.
* SAG:  ε̃ = ε + s·(ε(x_t) − ε(x̃_t)). ``scale`` is s; 0 is off.

With CFG, the perturbed branches use the condition c, so
ε̃ = ε_u + w(ε_c − ε_u) + Σ_k s_k(ε_c − ε̂_c,k), which is what diffusers' PAG pipelines compute.

Every term has a schedule: it acts on the steps whose progress i/N lies in
[start, stop), with a scale that moves linearly from ``scale`` to ``scale_end``
across that interval when ``scale_end`` is given. A term at its neutral scale
costs no forward work at that step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .perturb import Perturbation, QueryBlur, make_perturbation


def _check_number(name: str, value, low: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


@dataclass
class GuidanceTerm:
    scale: float
    start: float = field(default=0.0, kw_only=True)
    """Fraction of the steps after which the term starts acting (0 = from the first step)."""
    stop: float = field(default=1.0, kw_only=True)
    """Fraction of the steps after which it stops (1 = until the last step)."""
    scale_end: float | None = field(default=None, kw_only=True)
    """If set, the scale moves linearly from ``scale`` at ``start`` to ``scale_end`` at ``stop``."""

    neutral = 0.0  # the scale at which the term changes nothing

    def __post_init__(self):
        name = type(self).__name__
        _check_number(f"{name} scale", self.scale)
        if self.scale_end is not None:
            _check_number(f"{name} scale_end", self.scale_end)
        _check_number(f"{name} start", self.start)
        _check_number(f"{name} stop", self.stop)
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ValueError(f"{name} interval must satisfy 0 <= start < stop <= 1, got start={self.start}, "
                             f"stop={self.stop}")

    def scale_at(self, progress: float) -> float:
        """The scale at ``progress`` = step index ÷ number of steps."""
        if not self.start <= progress < self.stop:
            return self.neutral
        if self.scale_end is None:
            return float(self.scale)
        f = (progress - self.start) / (self.stop - self.start)
        return float(self.scale + (self.scale_end - self.scale) * f)

    def active(self, progress: float) -> bool:
        return self.scale_at(progress) != self.neutral


@dataclass
class CFG(GuidanceTerm):
    """Classifier-free guidance (Ho & Salimans 2022). ``scale`` = w; the unconditional branch uses the null condition."""

    scale: float = 7.5
    neutral = 1.0


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


@dataclass
class SEG(GuidanceTerm):
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


@dataclass
class SAG(GuidanceTerm):
    """Self-Attention Guidance (Hong et al. 2022).

    The mask is where the attention received at ``layer`` (mean over heads, summed over
    queries) is above its mean; x̂₀ is blurred there (Gaussian ``blur_sigma``,
    ``kernel_size``), re-noised to t with the same ε, and run again: one extra pass.
    Defaults are diffusers' StableDiffusionSAGPipeline's (scale 0.75, kernel 9, σ 1).
    """

    scale: float = 0.75
    layer: str = "mid"
    blur_sigma: float = 1.0
    kernel_size: int = 9

    def __post_init__(self):
        super().__post_init__()
        _check_number("SAG blur_sigma", self.blur_sigma)
        if self.blur_sigma <= 0:
            raise ValueError(f"SAG blur_sigma must be > 0, got {self.blur_sigma}")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"SAG kernel_size must be a positive odd integer, got {self.kernel_size!r}")


def check_guidance(guidance) -> list[GuidanceTerm]:
    """Normalise the user's guidance argument to a list of terms, with clear errors."""
    if guidance is None:
        return []
    if isinstance(guidance, GuidanceTerm):
        guidance = [guidance]
    terms = list(guidance)
    for term in terms:
        if not isinstance(term, GuidanceTerm):
            raise TypeError(f"guidance terms must be pagkit.CFG, PAG, SEG or SAG, got {term!r}")
    if sum(isinstance(t, CFG) for t in terms) > 1:
        raise ValueError("at most one CFG term")
    if sum(isinstance(t, SAG) for t in terms) > 1:
        raise ValueError("at most one SAG term")
    return terms


def rescale_guidance(guided: torch.Tensor, reference: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): pull the guided std back towards the reference's."""
    if guidance_rescale == 0.0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def combine(predictions: dict[str, torch.Tensor], scales: dict[str, float], cfg_scale: float | None) -> torch.Tensor:
    """ε̃ = [ε_u + w(ε_c − ε_u) | ε_c] + Σ_k s_k(ε_c − ε̂_k).

    ``predictions`` holds ``"cond"``, optionally ``"uncond"``, and one entry per
    perturbed branch named as in ``scales``.
    """
    cond = predictions["cond"]
    out = cond if cfg_scale is None else predictions["uncond"] + cfg_scale * (cond - predictions["uncond"])
    for name, s in scales.items():
        out = out + s * (cond - predictions[name])
    return out
