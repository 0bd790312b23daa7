"""The restoration evaluation, a task of ``pagkit.runner``; its tables and grids; restoring given images.

``restore_eval`` restores the first N Fashion-MNIST test images per method and scores
them (PSNR, SSIM against the originals; FD against the test set on the classifier's
features). It resumes like every runner task::

    OUT/shards/<run>/<method>/<k>.safetensors  restored batch k (atomic; metadata: seconds)
    OUT/shards/<run>/<method>/config.json      what made them (a different run in the same place is refused)
    OUT/results/<run>_<method>.json            one finished (task, method): its config and metrics
    OUT/metrics.{json,md}                      every result in OUT/results, rebuilt after each run
    OUT/grid.png, OUT/grids/<run>.png          original, degraded, one row per method; same columns

Batch k's measurement noise, x_T and the sampler's noise come from one generator seeded
1_000_003·seed + k (``pagkit.runner.generator``), so every method restores the same y from the same noise.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import io, runner
from ..defaults import DEFAULT_UNCOND
from ..denoise import GuidedDenoiser
from ..sample import sample_shape
from .dps import DEFAULT_STEP_SIZE, dps
from .operators import Operator, make_operator


def psnr_ssim(restored: torch.Tensor, originals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM (torchmetrics), both images mapped from [-1, 1] to [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    a = (restored.double().clamp(-1, 1) + 1) / 2
    b = (originals.double().clamp(-1, 1) + 1) / 2
    psnr = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")
    return psnr, ssim


def restore_batch(model, scheduler, operator: Operator, batch: torch.Tensor, guidance=(), *, seed: int = 0,
                  k: int = 0, degraded: bool = False, **dps_options) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``k`` of a run seeded ``seed``: (restored images, y).

    One generator, seeded 1_000_003·seed + k, draws the measurement noise, then x_T, then the
    sampler's noise (η > 0), so every method restores the same y from the same noise.
    ``degraded``: ``batch`` already is the measurement. ``dps_options``: ``dps``'s keywords.
    """
    generator = runner.generator(seed, k)
    y = operator.observe(batch) if degraded else operator.measure(batch, generator)
    return dps(model, scheduler, operator, y, guidance=guidance, generator=generator, **dps_options), y


def restore_eval(task: str, out: str | Path, *, methods: dict[str, list], model: str = DEFAULT_UNCOND,
                 params: dict | None = None, num_images: int = 1000, step_size: float = DEFAULT_STEP_SIZE,
                 num_inference_steps: int = 50, scheduler: str = "ddim", eta: float = 1.0, seed: int = 0,
                 batch_size: int = 50, classifier: str | Path | None = None, num_real: int = 10000, data_dir=None,
                 device: str | torch.device = "cpu", grid_columns: int = 10, max_new_shards: int | None = None,
                 first_image: int = 0, progress: bool = True) -> list[dict]:
    """Restore ``num_images`` Fashion-MNIST test images with each method; score and tabulate them.

    ``task``/``params``: the operator (``make_operator(task, **params)``). ``methods``: name → guidance
    terms, e.g. ``{"dps": [], "dps+pag": [PAG(3.0, layers="down.1.attentions.0")]}``; every method
    restores the same y from the same noise. ``model``: a shipped name or diffusers folder;
    ``scheduler``: a name of ``pagkit.load.SCHEDULERS``; ``step_size``, ``eta``: as in ``dps``.
    ``classifier``: the feature classifier's folder (default: the shipped one); FD is against the
    first ``num_real`` test images. ``device``: where to restore (noise is drawn on the CPU either
    way). ``max_new_shards``: stop after that many new shards (a "kill", for tests).
    ``first_image``: restore test images ``first_image`` … ``first_image + num_images − 1`` (a split kept
    apart from the reported one, to choose settings on).
    Returns this run's result rows (empty if stopped). One run at a time per ``out`` (``io.run_lock``).
    """
    return RestoreEval(task, out, methods, model=model, params=params, num_images=num_images, step_size=step_size,
                       num_inference_steps=num_inference_steps, scheduler=scheduler, eta=eta, seed=seed,
                       batch_size=batch_size, classifier=classifier, num_real=num_real, data_dir=data_dir,
                       device=device, grid_columns=grid_columns, max_new_shards=max_new_shards,
                       first_image=first_image, progress=progress).run()


@dataclass
class RestoreEval(runner.Task):
    """``restore_eval`` as a task of ``pagkit.runner``: one unit per method, its shards the restored batches.

    Layout: ``OUT/shards/<run>/<method>/<k>.safetensors`` (with ``config.json``, its claim) and
    ``OUT/results/<run>_<method>.json``, ``run`` naming everything but the method (``run_name``).
    """

    task: str
    out: Path
    methods: dict[str, list]
    model: str = DEFAULT_UNCOND
    params: dict | None = None
    num_images: int = 1000
    step_size: float = DEFAULT_STEP_SIZE
    num_inference_steps: int = 50
    scheduler: str = "ddim"
    eta: float = 1.0
    seed: int = 0
    batch_size: int = 50
    classifier: str | Path | None = None
    num_real: int = 10000
    data_dir: str | Path | None = None
    device: str | torch.device = "cpu"
    grid_columns: int = 10
    max_new_shards: int | None = None
    first_image: int = 0
    progress: bool = True

    distributed = False  # one ``device`` for the whole run: under torchrun it is not dealt to ranks

    def __post_init__(self):
        self.out = Path(self.out)

    def prepare(self) -> None:
        """Load and check everything before any restoring (inside OUT's lock), then claim each method's folder."""
        from ..data import load_fashion_mnist
        from ..load import load_model, load_scheduler
        from ..metrics import load_classifier
        self.operator = make_operator(self.task, **(self.params or {}))
        self.net = load_model(self.model).to(self.device)
        self.sched = load_scheduler(self.model, self.scheduler)
        self.feature_net = load_classifier(self.classifier)  # fails now, not after hours of restoring
        for terms in self.methods.values():
            GuidedDenoiser(self.net, terms, scheduler=self.sched)  # every layer name checked before any work
        self.test_images, _ = load_fashion_mnist("test", self.data_dir)
        shape = tuple(sample_shape(self.net, 1)[1:])
        if tuple(self.test_images.shape[1:]) != shape:
            raise ValueError(f"the model takes {shape} images; the test set's are {tuple(self.test_images.shape[1:])}")
        first, count, total = self.first_image, self.num_images, len(self.test_images)
        if not 0 <= first < total:
            raise ValueError(f"first_image must be in 0..{total - 1}, got {first}")
        if not 1 <= count <= total - first:
            raise ValueError(f"num_images must be in 1..{total - first} (from image {first}), got {count}")
        self.originals = self.test_images[first:first + count]
        self.run_name = runner.safe_name(
            f"{Path(str(self.model)).name}_{_operator_tag(self.task, self.operator)}_{self.scheduler}"
            f"{self.num_inference_steps}-eta{self.eta:g}_z{self.step_size:g}_n{count}"
            f"{f'_from{first}' if first else ''}_seed{self.seed}")
        self.configs = {name: run_config(self.task, name, terms, step_size=self.step_size, scheduler=self.scheduler,
                                         steps=self.num_inference_steps, eta=self.eta, seed=self.seed,
                                         run=self.run_name, model=str(self.model),
                                         operator=dataclasses.asdict(self.operator), num_images=count,
                                         batch_size=self.batch_size, **({"first_image": first} if first else {}))
                        for name, terms in self.methods.items()}
        for name, config in self.configs.items():
            folder = self.shard_folder(name)
            runner.claim(folder / "config.json", config, lambda old: (
                f"{folder} holds shards made with other settings "
                f"({', '.join(sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k)))}); "
                "choose another output folder"))

    # --- the runner's task: units = method names ------------------------------------------------------
    def units(self) -> list[str]:
        return list(self.methods)

    def key(self, name: str) -> str:
        return runner.safe_name(f"{self.run_name}_{name}")

    def shard_folder(self, name: str) -> Path:
        return self.out / "shards" / self.run_name / name

    @property
    def num_batches(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def num_shards(self, name: str) -> int:
        return self.num_batches

    def shards(self) -> list[tuple[str, int]]:
        """Batch by batch, every method's before the next batch."""
        return [(name, k) for k in range(self.num_batches) for name in self.methods]

    def progress_label(self, rank: int) -> str:
        return f"restoring ({self.task})"

    def _originals(self, k: int) -> torch.Tensor:
        return self.originals[k * self.batch_size:(k + 1) * self.batch_size]

    def make_shard(self, name: str, k: int) -> None:
        with runner.Stopwatch() as clock:
            images, _ = restore_batch(self.net, self.sched, self.operator, self._originals(k).to(self.device),
                                      self.methods[name], seed=self.seed, k=k, step_size=self.step_size,
                                      eta=self.eta, num_inference_steps=self.num_inference_steps, progress_bar=False)
        self.save_shard(name, k, {"images": images.clamp(-1, 1)}, clock.seconds)

    def _reference(self) -> torch.Tensor:
        """The features of the first ``num_real`` test images, computed once (FD's reference)."""
        if not hasattr(self, "_ref"):
            from ..metrics import features
            self._ref = features(self.test_images[:self.num_real], self.feature_net)
        return self._ref

    def write_result(self, name: str) -> None:
        metrics = _scores(self.unit_images(name), self.originals, self.feature_net, self._reference())
        metrics["seconds_per_image"] = self.unit_seconds(name) / self.num_images
        io.write_json(self.result_path(name), {**self.configs[name], "metrics": metrics})

    def finish(self) -> list[dict]:
        """The grid (its first ``grid_columns`` images), the folder's tables, and this run's rows."""
        from ..report import labelled_grid
        n = min(self.grid_columns, self.num_images)
        first = range(math.ceil(n / self.batch_size))
        y = torch.cat([self.operator.measure(self._originals(k).to(self.device), runner.generator(self.seed, k))
                       for k in first])  # the y that was restored
        rows = grid_rows(self.operator, y[:n].cpu(), {name: self.unit_images(name, first)[:n] for name in self.methods},
                         self.originals[:n],
                         {name: describe(name, terms, self.step_size) for name, terms in self.methods.items()})
        labelled_grid(rows, self.out / "grids" / f"{self.run_name}.png")
        labelled_grid(rows, self.out / "grid.png")
        results = [io.read_json(p) for p in (self.out / "results").glob("*.json")]
        write_tables(self.out, sorted(results, key=lambda r: (r["task"], r["run"], r["method"])))
        return [io.read_json(self.result_path(name)) for name in self.methods]


def _operator_tag(task: str, operator: Operator) -> str:
    """The task, and each parameter that differs from its default (``box-inpaint-size8``)."""
    default = dataclasses.asdict(make_operator(task))
    changed = {k: v for k, v in dataclasses.asdict(operator).items() if v != default[k]}
    return task + "".join(f"-{k}{v:g}" if isinstance(v, float) else f"-{k}{v}" for k, v in changed.items())


def _scores(restored, originals, feature_net=None, reference=None) -> dict:
    """PSNR and SSIM (mean, std over images) against the originals; FD against ``reference`` features."""
    psnr, ssim = psnr_ssim(restored, originals)
    metrics = {"n": len(restored), "psnr": psnr.mean().item(), "psnr_std": psnr.std().item() if len(psnr) > 1
               else 0.0, "ssim": ssim.mean().item(), "ssim_std": ssim.std().item() if len(ssim) > 1 else 0.0}
    if reference is not None:
        from ..metrics import PassThrough, features, frechet_distance
        metrics["fd"] = frechet_distance(reference, features(restored, feature_net), PassThrough(reference.shape[1]))
    return metrics


def guidance_label(terms: list) -> str:
    """The guidance terms in a few words: ``PAG s=3 down.1.attentions.0`` (``—`` for none)."""
    parts = []
    for t in terms:
        where = getattr(t, "layers", getattr(t, "layer", ""))
        where = ",".join(where) if isinstance(where, (list, tuple)) else where
        parts.append(f"{type(t).__name__} s={t.scale:g} {where}".strip())
    return "; ".join(parts) or "—"


def describe(method: str, terms: list, step_size: float) -> str:
    """A grid label: the method, ζ, and its guidance terms."""
    return f"{method.upper()} zeta={step_size:g}" + (f"\n{guidance_label(terms)}" if terms else "")


def grid_rows(operator: Operator, y: torch.Tensor, restored: dict[str, torch.Tensor],
              originals: torch.Tensor | None = None, labels: dict[str, str] | None = None) -> list[tuple]:
    """Rows for ``report.labelled_grid``: original (if known), degraded, then one per method."""
    rows = [("original", originals)] if originals is not None else []
    rows.append((f"degraded\n{type(operator).__name__}", operator.degraded_image(y)))
    return rows + [((labels or {}).get(name, name), images) for name, images in restored.items()]


def run_config(task: str, method: str, terms: list, *, step_size: float, scheduler: str, steps: int, eta: float,
               seed: int, **extra) -> dict:
    """What a result row records of how it was made (``write_tables`` reads these keys)."""
    return {"task": task, "method": method, "guidance": [repr(t) for t in terms],
            "guidance_label": guidance_label(terms), "step_size": step_size, "scheduler": scheduler,
            "steps": steps, "eta": eta, "seed": seed, **extra}


def write_tables(out: Path, results: list[dict]) -> str:
    """OUT/metrics.json and OUT/metrics.md from result rows (``run_config`` + ``metrics``)."""
    io.write_json(out / "metrics.json", results)
    header = ["task", "method", "guidance", "ζ", "sampler", "N", "seed", "PSNR ↑ (dB)", "SSIM ↑", "FD ↓",
              "s/image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        m = r["metrics"]
        fd = f"{m['fd']:.3f}" if m.get("fd") is not None else "—"
        seconds = f"{m['seconds_per_image']:.3f}" if "seconds_per_image" in m else "—"
        lines.append(f"| {r['task']} | {r['method']} | {r['guidance_label']} | {r['step_size']:g} | "
                     f"{r['scheduler']}-{r['steps']} η={r['eta']:g} | {m['n']} | {r['seed']} | "
                     f"{m['psnr']:.2f} ± {m['psnr_std']:.2f} | {m['ssim']:.4f} ± {m['ssim_std']:.4f} | {fd} | "
                     f"{seconds} |")
    text = "\n".join(lines) + "\n"
    with io.atomic_path(out / "metrics.md") as tmp:
        tmp.write_text(text)
    return text


def restore_inputs(model, scheduler, operator: Operator, images: torch.Tensor, *, methods: dict[str, list],
                   degraded: bool = False, seed: int = 0, batch_size: int = 50,
                   **dps_options) -> tuple[dict, torch.Tensor, dict]:
    """Restore given images (or, ``degraded=True``, given measurements) with each method.

    Batches are seeded as in ``restore_eval`` (see ``restore_batch``); ``dps_options``: ``dps``'s
    keywords (``step_size``, ``num_inference_steps``, ``eta``, ``progress_bar``, ...). Returns
    (method → restored images, y, method → PSNR/SSIM scores; empty when ``degraded``).
    """
    restored: dict[str, list] = {name: [] for name in methods}
    ys = []
    for k, batch in enumerate(images.split(batch_size)):
        for name, terms in methods.items():
            x, y = restore_batch(model, scheduler, operator, batch, terms, seed=seed, k=k, degraded=degraded,
                                 **dps_options)
            restored[name].append(x.clamp(-1, 1))
        ys.append(y)
    images_of = {name: torch.cat(parts) for name, parts in restored.items()}
    scores = {} if degraded else {name: _scores(x, images) for name, x in images_of.items()}
    return images_of, torch.cat(ys), scores
