"""One guided prediction: gather this step's branches, one batched forward, split, sum the contributions.

    x_t ─┬─ uncond (if CFG is active)            ┐
         ├─ cond                                 ├─ one model call ─ split ─ base + Σ contributions ─ ε̃
         └─ cond, patched per method's branch    ┘
            (attention perturbed: PAG, SEG; blocks skipped: SLG; block tokens shuffled: TPG;
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
from .methods.base import bind
from .methods.sag import NoiseSchedule  # noqa: F401  (re-exported: restore/dps.py and users import it from here)
from .prefix import prefix_stages, shared_prefix
from .presets import check_family
from .routing import Segment, routed


class NonFiniteGuidance(RuntimeError):
    """The guided prediction holds NaN or inf where the unguided one does not (a scale too large, fp16 overflow)."""


class GuidedDenoiser:
    """Guidance around a model: ``predict(x_t, t, cond, uncond, progress)`` returns ε̃ (in the model's output space).

    ``model``: a diffusers UNet or transformer of a family pagkit has a backend for (``pagkit.backends``).
    ``guidance``: a list of pagkit guidance terms (``pagkit.CFG/PAG/SEG/SAG/SLG/TPG``).
    ``scheduler``: needed for SAG only (x̂₀ and re-noising).
    ``guidance_rescale``: φ of Lin et al. (2023); 0 turns it off.
    ``forward``: what to call instead of ``model(...)`` (``attach`` passes the unwrapped forward).
    ``prefix_sharing``: compute the stages before the first perturbed layer once for the conditional and
    the perturbed branches (see prefix.py); same results, less work. False runs every branch in full.
    ``check_finite``: stop with ``NonFiniteGuidance``, naming the step and the terms, when guidance makes the
    prediction NaN or inf while ε_c is finite (a silent NaN would only show as black images); False skips
    the check (one reduction per step).
    ``external_cfg``: the caller applies CFG itself (``attach``: the pipeline's own), so a ``fold=True`` term needs
    no pagkit.CFG term: it folds onto the caller's unconditional rows (``predict(..., external_cfg=w)``, or
    ``folding`` around a separate unconditional call).

    Terms' combination rules (``rule=``, pagkit.methods.rules) keep state over a sampling run (APG's momentum)
    and may zero a run's first steps (CFG-Zero*). A run starts at the first call, after ``reset()``, or when
    ``progress`` goes back (lower than the last call's); the step index grows by one each time ``progress``
    rises (calls at the same progress are the same step). ``attach`` resets at each pipeline call.
    """

    def __init__(self, model, guidance=(), *, scheduler=None, guidance_rescale: float = 0.0, forward=None,
                 prefix_sharing: bool = True, check_finite: bool = True, external_cfg: bool = False):
        self.model = model
        self.check_finite = check_finite
        self.backend = detect(model)  # one clear error for an unknown family, before any work
        self.prefix_sharing = prefix_sharing
        self.forward = forward if forward is not None else model
        self.terms: list[GuidanceTerm] = check_guidance(guidance)
        check_family(self.terms, self.backend, model)  # a preset's terms fit the family they were tuned for
        if not (isinstance(guidance_rescale, (int, float)) and 0.0 <= guidance_rescale <= 1.0):
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        self.guidance_rescale = float(guidance_rescale)
        # each term bound to this model now (its sites, blocks, RNG stream), so errors come early
        context = Context(model, self.backend, scheduler)
        self.methods = [bind(term, f"{type(term).__name__.lower()}{i}", context) for i, term in enumerate(self.terms)]
        self.base = next((m for m in self.methods if m.base), None)
        adjusting = [type(m.term).__name__ for m in self.methods if m.adjusts]
        if len(adjusting) > 1:
            raise ValueError(f"{len(adjusting)} terms ({', '.join(adjusting)}) rescale the whole guided prediction; "
                             "ε̃ is rescaled once: set rescale on one term only")
        self.rules = [m.rule for m in self.methods if m.rule is not None]
        folding = [m for m in self.methods if getattr(m, "folds", False)]
        if folding and self.base is None and not external_cfg:
            raise ValueError(f"{type(folding[0].term).__name__}(fold=True) perturbs CFG's unconditional branch and "
                             "needs a pagkit.CFG term in the same guidance (pagkit.sample / pagkit.guide; through "
                             "pagkit.attach the pipeline's own CFG): add CFG(w) or drop fold")
        if len(folding) > 1:
            raise ValueError(f"{len(folding)} terms fold into CFG's unconditional branch; at most one may "
                             f"({', '.join(type(m.term).__name__ for m in folding)})")
        self._sites = None  # the model's sites by name, read at the first routed call (see ``_routed``)
        self.reset()

    def _routed(self, layer_names):
        """``routed`` with the model's sites read once: the terms were bound to them at construction, and
        finding them walks every module of the model (milliseconds each step)."""
        if self._sites is None:
            self._sites = {s.name: s for s in self.backend.sites(self.model) + self.backend.cross_sites(self.model)}
        return routed(self.model, layer_names, self.backend, sites=self._sites)

    def reset(self) -> None:
        """Start a new sampling run: the rules forget their state (APG's momentum), the step index restarts."""
        self._progress, self._index = None, 0
        for rule in self.rules:
            rule.reset()
        for method in self.methods:  # difference caches (cache=k)
            method.reset()

    def begin_step(self, progress: float) -> bool:
        """Track the run (see the class docstring); whether a rule zeroes the prediction at this step (zero-init)."""
        if self._progress is not None and progress < self._progress:
            self.reset()
        elif self._progress is not None and progress > self._progress:
            self._index += 1
        self._progress = progress
        return any(rule.zeroes(self._index) for rule in self.rules)

    def folds(self, progress: float) -> list[GuidanceTerm]:
        """The ``fold=True`` terms that perturb the unconditional rows at ``progress`` (where CFG is active)."""
        return [m.term for m in self.methods if getattr(m, "folds", False) and m.term.active(progress)]

    @contextlib.contextmanager
    def folding(self, x: torch.Tensor, inputs: dict, progress: float):
        """Around the caller's own call of the model on unconditional rows only (a pipeline's separate ∅ call,
        ``x``/``inputs`` its batch): the active ``fold=True`` terms' patches act on every row of it, so it returns
        ε̂_u; nothing is patched where no such term is active."""
        patches = {}
        for method in self.methods:
            if getattr(method, "folds", False) and method.term.active(progress):
                patches.update(method.patches)
        if not patches:
            yield
            return
        with self._routed(sorted(patches)) as router:
            router.info = self.backend.forward_info(self.model, x, inputs)
            router.batch = x.shape[0]
            router.plan = [Segment(0, x.shape[0], patches)]
            yield

    def branches(self, progress: float, external_cfg: float | None = None
                 ) -> tuple[list[Branch], dict[str, float], float | None]:
        """The branches this step needs, the active methods' scales (by key), and the CFG scale (None if inactive)."""
        base = self.base
        cfg_scale = base.term.scale_at(progress) if base is not None and base.term.active(progress) else None
        if external_cfg is not None:
            cfg_scale = external_cfg
        folded: dict[str, object] = {}  # patches of fold=True terms, onto the uncond rows (ε̂_u)
        extra, scales = [], {}
        for method in self.methods:
            if method is not base and method.term.active(progress):
                if getattr(method, "folds", False):
                    if cfg_scale is not None:
                        folded.update(method.patches)
                    continue
                method.begin_step(self._index)
                scales[method.key] = scale = method.term.scale_at(progress)
                extra += method.branches(scale)
        branches = ([Branch("uncond", "uncond", folded)] if cfg_scale is not None else []) + [Branch("cond", "cond")]
        return branches + extra, scales, cfg_scale

    def _shared_prefix(self, branches: list[Branch], b: int, cond: dict):
        """Share the stages before the first patched site or block between ``cond`` and the patched branches
        (only when every patched branch reads exactly the conditional inputs, and the family allows it for them)."""
        perturbed = [br for br in branches if br.patches]
        same_inputs = all(br.conditioning == "cond" and not br.inputs and br.onto is None for br in perturbed) \
            and self.backend.shares_prefix(cond)
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
        if external_cfg is not None and self.base is not None and self.base.rule_acts:
            raise ValueError("the caller applies CFG itself (external_cfg), so CFG's rule "
                             f"({type(self.base.rule.rule).__name__}) cannot act on it; rules on the other terms do")
        zeroed = self.begin_step(progress)
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
        self.backend.check_step(self.model, cond, [m.term for m in active],
                                {name: p for br in branches for name, p in br.patches.items()}, captures)
        with self._routed(layer_names) as router:
            router.info = self.backend.forward_info(self.model, x, cond)
            router.batch = x_batch.shape[0]
            router.plan = [Segment(i * b, (i + 1) * b, br.patches,
                                   None if br.onto is None else (names.index(br.onto) * b, (names.index(br.onto) + 1) * b))
                           for i, br in enumerate(branches) if br.patches]
            for site, i in captures.items():
                router.capture[site] = (i * b, (i + 1) * b)
            with self._shared_prefix(branches, b, cond):
                out = self._call(x_batch, t_batch, kwargs)
            captured = dict(router.captured)
        preds = dict(zip(names, out.split(b)))

        channels = x.shape[1]
        learned_sigma = self.backend.learned_sigma(self.model) and out.shape[1] == 2 * channels
        eps = {k: v[:, :channels] for k, v in preds.items()} if learned_sigma else preds
        step = Step(x=x, t=t, inputs=inputs, eps=eps, captured=captured, call=self._call)
        contributed = [(m, m.contribution(scales[m.key], step)) for m in active]
        contributed = [(m, c) for m, c in contributed if c is not None]  # None: NAG rewrote ε_c itself
        active, contributions = [m for m, _ in contributed], [c for _, c in contributed]
        finite = self._check_finite if self.check_finite else (lambda out, *_: out)
        adjusting = [m for m in active if m.adjusts]
        if external_cfg is not None:
            if adjusting and separate_uncond:
                raise ValueError(f"{type(adjusting[0].term).__name__}'s rescale needs ε_u and ε_c of one call, but "
                                 "this pipeline computes ε_u in a call of its own (separate-call CFG: Wan, Flux's "
                                 "true_cfg_scale); use rescale=0 there")
            if adjusting:  # the ε_c' for which the caller's ε_u + w(ε_c' − ε_u) is the adjusted ε̃
                guided = eps["uncond"] + external_cfg * (eps["cond"] - eps["uncond"]) + sum(contributions)
                for m in adjusting:
                    guided = m.adjust(scales[m.key], guided, step)
                cond_out = eps["uncond"] + (guided - eps["uncond"]) / external_cfg
            else:
                cond_out = eps["cond"] + sum(contributions) / external_cfg
            keys = ("cond",) if separate_uncond else ("uncond", "cond")
            halves = [cond_out] if separate_uncond else [eps["uncond"], cond_out]
            if zeroed:
                halves = [torch.zeros_like(h) for h in halves]
            if learned_sigma:
                halves = [torch.cat([h, preds[k][:, channels:]], dim=1) for h, k in zip(halves, keys)]
            return finite(torch.cat(halves), eps, contributions, active, t, progress)
        guided = self.base.combine(cfg_scale, step) if cfg_scale is not None else eps["cond"]
        for contribution in contributions:
            guided = guided + contribution
        for m in adjusting:
            guided = m.adjust(scales[m.key], guided, step)
        if self.guidance_rescale and (scales or cfg_scale is not None):
            guided = rescale_guidance(guided, eps["cond"], self.guidance_rescale)
        if zeroed:
            guided = torch.zeros_like(guided)
        if learned_sigma:
            guided = torch.cat([guided, preds["cond"][:, channels:]], dim=1)
        return finite(guided, eps, contributions, active, t, progress)

    def _check_finite(self, out, eps, contributions, active, t, progress) -> torch.Tensor:
        """``out`` if it is finite or ε_c is not (then the model itself, not guidance, made it so); else the error."""
        if bool(torch.isfinite(out).all()) or not bool(torch.isfinite(eps["cond"]).all()):
            return out
        bad = [m.term for m, c in zip(active, contributions) if not bool(torch.isfinite(c).all())]
        if "uncond" in eps and not bool(torch.isfinite(eps["uncond"]).all()) and self.base is not None:
            bad.insert(0, self.base.term)
        bad = bad or self.terms  # each term finite, their sum not (overflow): all of them
        tv = t.flatten()[0].item() if torch.is_tensor(t) else t
        raise NonFiniteGuidance(
            f"guidance made the prediction NaN/inf at the step with t={tv:g} (progress {progress:.3g}) while the "
            f"unguided one is finite: from {', '.join(repr(term) for term in bad)}; lower the scale, use "
            f"float32, or pass check_finite=False to sample anyway")


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
