"""One guided prediction: gather this step's branches, one batched forward, split, sum the contributions.

    x_t ─┬─ uncond (if CFG is active)            ┐
         ├─ cond                                 ├─ one model call ─ split ─ base + Σ contributions ─ ε̃
         └─ cond, patched per method's branch    ┘
            (attention perturbed: PAG, SEG; blocks skipped: SLG;
             NAG: negative-prompt rows whose attention output is mixed into the cond rows')
                                   (SAG: + one pass of its own on the degraded x̃_t)

Each method (``pagkit.methods``) says which branches it needs and what it contributes; this module only
gathers, batches, routes and sums. ``GuidedDenoiser.predict`` is the single place where this happens;
``sample``, ``attach`` (diffusers pipelines) and ``guide`` (a drop-in model) all call it.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from .backends import detect
from .batch import cat_rows
from .methods import Branch, Context, GuidanceTerm, Step, check_guidance, rescale_guidance
from .methods.sag import NoiseSchedule  # noqa: F401  (re-exported: restore.py and users import it from here)
from .prefix import prefix_stages, shared_prefix
from .routing import Segment, routed


class GuidedDenoiser:
    """Guidance around a model: ``predict(x_t, t, cond, uncond, progress)`` returns ε̃ (in the model's output space).

    ``model``: a diffusers UNet or transformer of a family pagkit has a backend for (``pagkit.backends``).
    ``guidance``: a list of pagkit guidance terms (``pagkit.CFG/PAG/SEG/SAG/SLG``).
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
        # each term bound to this model now (its sites, blocks, RNG stream), so errors come early
        context = Context(model, self.backend, scheduler)
        self.methods = [term.bind(f"{type(term).__name__.lower()}{i}", context) for i, term in enumerate(self.terms)]
        self.base = next((m for m in self.methods if m.base), None)

    def branches(self, progress: float, external_cfg: float | None = None
                 ) -> tuple[list[Branch], dict[str, float], float | None]:
        """The branches this step needs, the active methods' scales (by key), and the CFG scale (None if inactive)."""
        base = self.base
        cfg_scale = base.term.scale_at(progress) if base is not None and base.term.active(progress) else None
        if external_cfg is not None:
            cfg_scale = external_cfg
        branches = ([Branch("uncond", "uncond")] if cfg_scale is not None else []) + [Branch("cond", "cond")]
        scales = {}
        for method in self.methods:
            if method is not base and method.term.active(progress):
                scales[method.key] = scale = method.term.scale_at(progress)
                branches += method.branches(scale)
        return branches, scales, cfg_scale

    def _shared_prefix(self, branches: list[Branch], b: int):
        """Share the stages before the first patched site or block between ``cond`` and the patched branches
        (only when every patched branch reads exactly the conditional inputs)."""
        perturbed = [br for br in branches if br.patches]
        same_inputs = all(br.conditioning == "cond" and not br.inputs and br.onto is None for br in perturbed)
        stage_names = prefix_stages(self.model, sorted({n for br in perturbed for n in br.patches})) \
            if perturbed and same_inputs and self.prefix_sharing else []
        if not stage_names:
            return contextlib.nullcontext()
        names = [br.name for br in branches]
        shared = names.index(perturbed[0].name)  # perturbed branches come last
        cond = names.index("cond")
        source = list(range(shared * b)) + [cond * b + j for _ in perturbed for j in range(b)]
        return shared_prefix(self.model, stage_names, shared * b, source)

    def _branch_inputs(self, branch: Branch, inputs: dict, b: int) -> dict:
        """The inputs of ``branch``'s rows: those of its conditioning, with ``branch.inputs`` (a dict, or a function
        of this step's ``{"cond": …, "uncond": …}`` returning one) replacing some; a tensor of one row stands for
        every sample."""
        base = inputs[branch.conditioning]
        if base is None:
            raise ValueError(f"branch {branch.name} reads the unconditional inputs, but none were given (uncond=...)")
        if not branch.inputs:
            return base
        replacements = branch.inputs(inputs) if callable(branch.inputs) else branch.inputs
        out = dict(base)
        for name, value in replacements.items():
            ref = base.get(name)
            if torch.is_tensor(value) and name not in self.backend.shared_inputs:
                if value.ndim > 0 and value.shape[0] == 1 and b > 1:
                    value = value.expand(b, *value.shape[1:])
                if torch.is_tensor(ref) and ref.shape != value.shape:
                    raise ValueError(f"branch {branch.name}: its {name} has shape {tuple(value.shape)}, the "
                                     f"conditional one {tuple(ref.shape)}; they must match (a batch of 1 or {b}; pad "
                                     "a text to the same length)")
            out[name] = value
        return out

    def _call(self, x, t, kwargs):
        return self.backend.call(self.forward, x, t, kwargs)

    def predict(self, x: torch.Tensor, t, cond: dict | None = None, uncond: dict | None = None,
                progress: float = 0.0, external_cfg: float | None = None) -> torch.Tensor:
        """ε̃ for ``x`` at timestep ``t``; ``progress`` = step index ÷ number of steps drives the schedules.

        ``external_cfg=w``: the caller (a diffusers pipeline) applies CFG with scale w
        itself. Then this returns ``cat([ε_u, ε_c + Δ/w])`` with Δ the other methods'
        contributions, so that the caller's ε_u + w(ε_c' − ε_u) equals
        ε_u + w(ε_c − ε_u) + Δ exactly as the formulas say. With ``uncond=None`` the
        caller computes ε_u in a call of its own (Flux's ``true_cfg_scale``): this
        returns ε_c + Δ/w only.
        """
        cond = cond or {}
        separate_uncond = external_cfg is not None and uncond is None
        branches, scales, cfg_scale = self.branches(progress, None if separate_uncond else external_cfg)
        if cfg_scale is not None and uncond is None:
            raise ValueError("CFG needs the unconditional inputs (uncond=..., e.g. the null class or empty prompt)")
        active = sorted((m for m in self.methods if m.key in scales), key=lambda m: m.order)
        inputs = {"cond": cond, "uncond": uncond}
        b = x.shape[0]
        n = len(branches)
        names = [br.name for br in branches]
        shared = self.backend.shared_inputs
        x_batch = x.repeat(n, *([1] * (x.ndim - 1))) if n > 1 else x
        t_batch = cat_rows([t] * n, b) if torch.is_tensor(t) else t
        kwargs = cat_rows([self._branch_inputs(br, inputs, b) for br in branches], b, shared) if n > 1 \
            else inputs["cond"]
        captures = {site: names.index(branch) for m in active for site, branch in m.captures(names).items()}
        layer_names = sorted({name for br in branches for name in br.patches} | set(captures))
        with routed(self.model, layer_names, self.backend) as router:
            router.info = self.backend.forward_info(self.model, x, cond)
            router.batch = x_batch.shape[0]
            router.plan = [Segment(i * b, (i + 1) * b, br.patches,
                                   None if br.onto is None else (names.index(br.onto) * b, (names.index(br.onto) + 1) * b))
                           for i, br in enumerate(branches) if br.patches]
            for site, i in captures.items():
                router.capture[site] = (i * b, (i + 1) * b)
            with self._shared_prefix(branches, b):
                out = self._call(x_batch, t_batch, kwargs)
            captured = dict(router.captured)
        preds = dict(zip(names, out.split(b)))

        channels = x.shape[1]
        learned_sigma = self.backend.learned_sigma(self.model) and out.shape[1] == 2 * channels
        eps = {k: v[:, :channels] for k, v in preds.items()} if learned_sigma else preds
        step = Step(x=x, t=t, inputs=inputs, eps=eps, captured=captured, call=self._call)
        contributions = [c for c in (m.contribution(scales[m.key], step) for m in active) if c is not None]
        if external_cfg is not None:
            cond_out = eps["cond"] + sum(contributions) / external_cfg
            keys = ("cond",) if separate_uncond else ("uncond", "cond")
            halves = [cond_out] if separate_uncond else [eps["uncond"], cond_out]
            if learned_sigma:
                halves = [torch.cat([h, preds[k][:, channels:]], dim=1) for h, k in zip(halves, keys)]
            return torch.cat(halves)
        guided = self.base.combine(cfg_scale, eps) if cfg_scale is not None else eps["cond"]
        for contribution in contributions:
            guided = guided + contribution
        if self.guidance_rescale and (scales or cfg_scale is not None):
            guided = rescale_guidance(guided, eps["cond"], self.guidance_rescale)
        if learned_sigma:
            guided = torch.cat([guided, preds["cond"][:, channels:]], dim=1)
        return guided


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
        backend = self.denoiser.backend
        x, timestep = backend.input_batch(self.model, inputs.pop(self._input_name)), inputs.pop(backend.timestep_name)
        raw, inputs = inputs, backend.per_sample_inputs(self.model, x, inputs)
        if progress is None:  # without a step index, read progress off the timestep: t = T → 0, t = 0 → 1
            progress = 1.0 - backend.scheduler_timestep(timestep) / self.num_train_timesteps
        uncond = None if self.uncond is None else backend.per_sample_inputs(self.model, x, {**raw, **self.uncond})
        out = backend.caller_output(self.model, self.denoiser.predict(x, timestep, inputs, uncond, progress))
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
