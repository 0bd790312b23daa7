"""Combination rules: how a term turns its guidance difference into its contribution, for **any** term.

Every term's contribution is k·(D_pos − D_neg): D_pos is the prediction it guides from and D_neg its
"negative" one. CFG: ε_u + w(ε_c − ε_u) = ε_c + (w − 1)(ε_c − ε_u), so k = w − 1, D_pos = ε_c, D_neg = ε_u.
PAG / SEG / SLG: k = s, D_pos = ε_c, D_neg = ε̂. SAG: k = s, D_pos = ε(x_t), D_neg = ε(x̃_t) (of its reference
branch: ε_u under CFG, as its module says). A rule replaces Δ = D_pos − D_neg by a modified Δ', so the
contribution becomes k·Δ'. It is given per term, ``PAG(2.0, rule=APG(eta=0.0))``, ``CFG(5.0,
rule=CFGZeroStar())``, and keeps its state (APG's momentum) per term, reset at the start of each sampling run.

=================  ============================================================  ==================================
rule               Δ' (from Δ = D_pos − D_neg)                                    neutral (bit-identical to no rule)
=================  ============================================================  ==================================
``APG``            Δ̄ = Δ + βΔ̄_prev; Δ̄·min(1, r/‖Δ̄‖); Δ̄⊥ + ηΔ̄∥ (∥ to D_pos)        η = 1, r = None, β = 0
``CFGZeroStar``    D_pos − s*·D_neg, s* = ⟨D_pos, D_neg⟩/‖D_neg‖² per sample;      ``optimized_scale=False``,
                   and ε̃ = 0 on the first ``zero_init_steps`` steps of a run      ``zero_init_steps=0``
=================  ============================================================  ==================================

Norms, inner products and projections are per sample, over all its other dimensions (as the papers' code
and diffusers' guiders). A rule acts only where its term is active (its schedule); zero-init zeroes the whole
guided prediction ε̃ (every term's), at the first steps of a run, whatever the term's schedule, as diffusers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import _check_number


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.ndim))


class Rule:
    """Base of the combination rules (dataclasses): ``bind(context)`` gives the per-term ``BoundRule``."""

    needs_scheduler = False

    @property
    def neutral(self) -> bool:
        """Whether Δ' = Δ exactly: then the term computes k·Δ itself, bit for bit as without a rule."""
        return False

    def bind(self, context) -> "BoundRule":
        return BoundRule(self)


class BoundRule:
    """A rule bound to one term of one denoiser: its state and the step's arithmetic."""

    def __init__(self, rule: Rule):
        self.rule = rule

    @property
    def neutral(self) -> bool:
        return self.rule.neutral

    def reset(self) -> None:
        """A new sampling run starts: forget the state of the last one."""

    def zeroes(self, step_index: int) -> bool:
        """Whether the whole guided prediction is 0 at this step of the run (CFG-Zero*'s zero-init)."""
        return False

    def difference(self, positive: torch.Tensor, negative: torch.Tensor, step) -> torch.Tensor:
        """Δ' from D_pos, D_neg (in the model's prediction space) and the step (x_t, t)."""
        raise NotImplementedError


@dataclass
class APG(Rule):
    """Adaptive projected guidance (Sadat, Hilliges & Weber, ICLR 2025, arXiv 2410.02416), on any term's Δ.

    The paper (section 5 and its Algorithm 1), with Δ = D_pos − D_neg at step t:

    * reverse momentum: Δ̄_t = Δ_t + β·Δ̄_{t−1} (Δ̄ = 0 before the first step of a run);
    * rescaling: Δ̄_t ← Δ̄_t · min(1, r / ‖Δ̄_t‖);
    * projection onto D_pos: Δ∥ = (⟨Δ̄, D_pos⟩/‖D_pos‖²)·D_pos, Δ⊥ = Δ̄ − Δ∥; Δ' = Δ⊥ + η·Δ∥;

    and the term contributes k·Δ' (the paper's CFG: D̂ = D_c + (w − 1)(Δ⊥ + ηΔ∥)).

    ``eta``: η in [0, 1], the weight of the parallel part (the paper recommends 0; 1 keeps it).
    ``norm_threshold``: r > 0, the cap on ‖Δ̄‖ (diffusers' ``adaptive_projected_guidance_rescale``); None or 0
    is no cap.
    ``momentum``: β in (−1, 1); negative is the paper's "reverse momentum" (−0.5, −0.75); 0 is none. The state
    is per term and resets at the start of each sampling run.
    ``space``: where Δ, the cap and the projection live.

    * ``"model"`` (default, as diffusers' ``normalized_guidance``): the model's own prediction (ε, v or flow
      velocity), D = its output.
    * ``"x0"`` (the paper's): the denoised prediction D = x̂₀ = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t (v- and
      x₀-prediction likewise, via the scheduler's ᾱ_t). x̂₀ is affine in the prediction with one gain
      g = ∂x̂₀/∂pred for both branches (ε: −√(1−ᾱ)/√ᾱ), so Δ_x₀ = g·Δ, D_pos = x̂₀(D_pos), and the result goes
      back as Δ' = Δ'_x₀ / g. Needs a scheduler with ``alphas_cumprod`` (DDPM family; not flow matching).

    Reference: diffusers' ``guiders/adaptive_projected_guidance.py`` ``normalized_guidance`` (which equals the
    paper's Algorithm 1 with ``use_original_formulation=True`` and scale w − 1). Its default formulation,
    D_u + w·Δ', differs from the paper's D_c + (w − 1)·Δ' by (1 − η)Δ∥ (and by the cap's effect) and is not
    what pagkit computes; tests/test_rules.py shows both.
    """

    eta: float = 0.0
    norm_threshold: float | None = None
    momentum: float = 0.0
    space: str = "model"

    def __post_init__(self):
        _check_number("APG eta", self.eta)
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"APG eta must be in [0, 1] (0 drops the parallel part, 1 keeps it), got {self.eta!r}")
        if self.norm_threshold is not None:
            _check_number("APG norm_threshold", self.norm_threshold)
            if self.norm_threshold < 0:
                raise ValueError(f"APG norm_threshold must be > 0 (or None / 0 for no cap), got {self.norm_threshold!r}")
        _check_number("APG momentum", self.momentum)
        if not -1.0 < self.momentum < 1.0:
            raise ValueError(f"APG momentum must be in (-1, 1) (negative: reverse momentum; 0: none), "
                             f"got {self.momentum!r}")
        if self.space not in ("model", "x0"):
            raise ValueError(f"APG space must be 'model' (the model's prediction, as diffusers) or 'x0' (the "
                             f"denoised prediction, as the paper), got {self.space!r}")

    @property
    def needs_scheduler(self):
        return self.space == "x0"

    @property
    def neutral(self):
        return self.eta == 1.0 and not self.norm_threshold and self.momentum == 0.0

    def bind(self, context):
        schedule = None
        if self.space == "x0":
            from .sag import NoiseSchedule
            scheduler = getattr(context, "scheduler", None)
            if scheduler is None or not hasattr(scheduler, "alphas_cumprod"):
                raise ValueError("APG(space='x0') needs the sampler's scheduler with alphas_cumprod (DDPM family) "
                                 f"to compute x̂₀; got {type(scheduler).__name__}. Use space='model' otherwise.")
            schedule = NoiseSchedule(scheduler)
        return BoundAPG(self, schedule)


class BoundAPG(BoundRule):
    def __init__(self, rule: APG, schedule):
        super().__init__(rule)
        self.schedule = schedule
        self.average = None  # Δ̄ of the last step (momentum), detached

    def reset(self):
        self.average = None

    def difference(self, positive, negative, step):
        if self.schedule is None:
            return self.update(positive - negative, positive)
        gain = self.schedule.x0_gain(step.t)
        x0_positive, _ = self.schedule.x0_and_eps(step.x, positive, step.t)
        return self.update(gain * (positive - negative), x0_positive) / gain

    def update(self, delta, direction):
        """Δ' = Δ̄⊥ + ηΔ̄∥ relative to ``direction``, after momentum and the norm cap."""
        rule, dims = self.rule, _dims(delta)
        if rule.momentum:
            if self.average is not None and self.average.shape == delta.shape:  # else: a new batch, a new run
                delta = delta + rule.momentum * self.average
            self.average = delta.detach()
        if rule.norm_threshold:
            delta = delta * torch.clamp(rule.norm_threshold / delta.norm(p=2, dim=dims, keepdim=True), max=1.0)
        unit = F.normalize(direction.double(), dim=dims)
        parallel = (delta.double() * unit).sum(dim=dims, keepdim=True) * unit
        return (delta.double() - parallel + rule.eta * parallel).to(delta.dtype)


@dataclass
class CFGZeroStar(Rule):
    """CFG-Zero* (Fan, Zheng, Yeh & Liu 2025, arXiv 2503.18886), on any term's Δ.

    Optimised scale: s* = ⟨v_c, v_u⟩/‖v_u‖² per sample (here ⟨D_pos, D_neg⟩/(‖D_neg‖² + 1e-8)), and the
    negative prediction is scaled by it: Δ' = D_pos − s*·D_neg. For CFG this is the paper's
    v̂ = s*·v_u + w(v_c − s*·v_u) (= v_c + (w − 1)(v_c − s*·v_u)); for PAG, ε_c + s(ε_c − s*·ε̂).
    Zero-init: the whole guided prediction is 0 at the first ``zero_init_steps`` steps of each run (the paper's
    "zero out the first steps of the ODE solver", for flow matching).

    ``optimized_scale``: use s* (True, the paper's); False leaves Δ alone (zero-init only, as the paper's
    guidance-distilled Flux / HunyuanVideo runs).
    ``zero_init_steps``: how many steps are zeroed (int >= 0), as diffusers' ``zero_init_steps`` (default 1
    there). The official code's ``zero_steps=K`` zeroes steps 0..K, i.e. K + 1 of them.

    References: diffusers' ``guiders/classifier_free_zero_star_guidance.py`` (``cfg_zero_star_scale``,
    ``ClassifierFreeZeroStarGuidance``) and WeichenFan/CFG-Zero-star (``optimized_scale``). s* is computed in
    float32, as both do. s* is not neutral: only ``optimized_scale=False, zero_init_steps=0`` is.
    """

    optimized_scale: bool = True
    zero_init_steps: int = 0

    def __post_init__(self):
        if not isinstance(self.optimized_scale, bool):
            raise ValueError(f"CFGZeroStar optimized_scale must be True or False, got {self.optimized_scale!r}")
        if isinstance(self.zero_init_steps, bool) or not isinstance(self.zero_init_steps, int) \
                or self.zero_init_steps < 0:
            raise ValueError(f"CFGZeroStar zero_init_steps must be an integer >= 0 (the number of first steps "
                             f"whose prediction is zeroed), got {self.zero_init_steps!r}")

    @property
    def neutral(self):
        return not self.optimized_scale

    def bind(self, context):
        return BoundCFGZeroStar(self)


class BoundCFGZeroStar(BoundRule):
    def zeroes(self, step_index):
        return step_index < self.rule.zero_init_steps

    def difference(self, positive, negative, step):
        return positive - optimized_scale(positive, negative) * negative


def optimized_scale(positive: torch.Tensor, negative: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """s* = ⟨D_pos, D_neg⟩/(‖D_neg‖² + eps) per sample, in float32, shaped to broadcast over the sample."""
    p, n = positive.flatten(1).float(), negative.flatten(1).float()
    s = (p * n).sum(dim=1) / ((n * n).sum(dim=1) + eps)
    return s.to(positive.dtype).view(-1, *([1] * (positive.ndim - 1)))


RULES: dict[str, type[Rule]] = {"apg": APG, "cfg-zero-star": CFGZeroStar}
