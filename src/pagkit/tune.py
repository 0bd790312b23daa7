"""``pagkit tune``: choose a method's sites, scale, interval (and heads) for one model by successive halving.

**Search space.** Every combination of a site selection (by default each perturbable site alone, from
``pagkit.layers``, named by its shortest alias; ``pairs`` adds every pair of them up front), a scale (a default
grid per method, in the method's own convention: PAG s, SEG γ, SLG s, ...; see ``DEFAULT_SCALES``), an interval
(start, stop) and, for methods with ``heads`` (PAG), optionally each head alone (``heads="each"``). Candidates
that patch the same sites or blocks (two names of one block) are kept once.

**Pairs of the best sites** (``pair_best`` = k >= 2). Instead of every pair up front, after rung 0 the pairs of
its k best single sites (each site ranked by its best setting) join rung 1, at each survivor's scale, interval
and options (a setting of the search space is not added twice). They have no rung-0 samples, so all of their
rung-1 samples are new; the plan counts the most there can be (C(k, 2) x the distinct scale/interval/options
of the space, at most rung 1's survivors), and later rungs keep ⌈n/η⌉ of the settings actually there.

**Heads** (``heads="greedy"``): after the halving, a greedy head search on the winner's sites, as HeadHunter
(arXiv 2506.10978) does, one head per round while the score improves, at most ``max_heads``; each candidate is
measured on the last rung's samples, and the head set replaces the whole layer only if it beats it on those
same seeds (``pagkit.headsearch``). The budget pays for as many rounds as fit at the smallest rung-0 size
(at least one, else the minimum is an error), then the rung-0 size grows.

**Search** (successive halving, Jamieson & Talwalkar 2016; Li et al. 2018, Hyperband's inner loop). Rung r
measures n_r settings on m_r = u·ηʳ samples each (n₀ = every setting, n_{r+1} = ⌈n_r/η⌉, until a rung holds at
most η); the best ⌈n_r/η⌉ go on. The samples of a rung are the first m_r of the next (the noise of shard k is the
same for every setting and sample count: ``pagkit.runner``), so a setting that goes on costs only its m_{r+1}
− m_r new samples. Each rung also measures no guidance on the same samples, as the baseline. The winner of the
last rung is then confirmed against no guidance on a fresh seed set (``confirm_seed_set``), on at least as many
samples as the last rung. u is the largest multiple of the shard size for which all of this (with the pairs and
the head search at their most) fits the budget; what is left goes to the confirmation. ``make_plan`` is that
arithmetic, a pure function: the samples it says are the samples generated (at most, with pairs or heads, whose
count depends on the results; the preset's ``cost_samples`` is what was generated).

**Metric** (lower is better, always): the primary classifier's FD of ``pagkit eval`` (the shipped feature
networks on the shipped models; the second network's FD is reported beside it), Inception FD against
``reference`` (as eval), or a user callable ``score="module:function"`` (or ``"path/file.py:function"``) taking
the images, a (N, C, H, W) tensor in [-1, 1], and returning a number. The spread reported at the confirmation:
the two networks' FD for the classifier metric; the score of each half of the shards (even / odd) otherwise.

**Resumable and distributed.** Each rung is a ``pagkit.evaluate.Sweep``, a task of ``pagkit.runner``, in
``OUT/rung<r>/`` (a head-search round in ``OUT/heads<t>/``, the confirmation in ``OUT/confirm/``), so a killed
tune resumes with nothing recomputed and its shards are dealt to ``torchrun`` ranks; every decision is a
deterministic function of finished results (ties: the earlier setting of the search space). ``OUT/tune.json``
holds the tune's description: another tune in the same folder is an error.

**Outputs**: ``OUT/preset.json`` (``pagkit.presets``; its evidence holds every row of every rung and round, each
with its score and the samples it generated; ``search.heads`` the head search's rounds and verdict),
``OUT/tune.md``, ``OUT/finalists.png``.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import io, runner
from .evaluate import EvalConfig, Sweep, _field_names
from .methods import METHODS
from .presets import PRESET_VERSION

# methods whose sites can be searched: a scale and a ``layers`` (or SAG's one ``layer``) field; CFG, NAG (a negative
# prompt) and AutoGuidance (a weak model) have no sites to choose
TUNABLE = tuple(m for m in METHODS if m not in ("cfg", "nag", "autoguidance")
                and {"layers", "layer"} & _field_names(m))
# default scale grids, in each method's own convention (0 = off for all of these)
DEFAULT_SCALES = {"pag": (0.5, 1.0, 2.0, 3.0), "seg": (0.5, 1.0, 2.0, 3.0), "sag": (0.25, 0.5, 0.75, 1.0),
                  "slg": (1.0, 2.0, 2.8), "stg": (0.5, 1.0, 2.0), "tpg": (1.0, 2.0, 3.0)}
# default intervals: all steps and the first half (SLG: its SD3.5 default and all steps; its interval is open)
DEFAULT_INTERVALS = {"slg": ((0.01, 0.2), (0.0, 1.0))}
_INTERVALS = ((0.0, 1.0), (0.0, 0.5))


@dataclass(frozen=True)
class Plan:
    """A successive-halving plan: ``rungs`` = ((settings, samples each), ...), then the head search (if any), then
    the confirmation. ``added``: settings that join at rung 1 without a rung-0 measurement (pairs of the best
    single sites, at most this many); ``head_pool`` / ``head_rounds``: the greedy head search's pool of heads and
    its most rounds (each candidate is measured on the last rung's samples)."""

    settings: int
    budget: int
    eta: int
    shard_size: int
    rungs: tuple[tuple[int, int], ...]
    confirm_samples: int
    added: int = 0
    head_pool: int = 0
    head_rounds: int = 0

    @property
    def search_cost(self) -> int:
        """New samples of the search: per rung, its settings and the unguided baseline, beyond the last rung's
        (the settings added at rung 1 have no rung-0 samples: all of theirs are new)."""
        cost, before = 0, 0
        for n, m in self.rungs:
            cost += (n + 1) * (m - before)
            before = m
        return cost + (self.added * self.rungs[0][1] if len(self.rungs) > 1 else 0)

    @property
    def head_cost(self) -> int:
        """The head search's samples at most: every round's candidates on the last rung's samples."""
        return head_candidates(self.head_pool, self.head_rounds) * self.rungs[-1][1]

    @property
    def cost(self) -> int:
        """Every sample the tune generates at most (exactly, without pairs or heads): the search, the head
        search, then the winner and no guidance on fresh seeds."""
        return self.search_cost + self.head_cost + 2 * self.confirm_samples

    def describe(self) -> str:
        lines = [f"successive halving, η = {self.eta}: {self.settings} settings, budget {self.budget} samples"]
        before = 0
        for r, (n, m) in enumerate(self.rungs):
            if r == 1 and self.added:
                new = (n + 1) * (m - before) + self.added * before
                lines.append(f"  rung 1: {n - self.added} settings + at most {self.added} pairs of the best single "
                             f"sites + no guidance x {m} samples (at most {new} new)")
            else:
                lines.append(f"  rung {r}: {n} settings + no guidance x {m} samples ({(n + 1) * (m - before)} new)")
            before = m
        if self.head_rounds:
            lines.append(f"  heads: greedy over {self.head_pool} heads, at most {self.head_rounds} rounds x {before} "
                         f"samples per candidate (at most {self.head_cost} new)")
        lines.append(f"  confirm: the winner + no guidance x {self.confirm_samples} samples on a fresh seed set "
                     f"({2 * self.confirm_samples} new)")
        lines.append(f"  total: {'at most ' if self.added or self.head_rounds else ''}{self.cost} samples of the "
                     f"budget's {self.budget}")
        return "\n".join(lines)


def rung_sizes(settings: int, eta: int, added: int = 0) -> list[int]:
    """n₀ = settings, n_{r+1} = ⌈n_r/η⌉ (+ ``added`` at rung 1), until a rung holds at most η settings (its best
    is the winner)."""
    sizes = [settings]
    while sizes[-1] > eta:
        sizes.append(math.ceil(sizes[-1] / eta) + (added if len(sizes) == 1 else 0))
    return sizes


def head_candidates(pool: int, rounds: int) -> int:
    """Candidates of a greedy head search: round t tries each of the pool's heads not yet chosen (pool − t)."""
    return sum(pool - t for t in range(rounds))


def make_plan(settings: int, budget: int, *, eta: int = 3, shard_size: int = 50, added: int = 0,
              head_pool: int = 0, max_heads: int = 0) -> Plan:
    """The plan for ``settings`` candidates within ``budget`` samples (see the module docstring); a budget too
    small for even one shard per setting at rung 0 (and, with a head search, one round of it) is an error that
    says the minimum. The head search gets as many rounds (up to ``max_heads``, below ``head_pool``) as fit at
    one shard per setting; then the rung-0 samples u grow as far as the budget allows."""
    if settings < 1:
        raise ValueError("the search space is empty")
    if not isinstance(eta, int) or eta < 2:
        raise ValueError(f"η (the halving rate) must be an integer >= 2, got {eta!r}")
    if shard_size < 1:
        raise ValueError(f"the shard size must be >= 1, got {shard_size}")
    sizes = rung_sizes(settings, eta, added)
    added = added if len(sizes) > 1 else 0  # one rung: no rung 1 for pairs to join
    last = eta ** (len(sizes) - 1)
    search = Plan(settings, budget, eta, 1, tuple((n, eta ** r) for r, n in enumerate(sizes)), 0, added).search_cost

    def per_shard(rounds: int) -> int:  # samples of the whole tune at u = 1 per shard of the rung-0 samples
        return shard_size * (search + 2 * last + head_candidates(head_pool, rounds) * last)

    most = min(max_heads, head_pool - 1) if head_pool else 0  # a subset: all heads are the whole layer
    rounds = max([r for r in range(1, most + 1) if per_shard(r) <= budget], default=min(most, 1))
    minimum = per_shard(min(most, 1))
    units = budget // per_shard(rounds)  # u = units·shard_size samples per setting at rung 0
    if units < 1:
        extra = (f" + at most {added} pairs at rung 1" if added else "") + \
            (f" and one round of the head search ({head_pool} candidates)" if most else "")
        raise ValueError(f"budget {budget} samples is too small for {settings} settings{extra} ({len(sizes)} rungs, "
                         f"η = {eta}, shards of {shard_size}): the minimum is {minimum} samples; give a larger "
                         "--budget, fewer --layers/--scales/--intervals, or a smaller --shard-size")
    u = units * shard_size
    rungs = tuple((n, u * eta ** r) for r, n in enumerate(sizes))
    plan = Plan(settings, budget, eta, shard_size, rungs, 0, added, head_pool if rounds else 0, rounds)
    rest = budget - plan.search_cost - plan.head_cost
    confirm = rest // (2 * shard_size) * shard_size  # the rest, in whole shards, >= the last rung's
    return replace(plan, confirm_samples=confirm)


def forward_equivalents(config: EvalConfig) -> int:
    """Forward passes per sample (rows per step × steps): one for ε_c, one more at each step where the term acts
    (its perturbed row, or SAG's pass of its own)."""
    terms = config.terms()
    return sum(1 + sum(t.active(i / config.steps) for t in terms) for i in range(config.steps))


def short_name(model, site: str) -> str:
    """The shortest alias of ``site`` that selects it alone (``down.2``, ``mid``, ``up.0.attentions.1``)."""
    from .layers import ALIAS_SEGMENTS, resolve_layers
    parts = site.split(".")
    for short, segments in ALIAS_SEGMENTS.items():
        if parts[0] in segments[1:]:
            parts = [short] + parts[1:]
            break
    for n in range(1, len(parts) + 1):
        candidate = ".".join(parts[:n])
        try:
            if resolve_layers(model, candidate) == [site]:
                return candidate
        except ValueError:
            continue
    return site


def load_score(text: str):
    """The user's scoring callable from ``module:function`` or ``path/to/file.py:function``; one-line errors."""
    target, sep, name = text.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"--score is module:function or path/file.py:function, got {text!r}")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise FileNotFoundError(f"no such file {target}")
            spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except Exception as err:  # noqa: BLE001  (any failure to import is the user's to fix: one line)
        raise ValueError(f"--score {text}: cannot import {target}: {type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--score {text}: {target} has no callable {name!r}")
    return fn


def as_score(value, where: str) -> float:
    """A scoring callable's result as a float: a real number (a 0-d tensor or numpy scalar too), else an error."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "size", None) == 1:  # numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must return a number (lower is better), got {type(value).__name__}: "
                         f"{str(value)[:60]!r}")
    return float(value)


@dataclass
class ScoredSweep(Sweep):
    """A ``Sweep`` whose configurations are scored by a user callable (``metrics["score"]``) instead of FD."""

    score: str = ""  # "module:function"
    score_fn: object = field(default=None, repr=False)

    def feature_space(self) -> dict:
        return {"features": f"score:{self.score}"}

    def metrics(self, images: torch.Tensor) -> dict:
        return {"score": as_score(self.score_fn(images), f"--score {self.score}"), "n": len(images)}

    def tables(self, rows: list[dict]) -> None:  # no FD table: tune.md reports the scores
        pass


@dataclass
class Tune:
    """One tune (see the module docstring). Arguments as ``pagkit tune``'s flags.

    ``layers``: candidate site selections (each a list of names/aliases; None: every site alone); ``pairs``: add
    every pair of them; ``pair_best`` (k >= 2, 0 = off): after rung 0, add the pairs of its k best single sites at
    the survivors' scales and intervals. ``scales`` / ``intervals``: None for the method's defaults. ``heads``
    (methods with a ``heads`` field): ``"each"`` (or True) also searches each head of each candidate alone;
    ``"greedy"`` grows a head set on the winner's sites after the halving (``pagkit.headsearch``), at most
    ``max_heads`` heads (default 4). ``score``: a user callable ``module:function`` (lower is better) instead of
    FD; ``inception``/``reference``: Inception FD against real images.
    """

    model: str
    method: str
    out: Path
    budget: int
    layers: list[list[str]] | None = None
    pairs: bool = False
    scales: list[float] | None = None
    intervals: list[tuple[float, float]] | None = None
    heads: bool | str = False
    max_heads: int | None = None
    pair_best: int = 0
    eta: int = 3
    shard_size: int = 50
    seed_set: int = 0
    confirm_seed_set: int = 1
    scheduler: str = "ddim"
    steps: int = 20
    classifier: str | None = None
    classifier_b: str | None = None
    inception: str | None = None
    reference: str | None = None
    num_real: int = 10000
    score: str | None = None
    threads: int | None = None
    progress: bool = True
    _models: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.out = Path(self.out)
        if self.method not in TUNABLE:
            raise ValueError(f"pagkit tune cannot choose sites for {self.method!r}; choose one of {', '.join(TUNABLE)}")
        if self.score and self.inception:
            raise ValueError("--score and --inception are two metrics: give one")
        if self.heads is True:
            self.heads = "each"
        if self.heads not in (False, None, "each", "greedy"):
            raise ValueError(f"--heads is each or greedy, got {self.heads!r}")
        if self.heads and "heads" not in _field_names(self.method):
            raise ValueError(f"--heads: {self.method} has no heads option; methods with heads: "
                             f"{', '.join(m for m in TUNABLE if 'heads' in _field_names(m))}")
        if self.max_heads is not None and (isinstance(self.max_heads, bool) or not isinstance(self.max_heads, int)
                                           or self.max_heads < 1):
            raise ValueError(f"--max-heads must be a positive integer, got {self.max_heads!r}")
        if self.max_heads is not None and self.heads != "greedy":
            raise ValueError("--max-heads bounds the greedy head search: give it with --heads greedy")
        if self.heads == "greedy" and self.max_heads is None:
            self.max_heads = 4
        if isinstance(self.pair_best, bool) or not isinstance(self.pair_best, int) or self.pair_best == 1 \
                or self.pair_best < 0:
            raise ValueError(f"--pair-best is how many of rung 0's best single sites to pair: 0 (off) or >= 2, "
                             f"got {self.pair_best!r}")
        if self.pair_best and "layers" not in _field_names(self.method):
            raise ValueError(f"--pair-best: {self.method} acts on one layer, so its sites cannot be paired")
        self.score_fn = load_score(self.score) if self.score else None
        if self.seed_set == self.confirm_seed_set:
            raise ValueError(f"the confirmation needs a fresh seed set: --confirm-seed-set {self.confirm_seed_set} "
                             f"equals --seed-set")

    # --- the search space -------------------------------------------------------------------------------
    def _model(self):
        if self.model not in self._models:
            from .load import load_model
            self._models[self.model] = load_model(self.model)
        return self._models[self.model]

    def space(self) -> list[EvalConfig]:
        """Every setting, in search order (num_samples 0: each rung sets its own); bad names fail here."""
        from .backends import detect
        from .denoise import GuidedDenoiser
        from .layers import layers as all_layers
        from .load import load_scheduler
        model = self._model()
        scheduler = load_scheduler(self.model, self.scheduler)
        neutral = METHODS[self.method].neutral
        scales = list(self.scales or DEFAULT_SCALES.get(self.method, (0.5, 1.0, 2.0, 3.0)))
        for s in scales:
            if s == neutral:
                raise ValueError(f"scale {s:g} is {self.method}'s neutral scale (no guidance), which every rung "
                                 "measures anyway as its baseline; leave it out of --scales")
        intervals = list(self.intervals or DEFAULT_INTERVALS.get(self.method, _INTERVALS))
        if self.layers is not None:
            candidates = [tuple(c) for c in self.layers]
        else:
            candidates = [(short_name(model, info.name),) for info in all_layers(model)]
        if self.pairs:
            singles = list(dict.fromkeys(name for c in candidates for name in c))
            candidates += [a + b for a, b in itertools.combinations([(s,) for s in singles], 2)]
        base = EvalConfig(model=self.model, method=self.method, scheduler=self.scheduler, steps=self.steps,
                          num_samples=0, seed_set=self.seed_set)
        field_name = "layers" if "layers" in _field_names(self.method) else "layer"
        backend, seen, sites = detect(model), set(), []
        for c in candidates:  # each names something, and two names of the same blocks count once
            if field_name == "layer" and len(c) != 1:
                raise ValueError(f"{self.method} acts on one layer; got the set {'+'.join(c)}")
            term = replace(base, layers=c, scale=scales[0], start=intervals[0][0], stop=intervals[0][1]).terms()[0]
            bound = GuidedDenoiser(model, [term], scheduler=scheduler).methods[0]
            what = frozenset(getattr(bound, "patches", None) or c)
            if what not in seen:
                seen.add(what)
                sites.append(c)
        head_sets: list[tuple] = [()]
        if self.heads == "each":
            counts = {s.name: s.heads for s in backend.sites(model)}
            fewest = min(counts.values())
            head_sets += [(("heads", str(h)),) for h in range(fewest)] if fewest > 1 else []
        configs = [replace(base, layers=c, scale=s, start=i[0], stop=i[1], options=h)
                   for c in sites for s in scales for i in intervals for h in head_sets]
        for config in configs:  # every setting binds to the model (scales, intervals, heads) before any sampling
            GuidedDenoiser(model, config.terms(), scheduler=scheduler)
        return configs

    def site_heads(self, layers: tuple[str, ...]) -> int:
        """Heads of a site selection: the fewest of its sites (a head index is used at every site)."""
        from .backends import detect
        from .layers import resolve_layers
        model = self._model()
        counts = {s.name: s.heads for s in detect(model).sites(model)}
        return min((counts[name] or 1) for name in resolve_layers(model, list(layers)))

    def pairs_bound(self, configs: list[EvalConfig]) -> int:
        """The most settings ``pair_best`` adds at rung 1: each pair of the k best single sites, at each distinct
        (scale, interval, options) of the survivors."""
        if not self.pair_best or not isinstance(self.eta, int) or self.eta < 2:  # a bad η: make_plan says so
            return 0
        sizes = rung_sizes(len(configs), self.eta)
        if len(sizes) < 2:
            return 0
        singles = {c.layers for c in configs if len(c.layers) == 1}
        combos = {(c.scale, c.start, c.stop, c.options) for c in configs}
        return math.comb(min(self.pair_best, len(singles)), 2) * min(sizes[1], len(combos))

    def head_pool(self, configs: list[EvalConfig]) -> int:
        """The largest pool of heads the greedy search may get (the most heads of any candidate's sites)."""
        if self.heads != "greedy":
            return 0
        pool = max(self.site_heads(layers) for layers in {c.layers for c in configs})
        if pool < 2:
            raise ValueError(f"--heads greedy: the candidate sites have {pool} head each, so no head subset differs "
                             "from the whole layer; leave out --heads")
        return pool

    def plan(self, configs: list[EvalConfig] | None = None) -> Plan:
        configs = configs if configs is not None else self.space()
        return make_plan(len(configs), self.budget, eta=self.eta, shard_size=self.shard_size,
                         added=self.pairs_bound(configs), head_pool=self.head_pool(configs),
                         max_heads=self.max_heads or 0)

    # --- running ----------------------------------------------------------------------------------------
    def _sweep(self, folder: Path, configs: list[EvalConfig]) -> Sweep:
        common = dict(shard_size=self.shard_size, threads=self.threads, progress=self.progress, _models=self._models)
        if self.score:
            return ScoredSweep(folder, configs, score=self.score, score_fn=self.score_fn, **common)
        sweep = Sweep(folder, configs, classifier=self.classifier, classifier_b=self.classifier_b,
                      inception=self.inception, reference=self.reference, num_real=self.num_real, **common)
        if hasattr(self, "_ref"):  # the real images' features, computed once for every rung
            sweep._ref, sweep._ref_b = self._ref
        return sweep

    def _keep_reference(self, sweep: Sweep) -> None:
        if not self.score and hasattr(sweep, "_ref"):
            self._ref = (sweep._ref, getattr(sweep, "_ref_b", None))

    def check_score(self) -> None:
        """Call the user's callable once on noise images of the model's shape: a non-number fails now."""
        model = self._model()
        size = model.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        probe = torch.rand(4, model.config.in_channels, *size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        as_score(self.score_fn(probe), f"--score {self.score}")

    def record(self, configs: list[EvalConfig], plan: Plan) -> dict:
        """What this tune is, claimed in OUT/tune.json: another tune in the same folder is refused."""
        metric = f"score:{self.score}" if self.score else (f"inception:{Path(self.inception).name}" if self.inception
                                                           else "classifier-fd")
        # the plan's pair and head fields only where they are used: a tune begun before they existed still resumes
        extras = ("added", "head_pool", "head_rounds")
        record = {"model": self.model, "method": self.method, "settings": [c.key for c in configs],
                  "plan": {k: v for k, v in dataclasses.asdict(plan).items() if v or k not in extras},
                  "seed_set": self.seed_set, "confirm_seed_set": self.confirm_seed_set, "metric": metric,
                  "reference": self.reference, "num_real": self.num_real}
        if self.heads == "greedy":
            record["max_heads"] = self.max_heads
        if self.pair_best:
            record["pair_best"] = self.pair_best
        return json.loads(json.dumps(record))  # as it reads back (lists, not tuples)

    def run(self) -> dict | None:
        """Search, confirm, write the outputs; returns the preset (None on ranks other than 0)."""
        configs = self.space()
        plan = self.plan(configs)
        if self.score:
            self.check_score()
        else:
            self._sweep(self.out, configs[:1])  # checks the feature networks and the reference; writes nothing
        rank, world = runner.rank_world()
        with runner.world_lock(self.out, rank, world):  # one tune per --out
            refusal = None
            if rank == 0:
                print(plan.describe())
                print(f"  ≤ {max(map(forward_equivalents, configs))} forward-pass equivalents per guided sample "
                      f"({self.steps} for no guidance)")
                try:
                    runner.claim(self.out / "tune.json", self.record(configs, plan), lambda old: (
                        f"{self.out} holds another tune ({old['method']} on {old['model']}, "
                        f"{len(old['settings'])} settings, budget {old['plan']['budget']}): choose another --out"))
                except ValueError as err:
                    refusal = err
            runner.refuse_together(refusal, rank, world)  # every rank stops, none waits at a barrier
            return self._search(configs, plan, rank, world)

    def _search(self, configs: list[EvalConfig], plan: Plan, rank: int, world: int) -> dict | None:
        """Successive halving over the rungs (pairs of the best sites join at rung 1), the greedy head search on
        the winner, then the confirmation on fresh seeds."""
        none = replace(configs[0], method="none", scale=0.0, layers=(), start=0.0, stop=1.0, options=())
        configs, searched = list(configs), len(configs)
        alive, evidence, rungs, previous, had = list(range(len(configs))), [], [], None, {}
        for r, (n, m) in enumerate(plan.rungs):
            assert len(alive) <= n
            rows = [replace(none, num_samples=m)] + [replace(configs[i], num_samples=m) for i in alive]
            sweep = self._sweep(self.out / f"rung{r}", rows)
            if rank == 0 and previous is not None:
                _reuse_shards(previous, sweep, rows)
            runner.barrier(world)
            sweep.run()
            self._keep_reference(sweep)
            runner.barrier(world)  # rank 0 has scored the rung
            results = [self._result(sweep, c) for c in rows]
            base = results[0]
            for i, config, res in zip(alive, rows[1:], results[1:]):
                evidence.append(self._evidence(r, config, res, base, m - had.get(i, 0)))
                if i >= searched:
                    evidence[-1]["origin"] = "a pair of rung 0's best single sites"
                had[i] = m
            evidence.append(self._evidence(r, rows[0], base, base, m - (plan.rungs[r - 1][1] if r else 0)))
            order = sorted(range(len(alive)), key=lambda j: (_rank_key(results[j + 1]["score"]), alive[j]))
            keep = math.ceil(len(alive) / self.eta) if r + 1 < len(plan.rungs) else 1
            kept = [alive[j] for j in order[:keep]]
            if r == 0 and plan.added:  # the pairs of the best single sites join the survivors
                pairs = self._best_pairs(configs, alive, [res["score"] for res in results[1:]], kept)
                kept += range(len(configs), len(configs) + len(pairs))
                configs += pairs
            rungs.append({"rung": r, "samples": m, "settings": [_spec(configs[i]) for i in alive],
                          "kept": [_spec(configs[i]) for i in kept]})
            finals, alive, previous = [configs[i] for i in alive], kept, sweep
            last = dict(zip(rows, results))
        winner, chosen_sweep, heads = configs[alive[0]], previous, None
        if self.heads == "greedy":
            from .headsearch import greedy_heads
            m = plan.rungs[-1][1]
            heads = greedy_heads(self, winner, plan, last[replace(none, num_samples=m)],
                                 last[replace(winner, num_samples=m)], rank, world)
            evidence += heads["evidence"]
            winner, chosen_sweep = heads["config"], heads["sweep"] or previous
        confirm_rows = [replace(none, num_samples=plan.confirm_samples, seed_set=self.confirm_seed_set),
                        replace(winner, num_samples=plan.confirm_samples, seed_set=self.confirm_seed_set)]
        sweep = self._sweep(self.out / "confirm", confirm_rows)
        sweep.run()
        runner.barrier(world)
        if rank != 0:
            return None
        confirmation = self._confirm(sweep, confirm_rows)
        preset = self._preset(winner, plan, evidence, rungs, confirmation, heads and heads["record"])
        io.write_json(self.out / "preset.json", preset)
        grid = [(previous, c) for c in [none] + finals]
        if chosen_sweep is not previous:  # the chosen head set beside the whole-layer finalists
            grid.append((chosen_sweep, winner))
        self._grid(grid, plan.rungs[-1][1])
        with io.atomic_path(self.out / "tune.md") as tmp:
            tmp.write_text(tune_markdown(preset, plan))
        print((self.out / "tune.md").read_text())
        return preset

    def _best_pairs(self, configs: list[EvalConfig], measured: list[int], scores: list[float],
                    survivors: list[int]) -> list[EvalConfig]:
        """The settings ``pair_best`` adds after rung 0: every pair of its k best single sites (ranked by each
        site's best setting; in the search space's order within a pair), at each survivor's scale, interval
        and options; a setting of the search space is not added again."""
        best: dict[tuple, tuple] = {}
        for i, score in zip(measured, scores):
            if len(configs[i].layers) == 1:
                best[configs[i].layers] = min(best.get(configs[i].layers, (math.inf, i)), (_rank_key(score), i))
        top = sorted(sorted(best, key=best.get)[:self.pair_best], key=lambda site: best[site][1])
        known, out = {replace(c, num_samples=0).key for c in configs}, []
        for a, b in itertools.combinations(top, 2):
            for i in survivors:
                pair = replace(configs[i], layers=a + b, num_samples=0)
                if pair.key not in known:
                    known.add(pair.key)
                    out.append(pair)
        return out

    # --- results --------------------------------------------------------------------------------------
    def _result(self, sweep: Sweep, config: EvalConfig) -> dict:
        record = io.read_json(sweep.result_path(config))
        if "failed" in record:
            return {"score": math.inf, "failed": record["failed"], "metrics": {}}
        metrics = record["metrics"]
        return {"score": metrics["score"] if self.score else metrics["fd"], "metrics": metrics}

    def _evidence(self, r: int | None, config: EvalConfig, res: dict, base: dict, new: int) -> dict:
        """One row of the evidence table; ``new``: the samples it generated (beyond an earlier rung's)."""
        from .spec import format_spec
        row = {"rung": r} if r is not None else {}
        row.update({"spec": format_spec(config.terms()), "key": config.key, "samples": config.num_samples,
                    "new_samples": new, "seed_set": config.seed_set, "score": res["score"],
               "change_pct": _change(res["score"], base["score"]),
                    "forward_equivalents": forward_equivalents(config)})
        if "fd_b" in res["metrics"]:
            row["fd_b"] = res["metrics"]["fd_b"]
            row["change_b_pct"] = _change(res["metrics"]["fd_b"], base["metrics"].get("fd_b"))
        if "failed" in res:
            row["failed"] = res["failed"]
        return row

    def _confirm(self, sweep: Sweep, rows: list[EvalConfig]) -> dict:
        from .spec import format_spec
        none, guided = (self._result(sweep, c) for c in rows)
        out = {"seed_set": self.confirm_seed_set, "samples": rows[0].num_samples, "spec": format_spec(rows[1].terms()),
               "none": none["score"], "tuned": guided["score"], "change_pct": _change(guided["score"], none["score"])}
        if "fd_b" in guided["metrics"]:  # the spread: the second network's verdict
            out.update(none_b=none["metrics"]["fd_b"], tuned_b=guided["metrics"]["fd_b"],
                       change_b_pct=_change(guided["metrics"]["fd_b"], none["metrics"]["fd_b"]))
            out["spread"] = "the two feature networks"
        elif "failed" not in guided:  # the spread: the score of each half of the shards
            halves = [[self._half_score(sweep, c, h) for h in (0, 1)] for c in rows]
            out.update(none_halves=halves[0], tuned_halves=halves[1], spread="even / odd shards")
        out["confirmed"] = all(v is not None and v < 0 for v in (out["change_pct"], out.get("change_b_pct", -1)))
        return out

    def _half_score(self, sweep: Sweep, config: EvalConfig, half: int) -> float | None:
        """The metric on the even (0) or odd (1) shards only."""
        ks = range(half, sweep.num_shards(config), 2)
        if not ks:
            return None
        images = sweep.unit_images(config, ks)
        if self.score:
            return as_score(self.score_fn(images), f"--score {self.score}")
        return sweep.metrics(images)["fd"]

    def _preset(self, winner: EvalConfig, plan: Plan, evidence, rungs, confirmation, heads=None) -> dict:
        from .backends import detect
        from .spec import format_spec
        model = self._model()
        return {"pagkit_preset": PRESET_VERSION, "method": self.method, "spec": format_spec(winner.terms()),
                "model": self.model, "family": detect(model).name, "model_class": type(model).__name__,
                "sampler": {"scheduler": self.scheduler, "steps": self.steps},
                "metric": io.read_json(self.out / "tune.json")["metric"], "lower_is_better": True,
                "search": {**dataclasses.asdict(plan), "planned_samples": plan.cost,
                           "cost_samples": sum(e["new_samples"] for e in evidence) + 2 * confirmation["samples"],
                           "cost_forward_equivalents": sum(e["forward_equivalents"] * e["new_samples"]
                                                           for e in evidence)
                           + confirmation["samples"] * (self.steps + forward_equivalents(winner)),
                           "rungs": rungs, **({"heads": heads} if heads else {})},
                "evidence": evidence, "confirmation": confirmation}

    def _grid(self, rows: list[tuple[Sweep, EvalConfig]], samples: int) -> None:
        """finalists.png: each (sweep, setting)'s first samples at ``samples`` (the last rung's)."""
        from .report import labelled_grid
        from .spec import label
        grid = []
        for sweep, config in rows:
            config = replace(config, num_samples=samples)
            path = sweep.shard_path(config, 0)
            if path.is_file():
                images = sweep.unit_images(config, range(min(sweep.num_shards(config), math.ceil(16 / self.shard_size))))
                grid.append((label(config.terms()).replace(" (", "\n("), images[:16]))
        if grid:
            labelled_grid(grid, self.out / "finalists.png", zoom=2, label_width=230)


def _spec(config: EvalConfig) -> str:
    from .spec import format_spec
    return format_spec(config.terms())


def _rank_key(score: float) -> float:
    return math.inf if score is None or math.isnan(score) else score


def _change(value, base) -> float | None:
    if value is None or base is None or not math.isfinite(value) or not base:
        return None
    return 100 * (value - base) / base


def _reuse_shards(previous: Sweep, sweep: Sweep, rows: list[EvalConfig]) -> None:
    """Give each setting of this rung the shards it already has from the previous rung (the same noise)."""
    for config in rows:
        before = next((c for c in previous.configs if replace(c, num_samples=0) == replace(config, num_samples=0)),
                      None)
        if before is None:
            continue
        for k in range(previous.num_shards(before)):
            source, target = previous.shard_path(before, k), sweep.shard_path(config, k)
            if source.is_file() and not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source, target)
                except OSError:
                    with io.atomic_path(target) as tmp:
                        shutil.copyfile(source, tmp)


def _fmt(value, how: str = ".4g") -> str:
    return "—" if value is None else (f"{value:+.1f}%" if how == "%" else f"{value:{how}}")


def tune_markdown(preset: dict, plan: Plan) -> str:
    """tune.md: the plan, every setting tried by rung (then by head-search round), the winner and its
    confirmation."""
    c = preset["confirmation"]
    search = preset["search"]
    has_b = any("fd_b" in e for e in preset["evidence"])
    lines = [f"# pagkit tune: {preset['method']} on {preset['model']} ({preset['family']} family)", "",
             f"Metric: {preset['metric']} (lower is better). Budget {plan.budget} samples; used {search['cost_samples']} "
             f"samples, {search['cost_forward_equivalents']} forward-pass equivalents (rows per step × steps).", "",
             "```", plan.describe(), "```", "",
             f"**Chosen**: `{preset['spec']}`.", ""]
    if "heads" in search:
        h = search["heads"]
        lines += [f"**Heads** (greedy, on the winner's sites, {h['samples']} samples of seed set {h['seed_set']}; "
                  f"stopped at {h['stop']}): {h['verdict']}.", ""]
    lines.append(f"**Confirmation** on fresh seed set {c['seed_set']}, {c['samples']} samples each: no guidance "
                 f"{_fmt(c['none'])}, tuned {_fmt(c['tuned'])} ({_fmt(c['change_pct'], '%')})")
    if "tuned_b" in c:
        lines[-1] += (f"; second network: {_fmt(c['none_b'])} → {_fmt(c['tuned_b'])} ({_fmt(c['change_b_pct'], '%')})")
    elif "tuned_halves" in c:
        lines[-1] += (f"; even / odd shards: no guidance {', '.join(map(_fmt, c['none_halves']))}, tuned "
                      f"{', '.join(map(_fmt, c['tuned_halves']))}")
    lines[-1] += ". " + ("Confirmed: better than no guidance." if c["confirmed"] else
                         "NOT confirmed: not better than no guidance on the fresh seeds.")
    header = ["rung", "setting", "samples", "score", "vs none"] + (["FD (b)", "vs none (b)"] if has_b else []) + \
        ["fwd/sample"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in sorted(preset["evidence"], key=lambda e: (e.get("round", -1), e.get("rung", 0), _rank_key(e["score"]))):
        cells = [e["rung"] if "rung" in e else f"heads {e['round']}", f"`{e['spec']}`", e["samples"],
                 _fmt(e["score"]) if "failed" not in e else "failed",
                 _fmt(e["change_pct"], "%")]
        if has_b:
            cells += [_fmt(e.get("fd_b")), _fmt(e.get("change_b_pct"), "%")]
        lines.append("| " + " | ".join(map(str, cells + [e["forward_equivalents"]])) + " |")
    return "\n".join(lines) + "\n"
