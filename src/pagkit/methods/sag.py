"""SAG, self-attention guidance (Hong et al., ICCV 2023, arXiv 2210.00939).

Read the attention each key receives at one site (mean over heads, summed over queries); where it is above
its mean, blur x̂₀ (Gaussian, diffusers: kernel 9, σ 1), re-noise it to t with the same ε and run the model
again on that x̃_t: ε̃ = ε + s·(ε(x_t) − ε(x̃_t)). ``scale`` is s (0 = off). The map and x̂₀ come from the
unconditional branch under CFG (as diffusers' ``StableDiffusionSAGPipeline``, the reference), else from the
conditional one.

Branches: none of its own in the batched forward, a capture of the attention map at its site on the
reference branch's rows; then one extra pass of its own (``order = 1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers import resolve_layers
from ..perturb import gaussian_blur
from .base import Bound, GuidanceTerm, _check_number


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
    unique = True
    needs_scheduler = True  # (a class attribute over GuidanceTerm's property: always)

    def __post_init__(self):
        super().__post_init__()
        _check_number("SAG blur_sigma", self.blur_sigma)
        if self.blur_sigma <= 0:
            raise ValueError(f"SAG blur_sigma must be > 0, got {self.blur_sigma}")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"SAG kernel_size must be a positive odd integer, got {self.kernel_size!r}")

    def bind(self, key, context):
        chosen = resolve_layers(context.model, self.layer)
        if len(chosen) != 1:
            raise ValueError(f"SAG reads one attention map; layer {self.layer!r} selects {len(chosen)}: "
                             f"{', '.join(chosen)}. Name one of them.")
        if context.scheduler is None:
            raise ValueError("SAG needs the scheduler (to predict x̂₀ and re-noise it); pass scheduler=...")
        return BoundSAG(self, key, chosen[0], NoiseSchedule(context.scheduler))


class BoundSAG(Bound):
    order = 1  # its extra pass runs after the batched forward

    def __init__(self, term: SAG, key: str, site: str, schedule: "NoiseSchedule"):
        super().__init__(term, key)
        self.site, self.schedule = site, schedule

    def captures(self, branch_names):
        return {self.site: "uncond" if "uncond" in branch_names else "cond"}

    def contribution(self, scale, step):
        ref = step.reference
        degraded = self.degraded(step, step.eps[ref], step.inputs[ref], step.captured[self.site])
        return self.scaled_difference(scale, step.eps[ref], degraded, step)

    def degraded(self, step, ref_out, ref_inputs, captured):
        """ε(x̃_t): x̃_t is x̂₀ blurred where attention concentrates, re-noised with the same ε."""
        x, t = step.x, step.t
        received, grid = captured
        h, w = grid
        x0, eps = self.schedule.x0_and_eps(x, ref_out, t)
        mask = (received > 1.0).to(x.dtype).view(x.shape[0], 1, h, w)  # above-mean attention received
        mask = F.interpolate(mask, size=tuple(x.shape[-2:]), mode="nearest")
        blurred = gaussian_blur(x0, self.term.blur_sigma, self.term.kernel_size)
        x0_degraded = blurred * mask + x0 * (1 - mask)
        x_degraded = self.schedule.add_noise(x0_degraded, eps, t)
        return step.call(x_degraded, t, ref_inputs)[:, :x.shape[1]]


class NoiseSchedule:
    """ᾱ(t) and the prediction type, read off a diffusers scheduler (SAG needs x̂₀ and re-noising)."""

    def __init__(self, scheduler):
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"SAG needs a scheduler with alphas_cumprod (DDPM-family); got {type(scheduler).__name__}")
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")

    def alpha_bar(self, t) -> float:
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        lo = min(int(math.floor(t)), len(self.alphas_cumprod) - 1)
        hi = min(lo + 1, len(self.alphas_cumprod) - 1)
        w = t - math.floor(t)
        return float((1 - w) * self.alphas_cumprod[lo] + w * self.alphas_cumprod[hi])

    def x0_and_eps(self, x, model_output, t):
        a = self.alpha_bar(t)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        elif self.prediction_type == "v_prediction":
            x0 = math.sqrt(a) * x - math.sqrt(1 - a) * model_output
            eps = math.sqrt(1 - a) * x + math.sqrt(a) * model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        return x0, eps

    def x0_gain(self, t) -> float:
        """g = ∂x̂₀/∂(model output) at t: x̂₀ is affine in the prediction (ε: −√(1−ᾱ)/√ᾱ; v: −√(1−ᾱ); x₀: 1)."""
        a = self.alpha_bar(t)
        gains = {"epsilon": -math.sqrt(1 - a) / math.sqrt(a), "v_prediction": -math.sqrt(1 - a), "sample": 1.0}
        if self.prediction_type not in gains:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        return gains[self.prediction_type]

    def add_noise(self, x0, eps, t):
        a = self.alpha_bar(t)
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
