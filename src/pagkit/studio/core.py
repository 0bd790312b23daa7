"""What the studio page does, as plain library functions (no Gradio here; ``app.py`` only calls these).

Every generation is a ``pagkit sample`` command line: a request becomes that command's arguments, is parsed by
the CLI's own parser (so a bad number gets the CLI's message), its guidance is read by ``pagkit.spec`` /
``pagkit.presets`` and checked by ``GuidedDenoiser`` as ``pagkit sample`` checks it, and the rows are sampled
as ``pagkit sample --model M`` samples them: the same noise (one generator seeded with ``--seed`` draws all
``--num-images`` columns), the unguided row first, then the ``--guidance`` rows, then the ``--preset`` rows. So the
command line the page shows reproduces its pixels (``tests/test_studio.py`` checks it through the CLI). A
text-to-image pipeline folder (a prompt, no ``pagkit sample`` line) is the exception: ``studio/pipeline.py`` draws
it with the pipeline under ``pagkit.attach`` and shows the Python instead.

Files: models are the shipped ones, or folders under ``models_root`` (none unless given); presets and OUT folders
only under ``files_root``. A path is resolved (links followed) before it is compared with its root, so neither
``..`` nor a symlink leaves it, and a model folder holding a pickled weights file, or a link out of the root,
is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..defaults import (DEFAULT_PAG_LAYERS, DEFAULT_PAG_SCALE, DEFAULT_SAG_LAYER, DEFAULT_SAG_SCALE, DEFAULT_SEG_LAYERS,
                        DEFAULT_SEG_SCALE, DEFAULT_UNCOND, NULL_CLASS)
from ..load import NEVER_UNPICKLES, PICKLED_SUFFIXES, SCHEDULERS, load_model, load_scheduler, shipped_models
from ..presets import shipped_presets

MAX_CONFIGS = 6  # configurations side by side in Compare
MAX_SEEDS = 32  # columns per row on the page: more belongs in a scripted `pagkit sample` run
MAX_SCALES = 12  # rows of a scale strip
DEFAULT_MODEL, DEFAULT_STEPS, DEFAULT_SEEDS, DEFAULT_SCHEDULER = DEFAULT_UNCOND, 20, 8, "ddim"
DEFAULT_CONFIGS = (f"pag:{DEFAULT_PAG_SCALE:g},layers={'+'.join(DEFAULT_PAG_LAYERS)}",  # pagkit sample's own rows
                   f"seg:{DEFAULT_SEG_SCALE:g},layers={'+'.join(DEFAULT_SEG_LAYERS)}",
                   f"sag:{DEFAULT_SAG_SCALE:g},layer={DEFAULT_SAG_LAYER}", "")
MAX_PNGS = 60  # images shown from one OUT folder

_PARSE_LOCK = threading.Lock()  # redirect_stderr is process-wide
# one sampling (or check) at a time: guidance patches the shared, cached model while it runs
_MODEL_LOCK = threading.RLock()
_MODELS: dict[str, torch.nn.Module] = {}


class StudioError(ValueError):
    """An input the page refuses; ``str(err)`` is the message it shows (the CLI's, where the CLI has one)."""


class Cancelled(Exception):
    """The user pressed Cancel; raised after the step that was running."""


# ---------------------------------------------------------------------------------------------------- paths

def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _resolve_under(text: str, root: Path | None, what: str, option: str) -> Path:
    """``text`` (absolute, or relative to ``root``) resolved with links followed; an error unless it stays in root."""
    if root is None:
        raise StudioError(f"{what} {text!r}: the studio opens no {what}s here; start pagkit studio with "
                          f"{option} DIR to open those under DIR")
    root = Path(root).resolve()
    raw = Path(os.path.expanduser(text))
    path = (raw if raw.is_absolute() else root / raw).resolve()
    if not _inside(path, root):
        raise StudioError(f"{what} {text!r} is outside {root} (links followed): the studio opens only {what}s "
                          f"under {option}")
    if not path.exists():
        raise StudioError(f"{what} {text!r} not found under {root}")
    return path


def check_model(name: str, models_root: str | Path | None = None) -> str:
    """A shipped model's name, or the resolved folder under ``models_root``; StudioError otherwise.

    Every file in the folder must stay inside the root (no link out) and no weights file may be pickled (the
    page refuses rather than relying on safetensors being picked over a ``.bin`` beside it)."""
    name = (name or "").strip()
    shipped = studio_models()
    if name in shipped:
        return name
    if not name:
        raise StudioError(f"choose a model: {', '.join(shipped)}")
    if models_root is None:
        raise StudioError(f"model {name!r} is not a shipped model ({', '.join(shipped)}); model folders are off: "
                          "start pagkit studio with --models-root DIR to open diffusers folders under DIR")
    path = _resolve_under(name, Path(models_root), "model folder", "--models-root")
    root = Path(models_root).resolve()
    if path.is_file():
        if path.suffix.lower() in PICKLED_SUFFIXES:
            raise StudioError(f"model path {name!r} is a pickled {path.suffix} file; {NEVER_UNPICKLES}")
        raise StudioError(f"model path {name!r} is a file; give the diffusers model or pipeline folder")
    for folder, dirs, files in os.walk(path):  # links are not followed, but each one is checked
        for entry in dirs + files:
            full = Path(folder) / entry
            if not _inside(full.resolve(), root):
                raise StudioError(f"{full} links outside {root}; the studio refuses model folders that leave "
                                  "--models-root")
            if entry in files and full.suffix.lower() in PICKLED_SUFFIXES:
                raise StudioError(f"{full} is a pickled weights file ({full.suffix}); the studio opens only "
                                  f"folders whose weights are all safetensors: {NEVER_UNPICKLES}")
    return str(path)


def check_file(text: str, files_root: str | Path | None, what: str = "file") -> Path:
    """A preset file or OUT folder under ``files_root`` (links followed); StudioError otherwise."""
    if not (text or "").strip():
        raise StudioError(f"give the {what}'s path")
    return _resolve_under(text.strip(), None if files_root is None else Path(files_root), what, "--files-root")


def studio_models() -> list[str]:
    """The shipped denoisers (pipelines with a ``unet/`` or ``transformer/``), by name."""
    return [n for n, p in shipped_models().items() if (p / "unet").is_dir() or (p / "transformer").is_dir()]


def list_models(models_root: str | Path | None = None, depth: int = 3) -> list[str]:
    """The shipped models, then every diffusers folder under ``models_root`` (relative to it), for the picker."""
    found = list(studio_models())
    if models_root is None or not Path(models_root).is_dir():
        return found
    root = Path(models_root).resolve()
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        if "model_index.json" in files or ("config.json" in files and any(f.endswith(".safetensors")
                                                                             for f in files)):
            found.append(str(rel))
            dirs[:] = []  # a pipeline's own subfolders are not models of their own here
        elif len(rel.parts) >= depth:
            dirs[:] = []
        dirs.sort()
    return found


def list_results(files_root: str | Path | None, depth: int = 3) -> list[str]:
    """OUT folders of ``pagkit eval`` / ``tune`` under ``files_root`` (relative to it): those with results.md or
    tune.md, not looking inside one (a tune's rungs are its own)."""
    if files_root is None or not Path(files_root).is_dir():
        return []
    root, found = Path(files_root).resolve(), []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        if "results.md" in files or "tune.md" in files:
            found.append(str(rel))
            dirs[:] = []
        elif len(rel.parts) >= depth:
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return found


# ---------------------------------------------------------------------------------------------- requests

@dataclass
class Request:
    """What one grid is made of: the ``pagkit sample`` options the page sets.

    ``configs``: one text per configuration, a ``--guidance`` spec (``pag:1,layers=mid``, ``cfg:2; seg:1``) or
    the path of a preset file (``.json``, ``pagkit tune``'s preset.json); empty ones are skipped. Numbers may
    arrive as the page has them (floats, None): the CLI's parser judges them."""
    model: str = DEFAULT_MODEL
    configs: list[str] = field(default_factory=list)
    seed: object = 0
    num_images: object = DEFAULT_SEEDS
    scheduler: str = DEFAULT_SCHEDULER
    steps: object = DEFAULT_STEPS
    class_label: object = None  # None: 0..9 along the columns (conditional models)
    timestep_spacing: str | None = None
    prompt: str | None = None  # text-to-image pipeline folders only (``condition(model) == "prompt"``)
    negative_prompt: str | None = None

    def specs(self) -> list[str]:
        return [c.strip() for c in self.configs if c and c.strip() and not _is_preset(c)]

    def presets(self) -> list[str]:
        return [c.strip() for c in self.configs if c and c.strip() and _is_preset(c)]


def _is_preset(text: str) -> bool:
    return text.strip().lower().endswith(".json") or text.strip() in shipped_presets()


def _number(value) -> str:
    """A page value as command-line text: 20.0 -> '20'; None -> '' (the parser then names the option)."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return str(int(value))
    return str(value).strip()


def sample_argv(request: Request, model: str | None = None, presets: list[str] | None = None,
                out: str = "studio.png") -> list[str]:
    """``pagkit sample``'s arguments (without ``pagkit``) for ``request``; ``model``/``presets``: resolved paths."""
    argv = ["sample", "--model", model or request.model, "--scheduler", request.scheduler,
            "--steps", _number(request.steps), "--seed", _number(request.seed),
            "--num-images", _number(request.num_images)]
    if request.class_label not in (None, ""):
        argv += ["--class-label", _number(request.class_label)]
    if request.timestep_spacing:
        argv += ["--timestep-spacing", request.timestep_spacing]
    for spec in request.specs():
        argv += ["--guidance", spec]
    for preset in presets if presets is not None else request.presets():
        argv += ["--preset", str(preset)]
    return argv + ["--out", out, "--quiet"]


def command_line(request: Request, model: str | None = None, presets: list[str] | None = None,
                 out: str = "studio.png") -> str:
    """The ``pagkit sample`` command that draws the same grid as ``request`` (pixel for pixel)."""
    return shlex.join(["pagkit"] + sample_argv(request, model, presets, out))


def parse_cli(argv: list[str]):
    """``argv`` parsed by the CLI's own parser: its namespace, or a StudioError carrying the CLI's message."""
    from .. import cli  # here, not at import: the CLI registers this package's subcommand
    buffer = io.StringIO()
    with _PARSE_LOCK, contextlib.redirect_stderr(buffer):
        try:
            return cli.build_parser().parse_args(argv)
        except SystemExit:
            pass
    text = (buffer.getvalue().strip().splitlines() or ["invalid arguments"])[-1]
    text = text.split(": error: ", 1)[-1]
    text = text.rsplit(" (see ", 1)[0] if text.endswith("--help)") else text
    raise StudioError(text)


# ------------------------------------------------------------------------------------------------ plans

@dataclass
class Plan:
    """A checked request: the loaded model, its scheduler, the rows (label, terms) and the command line."""
    request: Request
    args: object
    model: torch.nn.Module
    scheduler: object
    rows: list[tuple[str, list]]
    conditional: bool
    command: str  # the `pagkit sample` command line; for a pipeline, the Python that draws the same grid
    pipeline: bool = False  # a text-to-image pipeline, drawn by its own __call__ under pagkit.attach


def _model(name: str) -> torch.nn.Module:
    with _MODEL_LOCK:
        if name not in _MODELS:
            _MODELS[name] = load_model(name)
        return _MODELS[name]


def plan(request: Request, *, models_root=None, files_root=None, max_configs: int = MAX_CONFIGS) -> Plan:
    """Check ``request`` as ``pagkit sample`` checks its command line, before any sampling; StudioError if bad.

    The numbers go through the CLI's parser, the guidance through ``parse_spec`` / ``load_preset`` and
    ``GuidedDenoiser`` (unknown sites, NaN or negative scales, ...), with the CLI's messages."""
    from ..spec import label
    configs = [c for c in request.configs if c and c.strip()]
    if len(configs) > max_configs:
        raise StudioError(f"at most {max_configs} configurations side by side, got {len(configs)}")
    model_name = check_model(request.model, models_root)
    presets = [p if p in shipped_presets() else str(check_file(p, files_root, "preset file"))
               for p in request.presets()]  # shipped ones by name, others only under --files-root
    args = parse_cli(sample_argv(request, model_name, presets))
    if args.num_images > MAX_SEEDS:
        raise StudioError(f"--num-images {args.num_images}: the studio draws at most {MAX_SEEDS} seeds per "
                          f"configuration; run the command line for more")
    if is_prompt_pipeline(model_name):
        from .pipeline import plan_pipeline
        return plan_pipeline(request, args, model_name)
    try:
        with _MODEL_LOCK:
            model, scheduler, rows, conditional = _check(args, model_name)
    except StudioError:
        raise
    except (ValueError, TypeError, OSError) as err:  # the library's own messages, as the CLI prints them
        raise StudioError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    rows = [("no guidance", [])] + [(label(terms).replace(" + ", "\n+ "), terms) for terms in rows]
    return Plan(request, args, model, scheduler, rows, conditional, command_line(request, model_name, presets))


def _check(args, model_name: str):
    """What ``pagkit sample --model`` checks before sampling, in its order and with its messages."""
    from ..denoise import GuidedDenoiser
    from ..methods import CFG
    from ..presets import load_preset
    from ..spec import format_spec, parse_spec
    rows = [terms for terms in (parse_spec(text) for text in args.guidance or []) if terms]
    rows += [load_preset(path) for path in args.preset or []]
    model = _model(model_name)
    conditional = bool(model.config.get("num_class_embeds"))
    with_cfg = [terms for terms in rows if any(isinstance(t, CFG) for t in terms)]
    if with_cfg and not conditional:  # the CLI's message for the same case
        raise ValueError(f"--guidance {format_spec(with_cfg[0])!r}: CFG needs a class-conditional model "
                         f"(with a null class); {args.model} is unconditional")
    if args.class_label is not None and not conditional:
        raise ValueError(f"--class-label {args.class_label}: {args.model} is unconditional (its config has no "
                         "num_class_embeds); leave --class-label out, or give a class-conditional model")
    scheduler = load_scheduler(model_name, args.scheduler, args.timestep_spacing)
    for terms in rows:  # every site and scale checked before any sampling, as pagkit sample does
        GuidedDenoiser(model, terms, scheduler=scheduler)
    from ..cli.sample import check_class_label
    check_class_label(args.class_label, model, args.model, conditional)
    return model, scheduler, rows, conditional


# ---------------------------------------------------------------------------------------------- sampling

@dataclass
class Row:
    label: str
    spec: str  # the row's guidance as text ("none" for the unguided row)
    images: torch.Tensor  # (N, C, H, W) in about [-1, 1]
    seconds: float

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / len(self.images)

    @property
    def mean_pixel(self) -> float:  # eval's saturation measure
        return self.images.clamp(-1, 1).mean().item()

    @property
    def white_fraction(self) -> float:  # pixels at the top of the range: flat white garments when oversaturated
        return (self.images.clamp(-1, 1) > 0.9).float().mean().item()


@dataclass
class Result:
    rows: list[Row]
    grid: object  # PIL image: rows = configurations, columns = seeds (report.labelled_grid)
    command: str
    title: str  # the model, as the CLI titles its rows

    def table(self) -> list[list]:
        return [[i, r.label.replace("\n", " "), r.spec, round(r.seconds_per_image, 4)]
                for i, r in enumerate(self.rows)]


def draw(plan_: Plan, *, progress=None, cancel: threading.Event | None = None) -> Result:
    """Sample every row of ``plan_`` from the same noise, as ``pagkit sample --model`` does.

    ``progress(row, step, steps)`` after each step; ``cancel`` set: Cancelled after the running step."""
    if plan_.pipeline:
        from .pipeline import draw_pipeline
        return draw_pipeline(plan_, progress=progress, cancel=cancel)
    from ..sample import sample
    from ..spec import format_spec
    args, model = plan_.args, plan_.model
    in_channels, size = model.config.in_channels, model.config.sample_size
    noise = torch.randn(args.num_images, in_channels, size, size, generator=torch.Generator().manual_seed(args.seed))
    labels = None
    if plan_.conditional:
        labels = (torch.full((args.num_images,), args.class_label) if args.class_label is not None
                  else torch.arange(args.num_images) % 10)
    rows = []
    with _MODEL_LOCK:
        for index, (name, terms) in enumerate(plan_.rows):
            def step(i, t, x, index=index):
                if progress is not None:
                    progress(index, i + 1, args.steps)
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"cancelled at step {i + 1} of {args.steps} of row {index + 1}")
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled before row {index + 1}")
            start = time.perf_counter()
            images = sample(model, plan_.scheduler, batch_size=args.num_images, num_inference_steps=args.steps,
                            guidance=terms, latents=noise, class_labels=labels,
                            null_class_label=NULL_CLASS if plan_.conditional else None,
                            generator=torch.Generator().manual_seed(args.seed), progress_bar=False, callback=step)
            rows.append(Row(name, format_spec(terms), images, time.perf_counter() - start))
    return Result(rows, grid_image(args.model, rows), plan_.command, str(args.model))


def grid_image(title: str, rows: list[Row], label_width: int = 190):
    """The CLI's grid (``report.labelled_grid``: label ``model`` + row label), with each row's s/image added."""
    import tempfile

    from PIL import Image

    from ..report import labelled_grid
    with tempfile.TemporaryDirectory(prefix="pagkit-studio-") as tmp:
        # the label's "(layers=...)" on a line of its own: a site name is longer than the label column
        path = labelled_grid([(f"{Path(title).name}\n{r.label.replace(' (', chr(10) + '(')}\n"
                               f"{r.seconds_per_image:.3f} s/image", r.images)
                              for r in rows], Path(tmp) / "grid.png", label_width=label_width)
        with Image.open(path) as image:
            return image.copy()


def compare(request: Request, *, models_root=None, files_root=None, progress=None, cancel=None,
            max_configs: int = MAX_CONFIGS) -> Result:
    """Compare: the request's configurations (after the unguided row) on the same seeds, side by side."""
    return draw(plan(request, models_root=models_root, files_root=files_root, max_configs=max_configs),
                progress=progress, cancel=cancel)


def parse_scales(text: str) -> list[float]:
    """``"0.5,1,2"`` or ``"0.5:8:5"`` (start:stop:count, geometric when both are > 0, as saturation grows so)."""
    text = (text or "").strip()
    if not text:
        raise StudioError("give the scales, e.g. 0.5,1,2,4 or 0.5:8:5 (start:stop:count)")
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            a, b, n = float(start), float(stop), int(count)
            if n < 2:
                raise ValueError
            if a > 0 and b > 0:
                values = [a * (b / a) ** (i / (n - 1)) for i in range(n)]
            else:
                values = [a + (b - a) * i / (n - 1) for i in range(n)]
            values = [float(f"{v:.4g}") for v in values]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StudioError(f"scales look like 0.5,1,2,4 or 0.5:8:5 (start:stop:count >= 2), got {text!r}") from None
    if len(values) > MAX_SCALES:
        raise StudioError(f"at most {MAX_SCALES} scales in a strip, got {len(values)}")
    return values


def strip_specs(spec: str, scales: list[float]) -> list[str]:
    """One spec per scale: ``spec``'s last term at each scale (``cfg:1.5; pag:1`` strips PAG under CFG 1.5).

    A NaN or negative scale is written as given, so the method itself refuses it with its own message."""
    from ..spec import format_term, parse_term
    parts = [p for p in (spec or "").split(";") if p.strip()]
    if not parts:
        raise StudioError("give the method to strip, e.g. pag:1,layers=mid")
    head, last = parts[:-1], parts[-1]
    try:
        base = parse_term(last)
    except (ValueError, TypeError) as err:
        raise StudioError(str(err)) from None
    name, _, rest = format_term(base).partition(":")  # rest starts with the scale, then the other options
    options = rest.partition(",")[2]
    return ["; ".join([p.strip() for p in head] + [f"{name}:{scale:g}" + (f",{options}" if options else "")])
            for scale in scales]


def strip_request(request: Request, spec: str, scales: str | list[float]) -> Request:
    """The scale strip's request: ``spec`` at each of ``scales`` (text as ``parse_scales`` reads, or numbers)."""
    values = parse_scales(scales) if isinstance(scales, str) else list(scales)
    return dataclasses.replace(request, configs=strip_specs(spec, values))


def scale_strip(request: Request, spec: str, scales: str | list[float], **kwargs) -> Result:
    """Scale strip: one method at a range of scales, each row the request's seeds, after the unguided row."""
    return compare(strip_request(request, spec, scales), max_configs=MAX_SCALES, **kwargs)


def site_specs(model: torch.nn.Module, spec: str) -> list[tuple[str, str]]:
    """(site, spec) for every perturbable site of ``model`` (``pagkit layers``): ``spec``'s last term there."""
    from ..layers import layers
    from ..spec import _fields, format_term, parse_term
    parts = [p for p in (spec or "").split(";") if p.strip()] or ["pag:1"]
    try:
        base = parse_term(parts[-1])
    except (ValueError, TypeError) as err:
        raise StudioError(str(err)) from None
    fields = _fields(type(base))
    key = "layers" if "layers" in fields else "layer" if "layer" in fields else None
    if key is None:
        raise StudioError(f"{type(base).__name__} acts at no site (it has no layers option); the explorer takes "
                          "pag, seg, sag, slg, stg, tpg or nag")
    out = []
    for info in layers(model):
        term = dataclasses.replace(base, **{key: info.name})
        out.append((info.name, "; ".join([p.strip() for p in parts[:-1]] + [format_term(term)])))
    return out


def sites_request(request: Request, spec: str = "pag:1", *, models_root=None) -> tuple[Request, list[str]]:
    """The explorer's request (``spec`` at every site of the model, in forward order) and the site names."""
    name = check_model(request.model, models_root)
    with _MODEL_LOCK:
        try:
            sites = site_specs(_model(name), spec)
        except (ValueError, TypeError, OSError) as err:
            raise StudioError(str(err).splitlines()[0]) from None
    return dataclasses.replace(request, configs=[s for _, s in sites]), [site for site, _ in sites]


def site_columns(request: Request, spec: str = "pag:1", *, models_root=None, **kwargs) -> tuple[Result, list]:
    """Sites explorer: one row per perturbable site (after the unguided one), the request's seeds.

    Returns the result and ``columns(result, sites)``: per row, (site or None for the unguided row, spec, a
    column image: the row's seeds stacked top to bottom), so the page can show one column per site."""
    site_request, sites = sites_request(request, spec, models_root=models_root)
    result = compare(site_request, models_root=models_root, max_configs=len(sites), **kwargs)
    return result, columns(result, sites)


def columns(result: Result, sites: list[str]) -> list[tuple[str | None, str, object]]:
    return [(site, row.spec, column_image(row.images)) for site, row in zip([None] + sites, result.rows)]


def is_prompt_pipeline(model: str) -> bool:
    """Whether ``model`` (a name or folder ``check_model`` returned) is a text-to-image pipeline folder: a
    ``model_index.json`` with a tokenizer or text encoder. Those take a prompt and are drawn by the pipeline."""
    index = Path(model) / "model_index.json"
    if model in studio_models() or not index.is_file():
        return False
    import json
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StudioError(f"{index} is not readable JSON: {err}") from None
    return any(isinstance(components.get(key), list) and components[key][0] is not None
               for key in ("tokenizer", "text_encoder"))


def condition(model: str, models_root=None) -> tuple[str | None, list[int]]:
    """What the page asks beside the model: ("prompt", []) for a text-to-image pipeline, ("class", labels) for a
    class-conditional model, (None, []) for an unconditional one; StudioError for a refused model."""
    if is_prompt_pipeline(check_model(model, models_root)):
        return "prompt", []
    labels = classes(model, models_root)
    return ("class" if labels else None), labels


def classes(model: str, models_root=None) -> list[int]:
    """The class labels a page may pick for ``model`` (none if unconditional; CFG's null class left out)."""
    if is_prompt_pipeline(check_model(model, models_root)):
        return []
    with _MODEL_LOCK:
        try:
            count = _model(check_model(model, models_root)).config.get("num_class_embeds") or 0
        except StudioError:
            raise
        except (ValueError, TypeError, OSError) as err:
            raise StudioError(str(err).splitlines()[0]) from None
    return [c for c in range(count) if not (c == NULL_CLASS and c == count - 1)]


def sites_grid(cols: list[tuple[str | None, str, object]], pad: int = 12, header: int = 52):
    """The explorer's columns side by side under their site names; also each column's x-range (for clicks)."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=13)
    width = max(c[2].width for c in cols) + pad
    canvas = Image.new("RGB", (len(cols) * width + pad, header + max(c[2].height for c in cols)), "white")
    draw, spans = ImageDraw.Draw(canvas), []
    for i, (site, _, image) in enumerate(cols):
        x = pad // 2 + i * width
        lines = [""]
        for part in (site or "no guidance").split("."):  # wrapped at dots to the column: down_blocks.1 / attentions.0
            if lines[-1] and len(lines[-1]) + 1 + len(part) > 13:
                lines.append(part)
            else:
                lines[-1] = f"{lines[-1]}.{part}" if lines[-1] else part
        for n, line in enumerate(lines[:3]):
            draw.text((x + 2, 4 + 15 * n), line, fill="black", font=font)
        canvas.paste(image, (x + (width - image.width) // 2, header))
        spans.append((x, x + width))
    return canvas, spans


def column_at(spans: list[tuple[int, int]], x: float) -> int | None:
    """The column a click at ``x`` (image pixels) falls in."""
    return next((i for i, (a, b) in enumerate(spans) if a <= x < b), None)


def column_image(images: torch.Tensor, zoom: int = 3, pad: int = 2):
    """A row's seeds as one column (top to bottom), for the sites explorer."""
    from PIL import Image

    from ..report import to_uint8
    tiles = [Image.fromarray(t.squeeze(-1) if t.shape[-1] == 1 else t) for t in to_uint8(images)]
    w, h = tiles[0].width * zoom, tiles[0].height * zoom
    canvas = Image.new("RGB", (w + 2 * pad, len(tiles) * (h + pad) + pad), "white")
    for i, tile in enumerate(tiles):
        canvas.paste(tile.resize((w, h), Image.NEAREST).convert("RGB"), (pad, pad + i * (h + pad)))
    return canvas


# ------------------------------------------------------------------------------------------------ results

@dataclass
class Results:
    folder: Path
    markdown: str  # results.md and/or tune.md
    images: list[tuple[object, str]]  # (PIL image, path relative to the folder)


def read_results(folder: str, files_root=None) -> Results:
    """An OUT folder of ``pagkit eval`` / ``tune`` under ``files_root``: its tables and PNGs (plots, grids)."""
    from PIL import Image
    path = check_file(folder, files_root, "results folder")
    if not path.is_dir():
        raise StudioError(f"{folder!r} is a file; give the OUT folder of pagkit eval or pagkit tune")
    parts = []
    for name in ("tune.md", "results.md"):
        if (path / name).is_file():
            parts.append(f"### {name}\n\n" + (path / name).read_text(encoding="utf-8", errors="replace"))
    root = Path(files_root).resolve()
    pngs = sorted((p for p in path.rglob("*.png") if _inside(p.resolve(), root)),
                  key=lambda p: (len(p.relative_to(path).parts), str(p)))
    if not parts and not pngs:
        raise StudioError(f"{folder!r} holds no results.md, tune.md or PNG: not an OUT folder of pagkit eval or "
                          "pagkit tune")
    images = []
    for png in pngs[:MAX_PNGS]:
        try:
            with Image.open(png) as image:
                images.append((image.convert("RGB"), str(png.relative_to(path))))
        except OSError:
            continue  # a half-written or foreign file: skipped, the rest still shows
    if len(pngs) > MAX_PNGS:
        parts.append(f"*{len(pngs) - MAX_PNGS} more PNGs not shown (first {MAX_PNGS}).*")
    return Results(path, "\n\n".join(parts), images)


def method_template(name: str) -> str:
    """A method's spec with its defaults (``pag`` -> ``pag:1``...), to start a configuration from."""
    from ..methods import METHODS
    from ..spec import format_term
    cls = METHODS.get(name)
    if cls is None:
        raise StudioError(f"unknown guidance method {name!r}; choose one of {', '.join(METHODS)}")
    try:
        return format_term(cls())
    except (TypeError, ValueError):
        return f"{name}:1"


__all__ = ["Request", "Plan", "Result", "Row", "Results", "StudioError", "Cancelled", "plan", "draw", "compare",
           "scale_strip", "site_columns", "condition", "is_prompt_pipeline", "strip_request", "sites_request",
           "columns", "sites_grid", "column_at", "classes", "read_results", "command_line", "sample_argv",
           "check_model", "check_file", "list_models", "list_results", "parse_scales", "strip_specs", "site_specs",
           "SCHEDULERS"]
