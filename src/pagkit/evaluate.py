"""Resumable, shardable sweeps: methods × scales × layers × perturbations × intervals × seed sets.

Layout of a sweep folder::

    OUT/shards/<config>/<k>.safetensors   the k-th shard of samples (atomic; metadata: seconds)
    OUT/results/<config>.json             one finished configuration: its full description + metrics
    OUT/results.{csv,json,md}, OUT/plots/*.png, OUT/grids/<config>.png   rebuilt from results/

Metrics (``results/<config>.json`` → ``metrics``): ``fd``, ``kid`` (``kid_std``), ``is``, ``precision``,
``recall`` and the saturation measures on the primary feature network (the shipped ``fmnist-classifier``,
or ``classifier``/``inception``), and ``fd_b``, ``kid_b`` (``kid_std_b``) on the second one (the shipped
``fmnist-classifier-b``: another architecture, another seed), which ``feature_space.json`` records as
``features_b``. With Inception features there is no second network, and no ``*_b`` keys.

A sweep is a task of ``pagkit.runner`` (its units: the configurations): a killed sweep, run again, skips
every finished shard and configuration. The noise of shard k of seed set s is the same for every
configuration (generator seed = 1_000_003·s + k), so configurations are compared on the same draws.
Under ``torchrun`` shards are dealt to ranks (gloo on CPU, nccl on GPUs); rank 0
computes the metrics once all shards exist, so the numbers do not depend on
how many processes made them.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import guidance as G  # noqa: F401  (kept for callers that reach pagkit.evaluate.G)
from . import io, runner
from .defaults import NULL_CLASS
from .denoise import NonFiniteGuidance
from .methods import METHODS
from .runner import world_lock  # noqa: F401  (moved to pagkit.runner; kept for callers that import it from here)


# A shard is sampled MICRO_BATCH samples at a time where that gives the same samples (_chunks_are_exact): on a
# CPU a batch of 250 (500 rows under PAG) leaves the cache, and chunks of 50 sample the same shard 1.5-1.9x faster
# (equal to the whole batch to float rounding: 0 to 2e-5 measured). The shard, its noise and its seeds are unchanged.
MICRO_BATCH = 50


def _chunks_are_exact(config: "EvalConfig") -> bool:
    """Whether sampling a shard in chunks gives its samples: a deterministic sampler (DDIM, η = 0: the generator
    is not drawn from after the initial noise, which is drawn for the whole shard first) and no term drawing
    random numbers of the batch's shape (PAG's mask and logit-noise perturbations)."""
    return config.scheduler == "ddim" and not any(getattr(t, "perturbation", "identity") in ("mask", "noise")
                                                  for t in config.terms())


@dataclass(frozen=True)
class EvalConfig:
    """One row of a results table: everything that produced its samples."""

    model: str
    method: str  # none, a name of pagkit.methods.METHODS, or cfg+<name> (e.g. cfg+pag)
    scale: float = 0.0  # the guided method's scale (PAG s / SEG γ / SAG s / SLG s: the papers' conventions)
    cfg_scale: float = 1.0  # CFG w (1 = off)
    layers: tuple[str, ...] = ()
    perturbation: str = "identity"
    sigma: float = math.inf  # SEG
    start: float = 0.0
    stop: float = 1.0
    scheduler: str = "ddim"
    steps: int = 20
    num_samples: int = 2000
    seed_set: int = 0
    timestep_spacing: str | None = None  # None: the model's own scheduler config (leading for the shipped ones)
    options: tuple[tuple[str, str], ...] = ()  # further fields of the guided method, as text (pagkit.spec)

    @property
    def guided(self) -> str | None:
        """The method whose scale is ``scale`` (``pag`` of ``cfg+pag``); None for none and CFG alone."""
        name = self.method.split("+")[-1]
        return None if name in ("none", "cfg") else name

    @property
    def key(self) -> str:
        parts = [Path(self.model).name, self.method]
        if self.method != "none":
            fields = _field_names(self.guided) if self.guided else set()
            if "cfg" in self.method:
                parts.append(f"w{self.cfg_scale:g}")
            if self.guided:
                parts.append(f"s{self.scale:g}")
            if self.layers:
                parts.append("L" + "+".join(self.layers))
            if "perturbation" in fields and self.perturbation != "identity":
                parts.append(self.perturbation)
            if "sigma" in fields:
                parts.append(f"sigma{self.sigma:g}")
            if (self.start, self.stop) != (0.0, 1.0):
                parts.append(f"t{self.start:g}-{self.stop:g}")
            parts += [f"{k}{v}" for k, v in self.options]
        sampler = f"{self.scheduler}{self.steps}" + (f"-{self.timestep_spacing}" if self.timestep_spacing else "")
        parts += [sampler, f"n{self.num_samples}", f"seed{self.seed_set}"]
        return runner.safe_name("_".join(parts))

    def terms(self) -> list:
        """The guidance terms of this row, read off the methods themselves (``pagkit.methods.METHODS``).

        Each term takes the row's value of every field it has (``layers``, SAG's one ``layer``, PAG's
        ``perturbation``, SEG's ``sigma``, and the ``options``); CFG's scale is ``cfg_scale``, every other
        term's ``scale``; the interval goes to the guided term (to CFG only when it is alone).
        """
        if self.method == "none":
            return []
        names = _method_names(self.method)
        layers = list(self.layers) or ["mid"]
        values = {"layers": layers, "layer": layers[0], "perturbation": self.perturbation, "sigma": self.sigma}
        out = []
        for name in names:
            cls = METHODS[name]
            fields = _field_names(name)
            if name == "cfg":
                options = {} if len(names) > 1 else {"start": self.start, "stop": self.stop}
                out.append(cls(self.cfg_scale, **options))
                continue
            options = {k: v for k, v in values.items() if k in fields}
            options.update(start=self.start, stop=self.stop)
            from .spec import parse_term
            extra = parse_term(f"{name}:" + ",".join(f"{k}={v}" for k, v in self.options)) if self.options else None
            options.update({k: getattr(extra, k) for k, _ in self.options})
            out.append(cls(self.scale, **options))
        return out


def _field_names(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(METHODS[method])}


def _method_names(method: str) -> list[str]:
    """``pag`` → [pag]; ``cfg+pag`` → [cfg, pag]; anything else is an error naming the valid ones."""
    names = method.split("+")
    if not (all(n in METHODS for n in names) and (len(names) == 1 or (len(names) == 2 and names[0] == "cfg"
                                                                      and names[1] != "cfg"))):
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(EVAL_METHODS)}")
    return names


# the methods a sweep row can name: none, each method alone, and CFG with any other one
EVAL_METHODS = ("none", *METHODS, *(f"cfg+{m}" for m in METHODS if m != "cfg"))


def expand(model: str, methods: list[str], *, scales=(3.0,), cfg_scales=(3.0,), layer_sets=(("mid",),),
           perturbations=("identity",), sigmas=(math.inf,), intervals=((0.0, 1.0),), sag_layers=("mid",),
           seed_sets=(0,), scheduler="ddim", steps=20, num_samples=2000,
           timestep_spacing: str | None = None, options: dict[str, str] | None = None) -> list[EvalConfig]:
    """The cartesian product of the sweep's axes, per method: each method takes the axes it has fields for
    (``layers`` ← ``layer_sets``, a single ``layer`` ← ``sag_layers``, ``perturbation``, ``sigma``), in the
    order w, s, layers, perturbation, σ, interval. ``options`` (field → text) go to every guided method that
    has the field; one that names a field no chosen method has is an error.

    ``timestep_spacing`` equal to the model's own (its scheduler config's) is stored as None, so that a
    configuration has one key whether its spacing was named or left to the default.
    """
    if timestep_spacing is not None:
        from .load import TIMESTEP_SPACINGS, default_timestep_spacing
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep spacing {timestep_spacing!r}; choose one of "
                             f"{', '.join(TIMESTEP_SPACINGS)}")
        if timestep_spacing == default_timestep_spacing(model, scheduler):
            timestep_spacing = None
    options = dict(options or {})
    guided = [n[-1] for n in (_method_names(m) for m in methods if m != "none") if n[-1] != "cfg"]
    for key in options:
        if not any(key in _field_names(m) for m in guided):
            raise ValueError(f"option {key!r} is a field of none of the methods {', '.join(guided) or '(none)'}")
    base = EvalConfig(model=model, method="none", scheduler=scheduler, steps=steps, num_samples=num_samples,
                      timestep_spacing=timestep_spacing)
    configs = []
    for seed_set in seed_sets:
        b = replace(base, seed_set=seed_set)
        for method in methods:
            if method == "none":
                configs.append(b)
                continue
            names = _method_names(method)
            if names == ["cfg"]:
                configs += [replace(b, method="cfg", cfg_scale=w) for w in cfg_scales]
                continue
            fields = _field_names(names[-1])
            layer_axis = ([tuple(L) for L in layer_sets] if "layers" in fields else
                          [(L,) for L in sag_layers] if "layer" in fields else [()])
            mine = tuple((k, v) for k, v in options.items() if k in fields)
            configs += [replace(b, method=method, cfg_scale=w, scale=s, layers=L, perturbation=p, sigma=sig,
                                start=i[0], stop=i[1], options=mine)
                        for w in (cfg_scales if names[0] == "cfg" else (1.0,)) for s in scales for L in layer_axis
                        for p in (perturbations if "perturbation" in fields else ("identity",))
                        for sig in (sigmas if "sigma" in fields else (math.inf,)) for i in intervals]
    return list(dict.fromkeys(configs))  # scale-0 duplicates etc. collapse


@dataclass
class Sweep(runner.Task):
    """A sweep on ``pagkit.runner``: one unit per configuration, scored on the feature networks."""

    out: Path
    configs: list[EvalConfig]
    shard_size: int = 250
    classifier: str | None = None  # folder of the feature classifier (default: the shipped one)
    classifier_b: str | None = None  # folder of the second feature network (default: fmnist-classifier-b)
    second_network: bool = True  # also measure fd_b / kid_b (never with ``inception``)
    inception: str | None = None  # FID InceptionV3 weights (.safetensors): its features instead of the classifier's
    reference: str | None = None  # real images (folder or .safetensors); default: the Fashion-MNIST test set
    num_real: int = 10000
    threads: int | None = None
    max_new_shards: int | None = None  # stop after this many new shards (for tests: a "kill")
    progress: bool = True
    _models: dict = field(default_factory=dict, repr=False)

    failures = (NonFiniteGuidance,)  # a configuration whose guidance goes NaN/inf is recorded as failed

    def __post_init__(self):
        if self.inception:  # a missing file fails now, not after the sampling
            from .inception import check_weights_path
            check_weights_path(self.inception)
        else:
            from .metrics import check_classifier, second_classifier_dir
            check_classifier(self.classifier)
            if self.measures_b:
                check_classifier(self.classifier_b or second_classifier_dir())
        if self.reference and not Path(self.reference).exists():
            raise io.InputNotFound(f"no reference images at {self.reference}: give a folder of images or a "
                                    ".safetensors file with an 'images' tensor")

    @property
    def measures_b(self) -> bool:
        return self.second_network and not self.inception

    def feature_space(self) -> dict:
        """What the metrics are measured on; one output folder holds one feature space (both networks)."""
        space = {"features": f"inception:{Path(self.inception).name}" if self.inception
                 else f"classifier:{Path(self.classifier).name if self.classifier else 'fmnist-classifier'}"}
        if self.measures_b:
            name_b = Path(self.classifier_b).name if self.classifier_b else "fmnist-classifier-b"
            space["features_b"] = f"classifier:{name_b}"
        return {**space, "reference": str(self.reference) if self.reference else "fashion-mnist test",
                "num_real": self.num_real}

    # --- the runner's task: units = configurations, OUT/shards/<key>/, OUT/results/<key>.json ---------------
    def units(self) -> list[EvalConfig]:
        return self.configs

    def key(self, config: EvalConfig) -> str:
        return config.key

    def num_shards(self, config: EvalConfig) -> int:
        return math.ceil(config.num_samples / self.shard_size)

    def _model(self, name: str):
        if name not in self._models:
            from .load import load_model
            self._models[name] = load_model(name)
        return self._models[name]

    def make_shard(self, config: EvalConfig, k: int) -> None:
        from .load import load_scheduler
        from .sample import sample
        model = self._model(config.model)
        scheduler = load_scheduler(config.model, config.scheduler, timestep_spacing=config.timestep_spacing)
        n = min(self.shard_size, config.num_samples - k * self.shard_size)
        g = runner.generator(config.seed_set, k)
        size = model.config.sample_size
        noise = torch.randn(self.shard_size, model.config.in_channels, size, size, generator=g)[:n]
        conditional = bool(model.config.get("num_class_embeds"))
        labels = (torch.arange(n) + k * self.shard_size) % 10 if conditional else None
        chunk = MICRO_BATCH if _chunks_are_exact(config) else n
        with runner.Stopwatch() as clock:
            images = torch.cat([
                sample(model, scheduler, batch_size=len(noise[i:i + chunk]), num_inference_steps=config.steps,
                       guidance=config.terms(), latents=noise[i:i + chunk], generator=g,
                       class_labels=None if labels is None else labels[i:i + chunk],
                       null_class_label=NULL_CLASS if conditional else None, progress_bar=False)
                for i in range(0, n, chunk)])
        tensors = {"images": images.clamp(-1, 1).contiguous()}
        if labels is not None:
            tensors["labels"] = labels
        self.save_shard(config, k, tensors, clock.seconds)

    def prepare(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        _claim_feature_space(self.out / "feature_space.json", self.feature_space())

    def failed_result(self, config: EvalConfig, err: BaseException) -> dict:
        return {"key": config.key, "config": _config_dict(config), "failed": str(err)}

    def finish(self) -> list[dict]:
        rows = self.collect()
        self.tables(rows)
        return rows

    def tables(self, rows: list[dict]) -> None:
        """Rebuild the folder's tables and plots from the finished rows (a sweep scored otherwise overrides it)."""
        write_tables(self.out, rows)

    def write_result(self, config: EvalConfig) -> None:
        images = self.unit_images(config)
        metrics = self.metrics(images)
        metrics["seconds_per_image"] = self.unit_seconds(config) / len(images)
        from .report import labelled_grid  # the grid first: a finished result always has its grid
        labelled_grid([(config.key[:32], images[:16])], self.out / "grids" / f"{config.key}.png", zoom=2)
        io.write_json(self.result_path(config), {"key": config.key, "config": _config_dict(config),
                                                 "metrics": metrics})

    def _reference(self):
        """(feature net, real features, real class histogram, real mean pixel), computed once."""
        if not hasattr(self, "_ref"):
            from .data import load_fashion_mnist, load_images
            if self.inception:
                from .inception import load_inception
                net = load_inception(self.inception)
            else:
                from .metrics import load_classifier
                net = load_classifier(self.classifier)
            if self.reference:
                model = self._model(self.configs[0].model)
                size = model.config.sample_size
                size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
                real, labels = load_images(self.reference, model.config.in_channels, size), None
            else:
                real, labels = load_fashion_mnist("test")
            real = real[:self.num_real]
            feats, logits = _features_and_logits(net, real)
            # the true labels where the classifier's classes are Fashion-MNIST's, else its predicted classes
            classes = labels[:self.num_real] if labels is not None and not self.inception else logits.argmax(1)
            self._ref = (net, feats, torch.bincount(classes, minlength=logits.shape[1]).double(), real.mean().item())
            if self.measures_b:
                from .metrics import load_classifier, second_classifier_dir
                net_b = load_classifier(self.classifier_b or second_classifier_dir())
                self._ref_b = (net_b, _features_and_logits(net_b, real)[0])
        return self._ref

    def metrics(self, images: torch.Tensor) -> dict:
        from .metrics import (PassThrough, frechet_distance, inception_score_from_logits, kernel_distance,
                              precision_recall)
        classifier, real_feats, real_hist, real_mean = self._reference()
        feats, logits = _features_and_logits(classifier, images)
        with torch.random.fork_rng():  # IS shuffles and KID draws subsets: fixed, so reruns give equal numbers
            torch.manual_seed(0)
            is_mean, is_std = inception_score_from_logits(logits, splits=10)
            kid_mean, kid_std = kernel_distance(real_feats, feats, PassThrough(feats.shape[1]),
                                                subset_size=min(1000, len(feats)))
        precision, recall = precision_recall(real_feats, feats, k=3)
        hist = torch.bincount(logits.argmax(1), minlength=logits.shape[1]).double()
        p, q = hist / hist.sum(), real_hist / real_hist.sum()
        out = {
            "fd": frechet_distance(real_feats, feats, PassThrough(feats.shape[1])),
            "kid": kid_mean, "kid_std": kid_std, "is": is_mean, "is_std": is_std,
            "precision": precision, "recall": recall, "mean_pixel": images.mean().item(),
            "real_mean_pixel": real_mean, "class_histogram": [int(v) for v in hist.tolist()],
            "class_tv_distance": 0.5 * (p - q).abs().sum().item(), "n": len(images),
        }
        if self.measures_b:  # the second network: FD and KID only, computed the same way
            net_b, real_b = self._ref_b
            feats_b, _ = _features_and_logits(net_b, images)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                kid_b, kid_std_b = kernel_distance(real_b, feats_b, PassThrough(feats_b.shape[1]),
                                                   subset_size=min(1000, len(feats_b)))
            out.update(fd_b=frechet_distance(real_b, feats_b, PassThrough(feats_b.shape[1])), kid_b=kid_b,
                       kid_std_b=kid_std_b)
        return out

    def collect(self) -> list[dict]:
        return [io.read_json(self.result_path(c)) for c in self.configs if self.result_path(c).is_file()]


def _config_dict(config: EvalConfig) -> dict:
    d = asdict(config)
    d["layers"] = list(config.layers)
    d["sigma"] = "inf" if math.isinf(config.sigma) else config.sigma
    if config.options:
        d["options"] = dict(config.options)
    else:
        del d["options"]  # results from before options existed read the same
    return d


@torch.no_grad()
def _features_and_logits(net, images: torch.Tensor):
    """``net``: the feature classifier or FID Inception (both have ``features`` and ``classify``)."""
    feats = torch.cat([net.features(x) for x in images.float().split(1000)])
    return feats, net.classify(feats)


def _claim_feature_space(path: Path, space: dict) -> None:
    runner.claim(path, space, lambda old: f"{path.parent} holds results measured on {old}; this sweep measures "
                                          f"on {space}: choose another --out")


COLUMNS = ["model", "method", "cfg_scale", "scale", "layers", "perturbation", "sigma", "start", "stop", "scheduler",
           "steps", "timestep_spacing", "num_samples", "seed_set", "options"]
METRICS = ["fd", "kid", "fd_b", "kid_b", "is", "precision", "recall", "mean_pixel", "class_tv_distance",
           "seconds_per_image"]


def flatten(rows: list[dict]) -> list[dict]:
    """results.json rows -> one flat dict per row (COLUMNS + METRICS); a metric a row lacks (``fd_b`` of an
    Inception sweep) is None, a config field older results lack (``timestep_spacing``) is None. Failed
    configurations (no metrics) are left out."""
    rows = [r for r in rows if "failed" not in r]
    flat = [{**{c: r["config"].get(c) for c in COLUMNS}, **{m: r["metrics"].get(m) for m in METRICS}} for r in rows]
    for row, r in zip(flat, rows):
        row["layers"] = "+".join(row["layers"])
        row["options"] = " ".join(f"{k}={v}" for k, v in (r["config"].get("options") or {}).items())
    return flat


def _fields_of(method: str) -> set[str]:
    """The fields of a flat row's guided method (``pag`` of ``cfg+pag``); none for none and CFG alone."""
    name = method.split("+")[-1]
    return _field_names(name) if name in METHODS and name != "cfg" else set()


def _variant_words(r: dict) -> list[str]:
    """What tells a row's guided method apart beyond site and scale: PAG's perturbation, SEG's σ, the options."""
    fields = _fields_of(r["method"])
    return [f"perturbation={r['perturbation']}" if "perturbation" in fields and r["perturbation"] != "identity"
            else "", f"σ={r['sigma']}" if "sigma" in fields else "", r.get("options") or ""]


def _cell(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def write_tables(out: Path, rows: list[dict]) -> None:
    """results.csv / .json / .md and the plots, rebuilt from the finished configurations (those that failed,
    e.g. with non-finite guidance, are listed with their reason, not scored)."""
    io.write_json(out / "results.json", rows)
    failed = [r for r in rows if "failed" in r]
    flat = flatten(rows)
    with io.atomic_path(out / "results.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS + METRICS)
            writer.writeheader()
            writer.writerows(flat)
    header = ["method", "w", "scale", "layers", "perturbation", "σ", "interval", "sampler", "N", "seeds",
              "FD ↓", "KID ↓", "FD (b) ↓", "KID (b) ↓", "IS ↑", "precision", "recall", "mean pixel",
              "class TV ↓", "s/image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in flat:
        sampler = f"{r['scheduler']}-{r['steps']}" + (f" {r['timestep_spacing']}" if r["timestep_spacing"] else "")
        lines.append("| " + " | ".join(str(v) for v in [
            " ".join(w for w in (r["method"], r["options"]) if w), f"{r['cfg_scale']:g}", f"{r['scale']:g}",
            r["layers"] or "—", r["perturbation"],
            r["sigma"], f"{r['start']:g}–{r['stop']:g}", sampler, r["num_samples"],
            r["seed_set"], f"{r['fd']:.3f}", f"{r['kid']:.4f}", _cell(r["fd_b"], 3), _cell(r["kid_b"], 4),
            f"{r['is']:.2f}", f"{r['precision']:.3f}",
            f"{r['recall']:.3f}", f"{r['mean_pixel']:.3f}", f"{r['class_tv_distance']:.3f}",
            f"{r['seconds_per_image']:.3f}"]) + " |")
    if failed:
        lines += ["", "Failed (not scored):", ""] + [f"- `{r['key']}`: {r['failed']}" for r in failed]
    with io.atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    _plots(out, flat)


# Where a line's scale-0 point comes from: the unguided rows (for CFG+PAG: CFG alone) of the same sampling.
# A line's label names these only when they differ between the sweep's guided rows.
_BASE_KEYS = ("model", "scheduler", "steps", "timestep_spacing", "num_samples")


def fd_lines(flat: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """label -> [(scale, mean FD over seed sets, spread = half the range)] for every guided configuration.

    One line per configuration but its scale and seed set; it starts at scale 0 with the matching
    unguided rows when the sweep has them. Sampler, N and model appear in a label only where they vary.
    """
    guided = [r for r in flat if _fields_of(r["method"])]
    varies = {k for k in _BASE_KEYS if len({r.get(k) for r in guided}) > 1}

    def label(r: dict) -> str:
        perturbation, sigma, options = _variant_words(r)
        parts = [r["method"], r["layers"], perturbation.removeprefix("perturbation="), sigma, options]
        if (r["start"], r["stop"]) != (0.0, 1.0):
            parts.append(f"t={r['start']:g}–{r['stop']:g}")
        if r["method"].startswith("cfg+"):
            parts.append(f"w={r['cfg_scale']:g}")
        if {"scheduler", "steps", "timestep_spacing"} & varies:
            parts.append(f"{r['scheduler']}-{r['steps']}" + (f"-{r['timestep_spacing']}" if r.get("timestep_spacing")
                                                              else ""))
        if "num_samples" in varies:
            parts.append(f"N={r['num_samples']}")
        if "model" in varies:
            parts.append(r["model"])
        return " ".join(str(p) for p in parts if p)

    def point(scale: float, rows: list[dict]) -> tuple[float, float, float]:
        fds = [r["fd"] for r in rows]
        return scale, sum(fds) / len(fds), (max(fds) - min(fds)) / 2

    points: dict[tuple, list[dict]] = {}
    first: dict[str, dict] = {}  # a row of each line: what its baseline rows must match
    for r in guided:
        name = label(r)
        points.setdefault((name, r["scale"]), []).append(r)
        first.setdefault(name, r)
    lines: dict[str, list[tuple[float, float, float]]] = {name: [] for name in first}
    for (name, scale), rows in points.items():
        lines[name].append(point(scale, rows))
    for name, r in first.items():
        base_method, base_w = ("cfg", r["cfg_scale"]) if r["method"].startswith("cfg+") else ("none", 1.0)
        base = [b for b in flat if b["method"] == base_method and b["cfg_scale"] == base_w
                and all(b.get(k) == r.get(k) for k in _BASE_KEYS)]
        pts = lines[name]
        pts.sort()
        if base and pts[0][0] != 0:
            pts.insert(0, point(0.0, base))
    return lines


def fd_change_maps(flat: list[dict], metric: str = "fd") -> list[dict]:
    """Site × scale maps of the relative change of ``metric`` (in %) against no guidance, for every method
    with ``layers`` (PAG, SEG, SLG, ...) on its own (not under CFG).

    One map per method and variant (PAG's perturbation, SEG's σ, the options, the interval and the sampling: model,
    sampler, steps, spacing, N), drawn only where the variant covers at least 2 sites and 2 scales. A cell
    is the mean over seed sets of 100·(m − m₀)/m₀, with m₀ the unguided row of the same sampling and seed
    set; a cell without its unguided row, or whose rows lack ``metric`` (``fd_b`` of old rows), is None.
    Returns [{"method", "variant", "sites", "scales", "change": [[% or None per scale] per site]}], sites
    (layer sets, '+'-joined) in the order the rows give them, scales ascending.
    """
    base: dict[tuple, float] = {}
    for r in flat:
        if r["method"] == "none" and r.get(metric) is not None:
            base[tuple(r.get(k) for k in _BASE_KEYS) + (r["seed_set"],)] = r[metric]
    groups: dict[tuple, dict[tuple, list[float]]] = {}
    for r in flat:
        if "layers" not in _fields_of(r["method"]) or "+" in r["method"] or r.get(metric) is None \
                or not r["layers"]:
            continue
        b = base.get(tuple(r.get(k) for k in _BASE_KEYS) + (r["seed_set"],))
        if not b:
            continue
        variant = (r["method"], *_variant_words(r), r["start"], r["stop"], *(r.get(k) for k in _BASE_KEYS))
        groups.setdefault(variant, {}).setdefault((r["layers"], r["scale"]), []).append(100 * (r[metric] - b) / b)
    maps = []
    for variant, cells in groups.items():
        sites = list(dict.fromkeys(site for site, _ in cells))
        scales = sorted({scale for _, scale in cells})
        if len(sites) < 2 or len(scales) < 2:
            continue
        method, perturbation, sigma, options, start, stop, model, scheduler, steps, spacing, n = variant
        words = [perturbation, sigma, options, f"t={start:g}–{stop:g}" if (start, stop) != (0, 1) else "",
                 f"{Path(str(model)).name} {scheduler}-{steps}" + (f"-{spacing}" if spacing else "") + f" N={n}"]
        maps.append({"method": method, "variant": " ".join(w for w in words if w), "sites": sites,
                     "scales": scales,
                     "change": [[(sum(v) / len(v)) if (v := cells.get((site, scale))) else None for scale in scales]
                                for site in sites]})
    return maps


def draw_heatmaps(path: Path, panels: list[tuple[str, dict]], metric_name: str = "FD") -> Path:
    """One PNG, one panel per (title, map of ``fd_change_maps``) side by side; blue = lower than unguided."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    widest = max(len(m["scales"]) for _, m in panels)
    tallest = max(len(m["sites"]) for _, m in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 + 0.9 * widest * len(panels) + 1.6 * (len(panels) - 1),
                                                      1.2 + 0.42 * tallest), squeeze=False)
    for ax, (title, m) in zip(axes[0], panels):
        values = np.array([[np.nan if v is None else v for v in row] for row in m["change"]], dtype=float)
        # colours saturate at ±25%: the small changes that decide a choice stay visible (the numbers are printed)
        limit = min(25.0, max(1.0, float(np.nanmax(np.abs(values))))) if np.isfinite(values).any() else 1.0
        image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(m["scales"])), [f"{s:g}" for s in m["scales"]])
        ax.set_yticks(range(len(m["sites"])), m["sites"], fontsize=7)
        ax.set_xlabel("scale (PAG s / SEG γ)")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, "—" if np.isnan(v) else f"{v:+.1f}", ha="center", va="center", fontsize=7)
        ax.set_title(title, fontsize=8)
        fig.colorbar(image, ax=ax, label=f"{metric_name} change vs unguided (%)", shrink=0.9)
    _save_fig(fig, path)
    return path


def heatmap_name(m: dict, maps: list[dict]) -> str:
    """``heatmap_<method>.png``; with several variants of a method, the variant is added to the name."""
    if sum(other["method"] == m["method"] for other in maps) == 1:
        return f"heatmap_{m['method']}.png"
    return f"heatmap_{m['method']}_" + runner.safe_name(m["variant"]) + ".png"


def _plots(out: Path, flat: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    (out / "plots").mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = fd_lines(flat)
    for name, pts in lines.items():
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=name)
    ax.set_xlabel("guidance scale (paper convention)")
    space = out / "feature_space.json"
    inception = space.is_file() and io.read_json(space)["features"].startswith("inception")
    ax.set_ylabel(f"FD ({'Inception' if inception else 'classifier'} features)")
    ax.set_title("FD against scale (mean ± spread over seed sets)", fontsize=9)
    if lines:  # outside the axes: a sweep over many layers has many lines
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    _save_fig(fig, out / "plots" / "fd_vs_scale.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in flat:
        ax.scatter(r["recall"], r["precision"], s=12)
        name = " ".join(p for p in (r["method"], r["layers"], f"{r['scale']:g}") if p)
        ax.annotate(name, (r["recall"], r["precision"]), fontsize=5)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    _save_fig(fig, out / "plots" / "precision_recall.png")
    maps = fd_change_maps(flat, "fd")  # the primary network's FD (make_results also draws fd_b's)
    for m in maps:
        draw_heatmaps(out / "plots" / heatmap_name(m, maps),
                      [(f"{m['method'].upper()} {m['variant']}: {'Inception' if inception else 'classifier'} FD", m)])


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)


def _relative_changes(flat: list[dict], metric: str) -> dict[int, float]:
    """id(row) -> 100·(m − m₀)/m₀ against the unguided row of the same sampling and seed set."""
    base = {tuple(r.get(k) for k in _BASE_KEYS) + (r["seed_set"],): r[metric] for r in flat
            if r["method"] == "none" and r.get(metric) is not None}
    out = {}
    for r in flat:
        b = base.get(tuple(r.get(k) for k in _BASE_KEYS) + (r["seed_set"],))
        if r["method"] != "none" and r.get(metric) is not None and b:
            out[id(r)] = 100 * (r[metric] - b) / b
    return out


def choose_settings(flat: list[dict], methods=("pag", "seg"), tie_pp: float = 1.0) -> dict[str, dict]:
    """The selection rule of table 9 (docs/notes/table9.md), fixed before its rows existed, per method:

    1. Δa, Δb: each setting's relative FD change (%) on the primary network (``fd``) and on the second
       (``fd_b``), against the unguided row of the same sampling and seed set.
    2. Eligible: settings that lower FD on both networks (Δa < 0 and Δb < 0).
    3. Score: the mean (Δa + Δb)/2; the lowest score is the best.
    4. Ties: every eligible setting within ``tie_pp`` percentage points of the best score ties; of these the
       smallest scale wins, and among equal scales the lower score.
    5. Each network's own winner: steps 2-4 with Δa alone (settings with Δa < 0), and with Δb alone. Where
       they differ from each other or from the chosen setting, the networks disagree and all are named.
    6. No eligible setting: no guidance stays (``chosen`` is None).

    Rows are flat (``flatten``); returns method -> {"chosen", "best_a", "best_b" (rows or None), "score",
    "delta" ({id(row): (Δa, Δb)}), "agree", "candidates", "eligible"}.
    """
    da, db = _relative_changes(flat, "fd"), _relative_changes(flat, "fd_b")

    def winner(rows: list[dict], score) -> dict | None:
        if not rows:
            return None
        best = min(score(r) for r in rows)
        tied = [r for r in rows if score(r) <= best + tie_pp]
        return min(tied, key=lambda r: (r["scale"], score(r)))

    out = {}
    for method in methods:
        rows = [r for r in flat if r["method"] == method and id(r) in da and id(r) in db]
        both = [r for r in rows if da[id(r)] < 0 and db[id(r)] < 0]
        chosen = winner(both, lambda r: (da[id(r)] + db[id(r)]) / 2)
        best_a = winner([r for r in rows if da[id(r)] < 0], lambda r: da[id(r)])
        best_b = winner([r for r in rows if db[id(r)] < 0], lambda r: db[id(r)])
        out[method] = {"chosen": chosen, "best_a": best_a, "best_b": best_b,
                       "score": None if chosen is None else (da[id(chosen)] + db[id(chosen)]) / 2,
                       "delta": {id(r): (da[id(r)], db[id(r)]) for r in rows},
                       "agree": chosen is best_a and chosen is best_b, "candidates": len(rows),
                       "eligible": len(both)}
    return out
