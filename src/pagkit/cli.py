"""The ``pagkit`` command: ``layers``, ``sample``, ``eval``, ``tune``, ``restore``, ``bench``, ``train``.

Errors a user can fix (a bad path, an unknown layer, a bad number) end in one
line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

from . import guidance as G
from .methods import METHODS
from .data import read_images
from . import io
from .io import atomic_path, check_output_file, check_output_folder
from .layers import aliases, layers
from .load import SCHEDULERS, TIMESTEP_SPACINGS, load_model, load_scheduler, shipped_models
from .restore import DEFAULT_STEP_SIZE, TASKS
from .tune import DEFAULT_SCALES, TUNABLE

from .defaults import (DEFAULT_CFG_SCALE, DEFAULT_COND, DEFAULT_PAG_LAYERS, DEFAULT_PAG_SCALE,  # noqa: F401
                       DEFAULT_RESTORE_PAG_SCALE, DEFAULT_SAG_LAYER, DEFAULT_SAG_SCALE, DEFAULT_SEG_LAYERS,
                       DEFAULT_SEG_SCALE, DEFAULT_UNCOND, NULL_CLASS)


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``, with one message naming the range."""
    wanted = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
        return value
    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if math.isnan(value):
        raise argparse.ArgumentTypeError("expected a number, got nan")
    return value


def _nonnegative(text: str) -> float:
    value = _finite(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _layer_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def cmd_layers(args) -> None:
    from .backends import detect
    model = load_model(args.model)
    infos = layers(model)
    kinds = ", ".join(f"{sum(i.kind == k for i in infos)} {k}" for k in dict.fromkeys(i.kind for i in infos))
    print(f"{type(model).__name__} ({detect(model).name} backend): {len(infos)} attention sites ({kinds})")
    for info in infos:
        grid = "x".join(map(str, info.grid)) if info.grid else "?"  # H×W, or F×H×W for video
        print(f"  {info.name:<60} {info.kind:<6}  image tokens {grid:>7}  heads {info.heads}")
    print("aliases:")
    for alias, names in aliases(model).items():
        print(f"  {alias:<12} {len(names)} layer{'s' if len(names) != 1 else ''}")


def _random_demo_model():
    from .train import unet_config
    from diffusers import DDIMScheduler, UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(**unet_config(conditional=False)).eval(), DDIMScheduler()


def _configurations(args, conditional: bool) -> list[tuple[str, list]]:
    if args.guidance or args.preset:  # the user's rows (pagkit.spec, presets), after the unguided one
        from .presets import load_preset
        from .spec import format_spec, label, parse_spec
        rows = [terms for terms in (parse_spec(text) for text in args.guidance or []) if terms]
        rows += [load_preset(path) for path in args.preset or []]
        with_cfg = [terms for terms in rows if any(isinstance(t, G.CFG) for t in terms)]
        if with_cfg and not conditional:
            if args.model:  # the user's one model cannot do it
                raise ValueError(f"--guidance {format_spec(with_cfg[0])!r}: CFG needs a class-conditional model "
                                 f"(with a null class); {args.model} is unconditional")
            rows = [terms for terms in rows if terms not in with_cfg]  # the shipped pair: CFG rows on fmnist-cond
        return [("no guidance", [])] + [(label(terms).replace(" + ", "\n+ "), terms) for terms in rows]
    pag = G.PAG(args.pag_scale, layers=args.pag_layers)
    if conditional:
        return [("no guidance", []), (f"CFG w={args.cfg_scale:g}", [G.CFG(args.cfg_scale)]),
                (f"CFG w={args.cfg_scale:g}\n+ PAG s={args.pag_scale:g}", [G.CFG(args.cfg_scale), pag])]
    sigma = "inf" if math.isinf(args.seg_sigma) else f"{args.seg_sigma:g}"
    return [("no guidance", []),
            (f"PAG s={args.pag_scale:g}\n{','.join(args.pag_layers)}", [pag]),
            (f"SEG g={args.seg_scale:g} sigma={sigma}\n{','.join(args.seg_layers)}",
             [G.SEG(args.seg_scale, sigma=args.seg_sigma, layers=args.seg_layers)]),
            (f"SAG s={args.sag_scale:g}\n{args.sag_layer}", [G.SAG(args.sag_scale, layer=args.sag_layer)])]


def cmd_sample(args) -> None:
    from .report import labelled_grid
    from .sample import sample
    torch.set_num_threads(args.threads) if args.threads else None
    _configurations(args, conditional=False), _configurations(args, conditional=True)  # scales etc., before loading
    if not args.list_layers:
        check_output_file(args.out)
    jobs = []  # (title, model, scheduler, conditional)
    if args.model:
        model = load_model(args.model)
        conditional = bool(model.config.get("num_class_embeds"))
        if args.class_label is not None and not conditional:
            raise ValueError(f"--class-label {args.class_label}: {args.model} is unconditional (its config has no "
                             "num_class_embeds); leave --class-label out, or give a class-conditional model")
        jobs.append((str(args.model), model, load_scheduler(args.model, args.scheduler, args.timestep_spacing),
                     conditional))
    else:
        shipped = shipped_models()
        if DEFAULT_UNCOND in shipped:
            jobs.append((DEFAULT_UNCOND, load_model(DEFAULT_UNCOND),
                         load_scheduler(DEFAULT_UNCOND, args.scheduler, args.timestep_spacing), False))
        else:
            model, scheduler = _random_demo_model()
            print("note: no shipped model found; sampling from a RANDOMLY INITIALISED UNet (noise, not clothes)")
            jobs.append(("RANDOM WEIGHTS", model, scheduler, False))
        if DEFAULT_COND in shipped:
            jobs.append((DEFAULT_COND, load_model(DEFAULT_COND),
                         load_scheduler(DEFAULT_COND, args.scheduler, args.timestep_spacing), True))
    if args.list_layers:
        for title, model, _, _ in jobs:
            print(f"[{title}]")
            for info in layers(model):
                print(f"  {info.name}  {info.grid}")
        return

    from .denoise import GuidedDenoiser
    for title, model, scheduler, conditional in jobs:  # check every layer name before spending time sampling
        for _, terms in _configurations(args, conditional):
            GuidedDenoiser(model, terms, scheduler=scheduler)
        classes = model.config.get("num_class_embeds")
        if conditional and args.class_label is not None and classes and not 0 <= args.class_label < classes:
            null = f"; {NULL_CLASS} is the null class of CFG" if NULL_CLASS < classes else ""
            raise ValueError(f"--class-label {args.class_label} is out of range for {title}: its classes are "
                             f"0..{classes - 1}{null}")

    rows = []
    for title, model, scheduler, conditional in jobs:
        in_channels, size = model.config.in_channels, model.config.sample_size
        noise = torch.randn(args.num_images, in_channels, size, size,
                            generator=torch.Generator().manual_seed(args.seed))
        labels = None
        if conditional:
            labels = (torch.full((args.num_images,), args.class_label) if args.class_label is not None
                      else torch.arange(args.num_images) % 10)
        for name, terms in _configurations(args, conditional):
            start = time.perf_counter()
            images = sample(model, scheduler, batch_size=args.num_images, num_inference_steps=args.steps,
                            guidance=terms, latents=noise, class_labels=labels,
                            null_class_label=NULL_CLASS if conditional else None,
                            generator=torch.Generator().manual_seed(args.seed), progress_bar=not args.quiet)
            seconds = time.perf_counter() - start
            print(f"{title:>14} | {name.replace(chr(10), ' '):<40} {seconds:6.2f} s  "
                  f"({seconds / args.num_images:.3f} s/image)")
            rows.append((f"{title}\n{name}", images))
    path = labelled_grid(rows, args.out)
    print(f"wrote {path} ({len(rows)} rows x {args.num_images} seeds, {args.steps} steps each)")


def cmd_train(args) -> None:
    from .train import TrainConfig, train
    check_output_folder(args.out)
    cfg = TrainConfig(out=args.out, conditional=args.conditional, size=args.size, max_steps=args.max_steps,
                      time_budget_min=args.time_budget_min, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      threads=args.threads, checkpoint_every=args.checkpoint_every, data_dir=args.data,
                      stop_at_step=args.stop_at_step)
    final = train(cfg)
    print(f"final EMA pipeline: {final}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2: no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_bench(args) -> None:
    from . import bench
    torch.set_num_threads(args.threads)
    if args.out:
        check_output_file(args.out)
    sections = []
    if args.model in ("sd15", "both", "all"):
        print(f"SD1.5-shaped UNet2DConditionModel (64,128,256,256), 32x32 latents, {args.steps} DDIM steps, "
              f"{args.rounds} rounds, {args.threads} thread(s)")
        results = bench.run_interleaved(bench.sd15_configs(args.steps), args.rounds)
        sections.append(bench.report("SD1.5-shaped UNet, 32×32 latents", results,
                                     ["CFG 7.5 (diffusers)", "no guidance (diffusers)"]))
    for name in ("flux", "wan"):  # PAG by depth on a random-weight transformer, beside the limit (n - d)/n
        if args.model in (name, "all"):
            header, title, make = bench.DEPTH_BENCHES[name]
            print(f"{header}, {args.steps} predictions, {args.rounds} rounds, {args.threads} thread(s)")
            configs, limits = make(args.steps)
            results = bench.run_interleaved(configs, args.rounds)
            sections.append(bench.report(title, results, ["no guidance"], limits))
    if args.model in ("demo", "both", "all"):
        if DEFAULT_UNCOND in shipped_models():
            model, title = load_model(DEFAULT_UNCOND), f"shipped {DEFAULT_UNCOND} UNet2DModel"
        else:
            model, _ = _random_demo_model()
            title = "demo-shaped UNet2DModel (random weights: no shipped model yet)"
        print(f"{title}, {args.steps} DDIM steps, {args.rounds} rounds")
        results = bench.run_interleaved(bench.demo_configs(model, args.steps, layers=args.demo_layers), args.rounds)
        sections.append(bench.report(title, results, ["no guidance"]))
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
        print(f"wrote {args.out}")


def _floats(text: str) -> list[float]:
    return [_finite(v) for v in text.split(",") if v.strip()]


def _options(text: str) -> dict[str, str]:
    out = {}
    for item in (i for i in text.split(",") if i.strip()):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"options look like key=value,key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _intervals(text: str) -> list[tuple[float, float]]:
    out = []
    for item in text.split(","):
        try:
            start, stop = (float(v) for v in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"intervals look like 0:1,0:0.33 (start:stop), got {item!r}")
        out.append((start, stop))
    return out


def eval_configs(args) -> list:
    """The configurations an ``eval`` command line sweeps (also read back by docs/make_results.py)."""
    from .evaluate import expand
    return expand(args.model, args.methods, scales=args.scales, cfg_scales=args.cfg_scales,
                  layer_sets=[_layer_list(group) for group in args.layers.split(";")],
                  perturbations=args.perturbations, sigmas=args.seg_sigmas, intervals=args.intervals,
                  sag_layers=args.sag_layers, seed_sets=args.seed_sets, scheduler=args.scheduler, steps=args.steps,
                  num_samples=args.num_samples, timestep_spacing=args.timestep_spacing, options=args.options)


def cmd_eval(args) -> None:
    from .evaluate import Sweep
    configs = eval_configs(args)
    check_output_folder(args.out)
    from .denoise import GuidedDenoiser
    from .load import load_model
    model = load_model(args.model)
    for config in configs:  # every layer name and scale checked before any sampling
        GuidedDenoiser(model, config.terms(),
                       scheduler=load_scheduler(args.model, args.scheduler, config.timestep_spacing))
    print(f"{len(configs)} configurations x {args.num_samples} samples -> {args.out}")
    sweep = Sweep(Path(args.out), configs, shard_size=args.shard_size, classifier=args.classifier,
                  classifier_b=args.classifier_b, inception=args.inception, reference=args.reference,
                  num_real=args.num_real, threads=args.threads,
                  max_new_shards=args.max_new_shards, progress=not args.quiet)
    rows = sweep.run()
    if rows:
        print((Path(args.out) / "results.md").read_text())


def cmd_tune(args) -> None:
    from .tune import Tune
    torch.set_num_threads(args.threads) if args.threads else None
    tune = Tune(args.model, args.method.strip().lower(), Path(args.out), args.budget,
                layers=None if args.layers is None else [_layer_list(group) for group in args.layers.split(";")],
                pairs=args.pairs, scales=args.scales, intervals=args.intervals, heads=args.heads, eta=args.eta,
                shard_size=args.shard_size, seed_set=args.seed_set, confirm_seed_set=args.confirm_seed_set,
                scheduler=args.scheduler, steps=args.steps, classifier=args.classifier,
                classifier_b=args.classifier_b, inception=args.inception, reference=args.reference,
                num_real=args.num_real, score=args.score, threads=args.threads, progress=not args.quiet)
    if args.dry_run:
        configs = tune.space()
        from .spec import format_spec
        print(f"{len(configs)} settings:", ", ".join(format_spec(c.terms()) for c in configs))
        print(tune.plan(configs).describe())
        return
    preset = tune.run()
    if preset is not None:
        print(f"wrote {Path(args.out) / 'preset.json'} ({preset['spec']}), tune.md, finalists.png")


# pagkit restore's operator options → make_operator's parameters
TASK_OPTIONS = {"box_size": "size", "keep_fraction": "keep_fraction", "blur_sigma": "sigma",
                "kernel_size": "kernel_size", "motion_intensity": "intensity", "operator_seed": "seed",
                "noise_sigma": "noise_sigma"}


def cmd_restore(args) -> None:
    from . import restore as R
    from .denoise import GuidedDenoiser
    from .report import labelled_grid
    from .sample import sample_shape
    torch.set_num_threads(args.threads) if args.threads else None
    if args.degraded and not args.input:
        raise ValueError("--degraded describes --input images; it does not go with --test-images")
    check_output_folder(args.out)
    params = {name: getattr(args, option) for option, name in TASK_OPTIONS.items()}
    operator = R.make_operator(args.task, **params)
    methods = {"dps": []}
    if args.pag_scale != 0:  # 0: DPS alone (its rows are shared with later runs of other PAG settings)
        methods["dps+pag"] = [G.PAG(args.pag_scale, layers=args.pag_layers)]
    out = Path(args.out)
    if args.test_images:
        rows = R.restore_eval(args.task, out, methods=methods, model=args.model, params=params,
                              num_images=args.test_images, step_size=args.step_size, num_inference_steps=args.steps,
                              scheduler=args.scheduler, eta=args.eta, seed=args.seed, batch_size=args.batch_size,
                              classifier=args.classifier, num_real=args.num_real, device=args.device,
                              max_new_shards=args.max_new_shards, first_image=args.first_image,
                              progress=not args.quiet)
        if rows:
            print((out / "metrics.md").read_text())
            print(f"wrote {out / 'grid.png'}, {out / 'metrics.md'}, {out / 'metrics.json'}")
        return
    with io.run_lock(out):  # one run per --out, as for --test-images
        model = load_model(args.model).to(args.device)
        scheduler = load_scheduler(args.model, args.scheduler)
        for terms in methods.values():  # every layer name checked before any work
            GuidedDenoiser(model, terms, scheduler=scheduler)
        blank = torch.zeros(sample_shape(model, 1))
        size = operator(blank).shape[-2:] if args.degraded else blank.shape[-2:]
        images = read_images(args.input, blank.shape[1], tuple(size)).to(args.device)
        restored, y, scores = R.restore_inputs(model, scheduler, operator, images, methods=methods,
                                               degraded=args.degraded, seed=args.seed, batch_size=args.batch_size,
                                               step_size=args.step_size, num_inference_steps=args.steps, eta=args.eta,
                                               progress_bar=not args.quiet)
        labels = {name: R.describe(name, terms, args.step_size) for name, terms in methods.items()}
        rows = R.grid_rows(operator, y, restored, None if args.degraded else images, labels)
        labelled_grid(rows, out / "grid.png")
        if args.degraded:
            print(f"wrote {out / 'grid.png'} (degraded inputs: no originals, so no PSNR/SSIM)")
            return
        results = [{**R.run_config(args.task, name, methods[name], step_size=args.step_size, scheduler=args.scheduler,
                                   steps=args.steps, eta=args.eta, seed=args.seed, model=args.model,
                                   operator=dataclasses.asdict(operator), inputs=list(args.input)), "metrics": metrics}
                   for name, metrics in scores.items()]
        print(R.write_tables(out, results))
        print(f"wrote {out / 'grid.png'}, {out / 'metrics.md'}, {out / 'metrics.json'}")


def _pag_options(p, scale: float = DEFAULT_PAG_SCALE) -> None:
    p.add_argument("--pag-scale", type=_finite, default=scale,
                   help=f"PAG s, the paper's convention (0 = off; default {scale:g})")
    p.add_argument("--pag-layers", type=_layer_list, default=DEFAULT_PAG_LAYERS,
                   help="comma-separated layer names/aliases (default: down.2, the 8x8 encoder attention)")


def _spacing_option(p) -> None:
    p.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None,
                   help="the scheduler's timestep spacing (default: the model's scheduler config; the shipped "
                        "models use leading, DDIM-20 from t=950; trailing starts at t=999)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pagkit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("layers", help="list a model's self-attention layers, token grids and aliases")
    p.add_argument("model", help="diffusers model or pipeline folder, or a shipped model name")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("sample", help="sample with and without guidance, same seeds, one labelled PNG grid")
    p.add_argument("--model", help="diffusers UNet2DModel/UNet2DConditionModel folder (default: the shipped models)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim",
                   help="sampler, built from the model's own scheduler config (default: ddim)")
    p.add_argument("--steps", type=_positive_int, default=20, help="denoising steps (default 20)")
    _spacing_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=_positive_int, default=8, help="seeds per row (default 8)")
    p.add_argument("--cfg-scale", type=_finite, default=DEFAULT_CFG_SCALE,
                   help=f"CFG w, diffusers' convention (1 = off; default {DEFAULT_CFG_SCALE:g})")
    _pag_options(p)
    p.add_argument("--seg-scale", type=_finite, default=DEFAULT_SEG_SCALE,
                   help=f"SEG γ (0 = off; default {DEFAULT_SEG_SCALE:g}, on mid: FD -7%% on fmnist, no saturation)")
    p.add_argument("--seg-sigma", type=_finite, default=float("inf"), help="query blur width (inf = mean query)")
    p.add_argument("--seg-layers", type=_layer_list, default=DEFAULT_SEG_LAYERS)
    p.add_argument("--sag-scale", type=_finite, default=DEFAULT_SAG_SCALE)
    p.add_argument("--sag-layer", default=DEFAULT_SAG_LAYER)
    p.add_argument("--guidance", action="append", metavar="SPEC",
                   help="a row of your own guidance instead of the default rows (repeatable), e.g. "
                        "'pag:1,layers=mid', 'slg:2,layers=mid', 'cfg:3; seg:1,layers=mid'. Terms are "
                        "separated by ';', options are the method's fields, lists joined by '+' "
                        "(see pagkit.spec); methods: " + ", ".join(METHODS))
    p.add_argument("--preset", action="append", metavar="FILE",
                   help="a row of a preset's guidance (pagkit tune's OUT/preset.json; repeatable, beside any "
                        "--guidance rows); a preset tuned for another model family is an error")
    p.add_argument("--class-label", type=int, default=None, help="class for conditional models (default: 0..9)")
    p.add_argument("--out", default="pagkit_samples.png", help="PNG grid to write")
    p.add_argument("--list-layers", action="store_true", help="print the models' layers and exit")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("bench", help="time guidance side by side: diffusers' PAG pipeline vs pagkit")
    p.add_argument("--model", choices=["sd15", "demo", "flux", "wan", "both", "all"], default="both",
                   help="sd15: SD1.5-shaped UNet vs diffusers; demo: the shipped UNet; flux: a Flux-shaped "
                        "transformer, PAG at several depths; wan: a Wan-shaped video transformer, likewise; "
                        "both = sd15 + demo; all = every one")
    p.add_argument("--steps", type=_positive_int, default=10)
    p.add_argument("--rounds", type=_positive_int, default=5)
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--demo-layers", default="mid", help="PAG layers for the demo UNet (default mid)")
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="resumable metric sweeps (FD, KID, IS, precision/recall); torchrun-ready")
    p.add_argument("--model", default=DEFAULT_UNCOND, help="shipped model name or diffusers folder")
    p.add_argument("--methods", type=lambda t: [m.strip() for m in t.split(",")], default=["none", "pag"],
                   help="comma-separated: none, any of " + ", ".join(METHODS) + ", or cfg+<method> (e.g. "
                        "cfg+pag); each method takes the axes it has (slg: --layers are block selections; its "
                        "interval is open at both ends, as diffusers' SD3 pipeline)")
    p.add_argument("--options", type=_options, default={}, metavar="KEY=VALUE,...",
                   help="further fields of the guided methods, as in pagkit sample --guidance (e.g. "
                        "'kernel_size=7'); each goes to every chosen method that has it, and into the row's key")
    p.add_argument("--scales", type=_floats, default=[3.0], help="PAG s / SEG γ / SAG s / SLG s values")
    p.add_argument("--cfg-scales", type=_floats, default=[3.0], help="CFG w values")
    p.add_argument("--layers", default=",".join(DEFAULT_PAG_LAYERS),
                   help="layer sets: ';' between sets, ',' within a set (e.g. 'down.1;mid;down.2,mid')")
    p.add_argument("--perturbations", type=lambda t: t.split(","), default=["identity"])
    p.add_argument("--seg-sigmas", type=_floats, default=[float("inf")])
    p.add_argument("--sag-layers", "--sag-layer", dest="sag_layers", type=_layer_list, default=["mid"],
                   help="SAG's attention layer; a comma-separated list sweeps one layer at a time")
    p.add_argument("--intervals", type=_intervals, default=[(0.0, 1.0)], help="start:stop fractions, e.g. 0:0.33")
    p.add_argument("--seed-sets", type=lambda t: [int(v) for v in t.split(",")], default=[0])
    p.add_argument("--num-samples", type=_positive_int, default=2000)
    p.add_argument("--shard-size", type=_positive_int, default=250)
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    p.add_argument("--steps", type=_positive_int, default=20)
    _spacing_option(p)
    p.add_argument("--classifier", default=None, help="feature classifier folder (default: the shipped one)")
    p.add_argument("--classifier-b", default=None,
                   help="the second feature network's folder, for fd_b/kid_b (default: the shipped "
                        "fmnist-classifier-b; not used with --inception)")
    p.add_argument("--inception", default=None, metavar="WEIGHTS.safetensors",
                   help="measure on FID InceptionV3 features instead (RGB models): torch-fidelity's "
                        "weights-inception-2015-12-05 saved as safetensors")
    p.add_argument("--reference", default=None, metavar="DIR|FILE.safetensors",
                   help="real images to compare with: a folder of images or a safetensors 'images' tensor "
                        "in [-1, 1] (default: the Fashion-MNIST test set)")
    p.add_argument("--num-real", type=_positive_int, default=10000, help="reference images used (the first N)")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--max-new-shards", type=_positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tune", help="choose a method's sites, scale and interval for a model (successive halving)",
                       description="Successive halving over sites x scales x intervals (x heads) within --budget "
                                   "generated samples; the winner is confirmed against no guidance on a fresh seed "
                                   "set. Writes OUT/preset.json, OUT/tune.md, OUT/finalists.png; resumable, "
                                   "torchrun-ready (see pagkit.tune).")
    p.add_argument("--model", default=DEFAULT_UNCOND, help="shipped model name or diffusers folder")
    p.add_argument("--method", required=True, help="the method to tune: " + ", ".join(TUNABLE))
    p.add_argument("--budget", type=_positive_int, required=True,
                   help="generated samples in all (search + confirmation); too small says the minimum")
    p.add_argument("--layers", default=None,
                   help="candidate site sets: ';' between sets, ',' within one (default: every site alone)")
    p.add_argument("--pairs", action="store_true", help="also every pair of the candidate sites")
    p.add_argument("--scales", type=_floats, default=None,
                   help="scale grid in the method's convention (default per method: " +
                        "; ".join(f"{m} {','.join(f'{v:g}' for v in vs)}" for m, vs in DEFAULT_SCALES.items()) + ")")
    p.add_argument("--intervals", type=_intervals, default=None,
                   help="start:stop fractions (default 0:1,0:0.5; slg 0.01:0.2,0:1)")
    p.add_argument("--heads", action="store_true", help="also each head alone (methods with heads=: pag)")
    p.add_argument("--eta", type=_positive_int, default=3, help="keep the best 1/η of each rung (default 3)")
    p.add_argument("--shard-size", type=_positive_int, default=50,
                   help="samples per shard, the unit of work and of the plan (default 50)")
    p.add_argument("--seed-set", type=int, default=0, help="seed set the search chooses on (default 0)")
    p.add_argument("--confirm-seed-set", type=int, default=1, help="fresh seed set of the confirmation (default 1)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument("--classifier", default=None, help="feature classifier folder (default: the shipped one)")
    p.add_argument("--classifier-b", default=None, help="second feature network (default: fmnist-classifier-b)")
    p.add_argument("--inception", default=None, metavar="WEIGHTS.safetensors",
                   help="score by Inception FD instead (as pagkit eval), against --reference")
    p.add_argument("--reference", default=None, metavar="DIR|FILE.safetensors",
                   help="real images (default: the Fashion-MNIST test set)")
    p.add_argument("--num-real", type=_positive_int, default=10000)
    p.add_argument("--score", default=None, metavar="MODULE:FUNCTION",
                   help="score by your callable instead: it takes images (N, C, H, W) in [-1, 1] and returns a "
                        "number, LOWER IS BETTER (module:function or path/file.py:function)")
    p.add_argument("--dry-run", action="store_true", help="print the search space and plan, sample nothing")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("restore", help="inverse problems by DPS, with and without PAG: grid, PSNR/SSIM/FD table",
                       description="Degrade images (or take degraded ones) and restore them by DPS posterior "
                                   "sampling, without and with PAG, from the same noise. --test-images runs are "
                                   "sharded and resume where they stopped.")
    p.add_argument("--task", required=True, choices=list(TASKS), help="the measurement operator")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="IMG", help="images (PNG) to degrade and restore")
    source.add_argument("--test-images", type=_positive_int, metavar="N",
                        help="N Fashion-MNIST test images (the first N, or from --first-image), with FD "
                             "against the test set")
    p.add_argument("--first-image", type=_nonnegative_int, default=0, metavar="K",
                   help="--test-images starts at test image K (default 0); choose settings on one split, "
                        "report on another")
    p.add_argument("--degraded", action="store_true",
                   help="the --input images are already degraded by this task's operator (no PSNR/SSIM)")
    p.add_argument("--model", default=DEFAULT_UNCOND, help="shipped model name or diffusers folder")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    p.add_argument("--steps", type=_positive_int, default=50, help="denoising steps (default 50)")
    p.add_argument("--eta", type=_nonnegative, default=1.0, help="DDIM's η (default 1: ancestral, as DPS)")
    p.add_argument("--step-size", type=_nonnegative, default=DEFAULT_STEP_SIZE,
                   help=f"DPS's ζ (default {DEFAULT_STEP_SIZE:g}; 0 = no data consistency)")
    _pag_options(p, scale=DEFAULT_RESTORE_PAG_SCALE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=50)
    p.add_argument("--noise-sigma", type=_finite, default=None, help="measurement noise σ_y (default 0.05)")
    p.add_argument("--box-size", type=_positive_int, default=None, help="box-inpaint: box side in pixels (half)")
    p.add_argument("--keep-fraction", type=_finite, default=None, help="random-inpaint: pixels kept (0.3)")
    p.add_argument("--kernel-size", type=_positive_int, default=None, help="blur tasks: odd kernel side (9)")
    p.add_argument("--blur-sigma", type=_finite, default=None, help="gaussian-deblur: σ in pixels (1.5)")
    p.add_argument("--motion-intensity", type=_finite, default=None, help="motion-deblur: shake, 0..1 (0.5)")
    p.add_argument("--operator-seed", type=int, default=None, help="random-inpaint mask / motion kernel (0)")
    p.add_argument("--classifier", default=None, help="feature classifier folder (default: the shipped one)")
    p.add_argument("--num-real", type=_positive_int, default=10000, help="test images used as FD's reference")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device to restore on (default cpu)")
    p.add_argument("--max-new-shards", type=_positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="pagkit_restore", help="output folder (default pagkit_restore)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("train", help="train a Fashion-MNIST UNet2DModel (resumes from OUT/checkpoint)")
    p.add_argument("--out", required=True)
    p.add_argument("--conditional", action="store_true", help="class-conditional, with a null class for CFG")
    p.add_argument("--size", choices=["small", "tiny"], default="small")
    p.add_argument("--max-steps", type=_positive_int, default=6000)
    p.add_argument("--stop-at-step", type=_positive_int, default=None,
                   help="stop after this step (with a checkpoint; resumable), the schedules still set by "
                        "--max-steps: how the 25%% snapshot fmnist-weak is made")
    p.add_argument("--time-budget-min", type=_nonnegative, default=None)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_finite, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--checkpoint-every", type=_positive_int, default=250)
    p.add_argument("--data", default=None, help="folder of the Fashion-MNIST idx .gz files")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as err:  # OSError: a full disk, an unreadable file
        text = err.strerror if isinstance(err, OSError) and err.strerror and err.filename is None else str(err)
        message = text.splitlines()[0] if text else type(err).__name__
        print(f"pagkit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
