"""What every guidance method is made of: a term (the dataclass users construct), its schedule, and the
protocol by which the denoiser asks it for branches and for its contribution to ε̃.

A term is configuration only. ``term.bind(key, context)`` resolves it against one model (its sites or
blocks, its perturbation's RNG stream, the scheduler where it needs one) and returns a ``Bound`` method,
which the denoiser asks, at each step where the term is active:

* ``branches(scale)``: the extra rows it needs in the one batched forward, each a ``Branch``: which inputs the
  rows read (``"cond"``/``"uncond"``, with some replaced: NAG's negative prompt) and the patches at sites or
  blocks (attention perturbations, ``routing.SkipBlock``, ``routing.CrossRows``) routed onto those rows;
* ``captures(branch_names)``: sites whose attention map it reads, and on which branch's rows;
* ``contribution(scale, step)``: its term of ε̃ from the branch predictions (``Step``), possibly after extra
  passes of its own (``order = 1``: computed after the batched forward, e.g. SAG's); None when it adds
  nothing (NAG, which rewrites ε_c itself: ``rewrites_cond``). Every contribution is k·(D_pos − D_neg),
  computed by ``Bound.scaled_difference``, the one place where the term's combination rule (``rule=``,
  pagkit.methods.rules: APG, CFG-Zero*) replaces D_pos − D_neg;
* ``reset()`` at the start of a sampling run and ``begin_step(index)`` at each step where it acts: per-run state
  (``Contrast``'s difference cache, ``cache=k``);
* ``adjust(scale, guided, step)``, where ``adjusts`` is set: a rule on the whole ε̃ once every contribution is
  in (STG's std rescale); at most one bound term per denoiser adjusts.

The denoiser always runs the conditional branch ``"cond"``, and the unconditional branch ``"uncond"`` when a
method with ``base = True`` (CFG) is active or the caller (a pipeline) does CFG itself. ε̃ is the base
method's ``combine`` (or ε_c) plus the contributions, in the order of the terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .rules import Rule


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
    rule: Rule | None = field(default=None, kw_only=True)
    """A combination rule for this term's difference (``pagkit.APG``, ``pagkit.CFGZeroStar``), or None."""

    neutral = 0.0  # the scale at which the term changes nothing
    unique = False  # at most one term of this method per denoiser

    @property
    def needs_scheduler(self) -> bool:
        """Whether binding needs the sampler's scheduler (SAG: x̂₀ and re-noising; APG in x₀ space)."""
        return self.rule is not None and self.rule.needs_scheduler

    rewrites_cond = False  # it changes the conditional rows themselves (NAG): only CFG may join it

    def __post_init__(self):
        from .rules import RULES, Rule
        name = type(self).__name__
        if self.rule is not None and not isinstance(self.rule, Rule):
            raise ValueError(f"{name} rule must be None or a combination rule "
                             f"({', '.join(cls.__name__ for cls in RULES.values())}), got {self.rule!r}")
        for what, value in (("scale", self.scale), ("scale_end", self.scale_end)):
            if value is None:
                continue
            _check_number(f"{name} {what}", value)
            if value < 0:  # it would guide towards the broken prediction: a typo far more often than a wish
                raise ValueError(f"{name} {what} must be >= 0 (it is off at {self.neutral:g}), got {value!r}")
        _check_number(f"{name} start", self.start)
        _check_number(f"{name} stop", self.stop)
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise ValueError(f"{name} interval must satisfy 0 <= start < stop <= 1, got start={self.start}, "
                             f"stop={self.stop}")

    def in_interval(self, progress: float) -> bool:
        """Whether the step at ``progress`` = step index ÷ number of steps lies in [start, stop)."""
        return self.start <= progress < self.stop

    def scale_at(self, progress: float) -> float:
        """The scale at ``progress`` = step index ÷ number of steps."""
        if not self.in_interval(progress):
            return self.neutral
        if self.scale_end is None:
            return float(self.scale)
        f = (progress - self.start) / (self.stop - self.start)
        return float(self.scale + (self.scale_end - self.scale) * f)

    def active(self, progress: float) -> bool:
        return self.scale_at(progress) != self.neutral

    @classmethod
    def from_preset(cls, path) -> "GuidanceTerm":
        """The one term of a preset file of this method (``pagkit tune``'s ``preset.json``; see pagkit.presets)."""
        from ..presets import load_preset
        terms = load_preset(path, method=cls)
        if len(terms) != 1:
            raise ValueError(f"{path} holds {len(terms)} terms; use pagkit.load_preset for it")
        return terms[0]

    def bind(self, key: str, context: "Context") -> "Bound":
        """This term resolved against one model; ``key`` names its branch(es)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how it guides (bind)")


CACHE_MODES = ("reuse", "extrapolate")


@dataclass
class ContrastTerm(GuidanceTerm):
    """A term that contrasts ε_c with one perturbed copy of it, s·(ε_c − ε̂) (PAG, SEG, SLG, TPG, STG), with two
    cheaper variants that trade exactness for cost (issue 19):

    * **Difference caching** (``cache=k``): the difference D = ε_c − ε̂ is computed, with its perturbed rows, on
      every k-th step where the term acts (the 1st, the (k+1)-th, ...); on the steps in between no perturbed row
      runs and the contribution is s_i·D̃, s_i the scale at that step and D̃ the last computed D
      (``cache_mode="reuse"``) or its linear extrapolation from the last two computed ones, D̃ = D₂ + (n − n₂)/(n₂ −
      n₁)·(D₂ − D₁) with n the active-step ordinal (``"extrapolate"``; D₂ alone until two exist). k = 1 (the
      default) is the exact method. The state lives per sampling run (``GuidedDenoiser.reset``). With a ``rule``,
      the rule sees D_pos = ε_c and D_neg = ε_c − D̃.
    * **Folding into the unconditional branch** (``fold=True``, with a ``pagkit.CFG`` term): the perturbation is
      applied to CFG's unconditional rows instead of a copy of the conditional ones, ε̃ = ε̂_u + w(ε_c − ε̂_u),
      exactly CFG's two rows per sample. The idea of ComfyUI's ``SkipLayerGuidanceDiTSimple``
      (comfy_extras/nodes_slg.py: skip layers in the uncond pass only), for any perturbation. **Scale convention**:
      the strength is CFG's w; the term's own ``scale`` only switches it on (≠ 0) or off (0), and ``start``/
      ``stop`` say on which steps the uncond rows are perturbed (where CFG is inactive, folding does nothing).
      A ramp (``scale_end``), a ``rule`` or caching have no meaning there and are refused. Under ``pagkit.attach``
      the CFG is the pipeline's own (no ``pagkit.CFG`` term): its unconditional rows, or its separate
      unconditional call, are the perturbed ones (pipelines.py).
    """

    cache: int = field(default=1, kw_only=True)
    """Recompute the difference every ``cache``-th active step and reuse it in between (1 = every step, exact)."""
    cache_mode: str = field(default="reuse", kw_only=True)
    """How the steps in between get it: ``"reuse"`` the last one, ``"extrapolate"`` linearly from the last two."""
    fold: bool = field(default=False, kw_only=True)
    """Perturb CFG's unconditional rows instead of an extra copy: ε̃ = ε̂_u + w(ε_c − ε̂_u) (needs pagkit.CFG, or
    under pagkit.attach the pipeline's own CFG)."""

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if isinstance(self.cache, bool) or not isinstance(self.cache, int) or self.cache < 1:
            raise ValueError(f"{name} cache must be an integer >= 1 (1 = no caching), got {self.cache!r}")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"{name} cache_mode must be one of {', '.join(map(repr, CACHE_MODES))}, "
                             f"got {self.cache_mode!r}")
        if not isinstance(self.fold, bool):
            raise ValueError(f"{name} fold must be true or false, got {self.fold!r}")
        if self.fold:
            clash = [what for what, bad in (("cache", self.cache != 1), ("scale_end", self.scale_end is not None),
                                            ("rule", self.rule is not None)) if bad]
            if clash:
                raise ValueError(f"{name}(fold=True) uses CFG's scale on ε̂_u and has no difference of its own: "
                                 f"{', '.join(clash)} cannot be set with it")


@dataclass
class Branch:
    """Rows of the batched forward: which inputs they read, and the patches routed onto them."""

    name: str  # "uncond", "cond", or the key of a method's branch
    conditioning: str  # which inputs it reads: "cond" or "uncond"
    patches: dict[str, object] = field(default_factory=dict)  # site or block name → Perturbation | SkipBlock
    inputs: dict | Callable | None = None
    """Model inputs that replace those of ``conditioning`` (NAG's negative prompt), or a function of the step's
    ``{"cond": …, "uncond": …}`` inputs returning them."""
    onto: str | None = None  # the branch whose rows its ``routing.CrossRows`` patches also rewrite (NAG: "cond")

    @property
    def perturbations(self) -> dict[str, object]:  # the name before block skips existed
        return self.patches


@dataclass
class Context:
    """What a method may read when it is bound: the model, its family's backend, the scheduler (or None)."""

    model: torch.nn.Module
    backend: object
    scheduler: object = None


@dataclass
class Step:
    """One guided prediction after the batched forward: what contributions are computed from."""

    x: torch.Tensor
    t: object
    inputs: dict  # "cond" / "uncond" → the model inputs of that branch (uncond may be None)
    eps: dict  # branch name → its prediction (ε part only, for learned-σ models)
    captured: dict  # site → what routing recorded there (SAG's attention received, grid)
    call: Callable  # call(x, t, inputs) → the model's prediction, unguided (for extra passes)

    @property
    def reference(self) -> str:
        """The branch a condition-free method reads when it needs one: ∅ under CFG, else c."""
        return "uncond" if "uncond" in self.eps else "cond"


class Bound:
    """A term bound to one model (see the module docstring)."""

    base = False  # supplies the base of ε̃ from the unconditional and conditional branches (CFG)
    order = 0  # 0: computed from the batched forward; 1: after it, with extra passes of its own
    adjusts = False  # whether ``adjust`` changes the whole ε̃ after the contributions (STG's rescale)
    rule = None  # the term's bound combination rule (rules.BoundRule), set by ``bind``

    def __init__(self, term: GuidanceTerm, key: str):
        self.term, self.key = term, key

    @property
    def rule_acts(self) -> bool:
        """Whether a rule changes the difference (a neutral one leaves it bit for bit)."""
        return self.rule is not None and not self.rule.neutral

    def scaled_difference(self, k: float, positive: torch.Tensor, negative: torch.Tensor, step: Step) -> torch.Tensor:
        """k·(D_pos − D_neg), or k·Δ' with Δ' the term's rule applied to that difference (pagkit.methods.rules)."""
        if not self.rule_acts:
            return k * (positive - negative)
        return k * self.rule.difference(positive, negative, step)

    def reset(self) -> None:
        """A new sampling run starts (``GuidedDenoiser.reset``): forget any per-run state."""

    def begin_step(self, index: int) -> None:
        """The denoiser's step ``index`` (0, 1, …; repeated for calls at the same step) is one where the term acts."""

    def branches(self, scale: float) -> list[Branch]:
        return []

    def captures(self, branch_names: list[str]) -> dict[str, str]:
        return {}

    def contribution(self, scale: float, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def adjust(self, scale: float, guided: torch.Tensor, step: Step) -> torch.Tensor:
        """ε̃ after every contribution, changed by this term as a whole (where ``adjusts``); default unchanged."""
        return guided


class Contrast(Bound):
    """One perturbed copy of the conditional branch; contributes s·(ε_c − ε_perturbed) (PAG, SEG, SLG, TPG, STG).

    With ``cache=k`` it runs that copy on every k-th active step only and reuses (or extrapolates) the difference
    in between; with ``fold=True`` it runs no copy: ``folds`` tells the denoiser to put ``patches`` on CFG's
    unconditional rows, and it contributes nothing itself (see ``ContrastTerm``)."""

    def __init__(self, term: GuidanceTerm, key: str, patches: dict[str, object]):
        super().__init__(term, key)
        self.patches = patches
        self.cache = getattr(term, "cache", 1)
        self.cache_mode = getattr(term, "cache_mode", "reuse")
        self.folds = getattr(term, "fold", False)
        self.reset()

    def reset(self):
        self._step = None  # the denoiser's index of the last active step
        self._active = -1  # its ordinal among the active steps of this run (0, 1, …)
        self._computed: list[tuple[int, torch.Tensor]] = []  # (ordinal, ε_c − ε̂) of the last two computed steps

    def begin_step(self, index):
        if index != self._step:
            self._step, self._active = index, self._active + 1

    @property
    def computes(self) -> bool:
        """Whether this step runs the perturbed rows (every step without caching; every k-th active one with)."""
        return self.cache == 1 or self._active % self.cache == 0

    def branches(self, scale):
        if self.folds or not self.computes:
            return []
        return [Branch(self.key, "cond", self.patches)]

    def contribution(self, scale, step):
        if self.folds:
            return None  # the perturbation acted on the uncond rows; CFG's combine is ε̂_u + w(ε_c − ε̂_u)
        cond = step.eps["cond"]
        if self.cache == 1:
            return self.scaled_difference(scale, cond, step.eps[self.key], step)
        if self.computes:
            difference = cond - step.eps[self.key]
            kept = [c for c in self._computed if c[0] != self._active][-1:]  # a repeated call replaces its own
            self._computed = kept + [(self._active, difference)]
        else:
            difference = self.cached_difference()
        if not self.rule_acts:
            return scale * difference
        return self.scaled_difference(scale, cond, cond - difference, step)

    def cached_difference(self) -> torch.Tensor:
        """D̃ at this active step: the last computed D (reuse) or the line through the last two (extrapolate)."""
        n2, d2 = self._computed[-1]
        if self.cache_mode == "reuse" or len(self._computed) < 2:
            return d2
        n1, d1 = self._computed[-2]
        return d2 + ((self._active - n2) / (n2 - n1)) * (d2 - d1)


def bind(term: GuidanceTerm, key: str, context: Context) -> Bound:
    """``term.bind(key, context)`` with the term's rule bound alongside (each bound term keeps its own rule state)."""
    bound = term.bind(key, context)
    bound.rule = term.rule.bind(context) if term.rule is not None else None
    return bound


def check_guidance(guidance) -> list[GuidanceTerm]:
    """Normalise the user's guidance argument to a list of terms, with clear errors."""
    from . import METHODS
    if guidance is None:
        return []
    if isinstance(guidance, GuidanceTerm):
        guidance = [guidance]
    terms = list(guidance)
    for term in terms:
        if not isinstance(term, GuidanceTerm):
            names = ", ".join(cls.__name__ for cls in METHODS.values())
            raise TypeError(f"guidance terms must be pagkit guidance terms ({names}), got {term!r}")
    for cls in dict.fromkeys(type(t) for t in terms if t.unique):
        if sum(type(t) is cls for t in terms) > 1:
            raise ValueError(f"at most one {cls.__name__} term")
    from .cfg import CFG
    for rewriting in (t for t in terms if t.rewrites_cond):
        others = [type(t).__name__ for t in terms if t is not rewriting and not isinstance(t, CFG)]
        if others:
            raise ValueError(f"{type(rewriting).__name__} rewrites the conditional prediction itself and combines "
                             f"only with CFG; it cannot join {', '.join(others)} in one denoiser (their perturbed "
                             f"branches would contrast the {type(rewriting).__name__}-guided ε_c against an "
                             "unguided copy)")
    return terms


def rescale_guidance(guided: torch.Tensor, reference: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): pull the guided std back towards the reference's."""
    if guidance_rescale == 0.0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def combine(predictions: dict[str, torch.Tensor], scales: dict[str, float], cfg_scale: float | None) -> torch.Tensor:
    """ε̃ = [ε_u + w(ε_c − ε_u) | ε_c] + Σ_k s_k(ε_c − ε̂_k), for contrast branches named as in ``scales``."""
    cond = predictions["cond"]
    out = cond if cfg_scale is None else predictions["uncond"] + cfg_scale * (cond - predictions["uncond"])
    for name, s in scales.items():
        out = out + s * (cond - predictions[name])
    return out
