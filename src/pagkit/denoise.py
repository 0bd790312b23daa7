"""One guided prediction: gather this step's branches, one batched forward, split, combine.

    x_t ─┬─ uncond (if CFG is active)       ┐
         ├─ cond                            ├─ one model call ─ split ─ combine ─ ε̃
         └─ cond, perturbed per PAG/SEG term┘
                                   (SAG: + one pass on the degraded x̃_t)

``GuidedDenoiser.predict`` is the single place where this happens; ``sample``,
``attach`` (diffusers pipelines) and ``guide`` (a drop-in model) all call it.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .backends import detect
from .batch import cat_rows
from .guidance import CFG, SAG, GuidanceTerm, check_guidance, combine, rescale_guidance
from .layers import resolve_layers
from .perturb import Perturbation, gaussian_blur
from .prefix import prefix_stages, shared_prefix
from .routing import Segment, routed


@dataclass
class Branch:
    name: str  # "uncond", "cond", or the key of a perturbed term
    conditioning: str  # which inputs it reads: "cond" or "uncond"
    perturbations: dict[str, Perturbation] = field(default_factory=dict)  # layer → perturbation


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

    def add_noise(self, x0, eps, t):
        a = self.alpha_bar(t)
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * eps


class GuidedDenoiser:
    """Guidance around a model: ``predict(x_t, t, cond, uncond, progress)`` returns ε̃ (in the model's output space).

    ``model``: a diffusers UNet or transformer of a family pagkit has a backend for (``pagkit.backends``).
    ``guidance``: a list of ``pagkit.CFG/PAG/SEG/SAG`` terms.
    ``scheduler``: needed for SAG only (x̂₀ and re-noising).
    ``guidance_rescale``: φ of Lin et al. (2023); 0 turns it off.
    ``forward``: what to call instead of ``model(...)`` (``attach`` passes the unwrapped forward).
    ``prefix_sharing``: compute the stages before the first perturbed layer once for the conditional and
    the perturbed branches (see prefix.py); same results, less work. False runs every branch in full.
    """

    def __init__(self, model, guidance=(), *, scheduler=None, guidance_rescale: float = 0.0, forward=None,
                 prefix_sharing: bool = True):
        self.model = model
        self.backend = detect(model)  # one clear error for an unknown family, before any work
        self.prefix_sharing = prefix_sharing
        self.forward = forward if forward is not None else model
        self.terms: list[GuidanceTerm] = check_guidance(guidance)
        if not (isinstance(guidance_rescale, (int, float)) and 0.0 <= guidance_rescale <= 1.0):
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        self.guidance_rescale = float(guidance_rescale)
        self.cfg = next((t for t in self.terms if isinstance(t, CFG)), None)
        self.sag = next((t for t in self.terms if isinstance(t, SAG)), None)
        # PAG/SEG terms: each becomes one perturbed branch; resolve their layers now so errors come early
        self.perturbed: list[tuple[str, GuidanceTerm, list[str]]] = []
        for i, term in enumerate(self.terms):
            if hasattr(term, "make_perturbation"):
                self.perturbed.append((f"{type(term).__name__.lower()}{i}", term, resolve_layers(model, term.layers)))
        self.sag_layer = None
        if self.sag is not None:
            chosen = resolve_layers(model, self.sag.layer)
            if len(chosen) != 1:
                raise ValueError(f"SAG reads one attention map; layer {self.sag.layer!r} selects {len(chosen)}: "
                                 f"{', '.join(chosen)}. Name one of them.")
            self.sag_layer = chosen[0]
            if scheduler is None:
                raise ValueError("SAG needs the scheduler (to predict x̂₀ and re-noise it); pass scheduler=...")
            self.schedule = NoiseSchedule(scheduler)
        # perturbations are built once, so the random ablations keep one RNG stream per term
        self._perturbation = {key: term.make_perturbation() for key, term, _ in self.perturbed}

    def branches(self, progress: float, external_cfg: float | None = None
                 ) -> tuple[list[Branch], dict[str, float], float | None]:
        """The branches this step needs, the perturbed terms' scales, and the CFG scale (None if inactive)."""
        cfg_scale = self.cfg.scale_at(progress) if self.cfg is not None and self.cfg.active(progress) else None
        if external_cfg is not None:
            cfg_scale = external_cfg
        branches = ([Branch("uncond", "uncond")] if cfg_scale is not None else []) + [Branch("cond", "cond")]
        scales = {}
        for key, term, layer_names in self.perturbed:
            if term.active(progress):
                perturbation = self._perturbation[key]
                branches.append(Branch(key, "cond", {name: perturbation for name in layer_names}))
                scales[key] = term.scale_at(progress)
        return branches, scales, cfg_scale

    def _shared_prefix(self, branches: list[Branch], b: int):
        """Share the stages before the first perturbed layer between ``cond`` and the perturbed branches."""
        perturbed = [br for br in branches if br.perturbations]
        stage_names = prefix_stages(self.model, sorted({n for br in perturbed for n in br.perturbations})) \
            if perturbed and self.prefix_sharing else []
        if not stage_names:
            return contextlib.nullcontext()
        names = [br.name for br in branches]
        shared = names.index(perturbed[0].name)  # perturbed branches come last
        cond = names.index("cond")
        source = list(range(shared * b)) + [cond * b + j for _ in perturbed for j in range(b)]
        return shared_prefix(self.model, stage_names, shared * b, source)

    def _call(self, x, t, kwargs):
        return self.backend.call(self.forward, x, t, kwargs)

    def predict(self, x: torch.Tensor, t, cond: dict | None = None, uncond: dict | None = None,
                progress: float = 0.0, external_cfg: float | None = None) -> torch.Tensor:
        """ε̃ for ``x`` at timestep ``t``; ``progress`` = step index ÷ number of steps drives the schedules.

        ``external_cfg=w``: the caller (a diffusers pipeline) applies CFG with scale w
        itself. Then this returns ``cat([ε_u, ε_c + Δ/w])`` with Δ the PAG/SEG/SAG
        terms, so that the caller's ε_u + w(ε_c' − ε_u) equals
        ε_u + w(ε_c − ε_u) + Δ exactly as the formulas say. With ``uncond=None`` the
        caller computes ε_u in a call of its own (Flux's ``true_cfg_scale``): this
        returns ε_c + Δ/w only.
        """
        cond = cond or {}
        separate_uncond = external_cfg is not None and uncond is None
        branches, scales, cfg_scale = self.branches(progress, None if separate_uncond else external_cfg)
        if cfg_scale is not None and uncond is None:
            raise ValueError("CFG needs the unconditional inputs (uncond=..., e.g. the null class or empty prompt)")
        sag_scale = self.sag.scale_at(progress) if self.sag is not None and self.sag.active(progress) else None
        inputs = {"cond": cond, "uncond": uncond}
        b = x.shape[0]
        n = len(branches)
        shared = self.backend.shared_inputs
        x_batch = x.repeat(n, *([1] * (x.ndim - 1))) if n > 1 else x
        t_batch = cat_rows([t] * n, b) if torch.is_tensor(t) else t
        kwargs = cat_rows([inputs[br.conditioning] for br in branches], b, shared) if n > 1 else inputs["cond"]
        layer_names = sorted({name for br in branches for name in br.perturbations} |
                             ({self.sag_layer} if sag_scale is not None else set()))
        with routed(self.model, layer_names, self.backend) as router:
            router.info = self.backend.forward_info(self.model, x, cond)
            router.batch = x_batch.shape[0]
            router.plan = [Segment(i * b, (i + 1) * b, br.perturbations)
                           for i, br in enumerate(branches) if br.perturbations]
            sag_ref = "uncond" if cfg_scale is not None else "cond"
            if sag_scale is not None:
                i = [br.name for br in branches].index(sag_ref)
                router.capture[self.sag_layer] = (i * b, (i + 1) * b)
            with self._shared_prefix(branches, b):
                out = self._call(x_batch, t_batch, kwargs)
            captured = router.captured.get(self.sag_layer)
        preds = dict(zip([br.name for br in branches], out.split(b)))

        channels = x.shape[1]
        learned_sigma = self.backend.learned_sigma(self.model) and out.shape[1] == 2 * channels
        eps = {k: v[:, :channels] for k, v in preds.items()} if learned_sigma else preds
        sag_term = 0.0
        if sag_scale is not None:
            sag_term = sag_scale * self._sag_difference(x, t, eps[sag_ref], inputs[sag_ref], captured)
        if external_cfg is not None:
            delta = sum(s * (eps["cond"] - eps[k]) for k, s in scales.items()) + sag_term
            cond_out = eps["cond"] + delta / external_cfg
            keys = ("cond",) if separate_uncond else ("uncond", "cond")
            halves = [cond_out] if separate_uncond else [eps["uncond"], cond_out]
            if learned_sigma:
                halves = [torch.cat([h, preds[k][:, channels:]], dim=1) for h, k in zip(halves, keys)]
            return torch.cat(halves)
        guided = combine(eps, scales, cfg_scale) + sag_term
        if self.guidance_rescale and (scales or cfg_scale is not None or sag_scale is not None):
            guided = rescale_guidance(guided, eps["cond"], self.guidance_rescale)
        if learned_sigma:
            guided = torch.cat([guided, preds["cond"][:, channels:]], dim=1)
        return guided

    def _sag_difference(self, x, t, ref_out, ref_inputs, captured):
        """ε(x_t) − ε(x̃_t): x̃_t is x̂₀ blurred where attention concentrates, re-noised with the same ε."""
        received, grid = captured
        h, w = grid
        x0, eps = self.schedule.x0_and_eps(x, ref_out, t)
        mask = (received > 1.0).to(x.dtype).view(x.shape[0], 1, h, w)  # above-mean attention received
        mask = F.interpolate(mask, size=tuple(x.shape[-2:]), mode="nearest")
        blurred = gaussian_blur(x0, self.sag.blur_sigma, self.sag.kernel_size)
        x0_degraded = blurred * mask + x0 * (1 - mask)
        x_degraded = self.schedule.add_noise(x0_degraded, eps, t)
        degraded_out = self._call(x_degraded, t, ref_inputs)[:, :x.shape[1]]
        return ref_out - degraded_out


class GuidedModel(torch.nn.Module):
    """A model with guidance built in, callable like the model itself (see ``guide``)."""

    def __init__(self, model, guidance, *, uncond: dict | None = None, scheduler=None, guidance_rescale=0.0,
                 num_train_timesteps: int | None = None):
        super().__init__()
        self.model = model
        self.denoiser = GuidedDenoiser(model, guidance, scheduler=scheduler, guidance_rescale=guidance_rescale)
        self.uncond = uncond
        self.num_train_timesteps = num_train_timesteps or (
            scheduler.config.num_train_timesteps if scheduler is not None else 1000)
        self._signature = inspect.signature(model.forward)
        self._input_name = next(iter(self._signature.parameters))  # "sample" (UNets), "hidden_states", ...
        self._var_keyword = next((n for n, p in self._signature.parameters.items() if p.kind == p.VAR_KEYWORD), None)

    @property
    def config(self):
        return self.model.config

    def forward(self, *args, progress: float | None = None, return_dict: bool = True, **kwargs):
        """Called as the wrapped model is called (its own argument names, e.g. ``hidden_states=``)."""
        bound = self._signature.bind(*args, **kwargs)
        inputs = dict(bound.arguments)
        inputs.update(inputs.pop(self._var_keyword, None) or {})
        inputs.pop("return_dict", None)
        x, timestep = inputs.pop(self._input_name), inputs.pop("timestep")
        inputs = self.denoiser.backend.per_sample_inputs(self.model, x, inputs)
        if progress is None:  # without a step index, read progress off the timestep: t = T → 0, t = 0 → 1
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            progress = 1.0 - t * self.denoiser.backend.timestep_divisor / self.num_train_timesteps
        uncond = None if self.uncond is None else \
            self.denoiser.backend.per_sample_inputs(self.model, x, {**inputs, **self.uncond})
        out = self.denoiser.predict(x, timestep, inputs, uncond, progress)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=out)


def guide(model, guidance, *, uncond: dict | None = None, scheduler=None, guidance_rescale: float = 0.0):
    """Wrap ``model`` so that calling it returns the guided prediction.

    ``uncond``: the inputs that replace the conditional ones for CFG's unconditional branch,
    e.g. ``{"class_labels": null_labels}`` or ``{"encoder_hidden_states": negative_embeds}``.
    Pass ``progress=i/N`` when calling to drive the terms' schedules by step; otherwise it is read off t.
    """
    return GuidedModel(model, guidance, uncond=uncond, scheduler=scheduler, guidance_rescale=guidance_rescale)
