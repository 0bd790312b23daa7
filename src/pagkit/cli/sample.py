"""pagkit sample: the same seeds with and without guidance, as one labelled PNG grid."""
from __future__ import annotations

import math
import time

import torch

from .. import guidance as G
from ..defaults import (DEFAULT_CFG_SCALE, DEFAULT_COND, DEFAULT_SAG_LAYER, DEFAULT_SAG_SCALE, DEFAULT_SEG_LAYERS,
                        DEFAULT_SEG_SCALE, DEFAULT_UNCOND, NULL_CLASS)
from ..io import check_output_file
from ..layers import layers
from ..load import SCHEDULERS, load_model, load_scheduler, shipped_models
from ..methods import METHODS
from .common import _finite, _floats, _layer_list, _pag_options, _positive_int, _random_demo_model, _spacing_option


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample with and without guidance, same seeds, one labelled PNG grid")
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
                   help=f"SEG γ (0 = off; default {DEFAULT_SEG_SCALE:g}, chosen on fmnist: docs/results.md, table 9a)")
    p.add_argument("--seg-sigma", type=_finite, default=float("inf"), help="query blur width (inf = mean query)")
    p.add_argument("--seg-layers", type=_layer_list, default=DEFAULT_SEG_LAYERS,
                   help=f"comma-separated layer names/aliases (default: {','.join(DEFAULT_SEG_LAYERS)})")
    p.add_argument("--sag-scale", type=_finite, default=DEFAULT_SAG_SCALE)
    p.add_argument("--sag-layer", default=DEFAULT_SAG_LAYER)
    p.add_argument("--guidance", action="append", metavar="SPEC",
                   help="a row of your own guidance instead of the default rows (repeatable), e.g. "
                        "'pag:1,layers=mid', 'slg:2,layers=mid', 'cfg:3; seg:1,layers=mid'. Terms are "
                        "separated by ';', options are the method's fields, lists joined by '+' "
                        "(see pagkit.spec); methods: " + ", ".join(METHODS))
    p.add_argument("--preset", action="append", metavar="FILE",
                   help="a row of a preset's guidance: pagkit tune's OUT/preset.json, or a shipped preset by name "
                        "(fmnist:pag, fmnist:seg; repeatable, beside any --guidance rows); a preset tuned for "
                        "another model family is an error")
    p.add_argument("--strip", type=_floats, default=None, metavar="S,S,...",
                   help="also a scale strip: one row per PAG scale on --pag-layers (with CFG on a conditional "
                        "model), the same seeds, so the effect shows growing into oversaturation; ./run demo "
                        "uses 0,0.5,1,2,3")
    p.add_argument("--class-label", type=int, default=None, help="class for conditional models (default: 0..9)")
    p.add_argument("--out", default="pagkit_samples.png", help="PNG grid to write")
    p.add_argument("--list-layers", action="store_true", help="print the models' layers and exit")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _configurations(args, conditional: bool | None) -> list[tuple[str, list]]:
    """The grid's rows for one model: (label, guidance terms), the unguided row first, then any --strip rows.
    ``conditional=None``: the model is not loaded yet (every term is checked, but not whether it can take CFG)."""
    return _rows(args, conditional) + _strip(args, conditional)


def _strip(args, conditional: bool | None) -> list[tuple[str, list]]:
    """PAG at each --strip scale on --pag-layers, or on the sites of the model's first PAG preset row (after CFG
    on a conditional model): s = 0 is the unguided row. Of the shipped pair only the unconditional model gets one
    (one strip shows the effect; two double the time)."""
    if conditional and not args.model:
        return []
    sites = next((t.layers for _, terms in _preset_rows(args, conditional) for t in terms if type(t) is G.PAG),
                 args.pag_layers)
    sites = [sites] if isinstance(sites, str) else list(sites)
    cfg = [G.CFG(args.cfg_scale)] if conditional else []
    prefix = f"CFG w={args.cfg_scale:g} + " if conditional else ""
    return [(f"strip: {prefix}PAG s={s:g}\n{','.join(sites)}", cfg + [G.PAG(s, layers=sites)])
            for s in args.strip or []]


def _preset_rows(args, conditional: bool | None) -> list[tuple[str, list]]:
    """(name, terms) of the --preset rows for this model. On the shipped pair a preset tuned for one of them goes to
    that model only (fmnist:pag to fmnist; fmnist-cond keeps its own rows); any other preset goes to both."""
    from ..presets import load_preset
    rows = [(name, load_preset(name)) for name in args.preset or []]
    if args.model or conditional is None:
        return rows
    pair, mine = (DEFAULT_UNCOND, DEFAULT_COND), DEFAULT_COND if conditional else DEFAULT_UNCOND
    return [(name, terms) for name, terms in rows if _tuned_for(terms) not in pair or _tuned_for(terms) == mine]


def _tuned_for(terms: list) -> str | None:
    """The model a preset's terms were tuned for (``load_preset`` records it), None for terms built otherwise."""
    return (getattr(terms[0], "tuned_for", None) or {}).get("model") if terms else None


def _rows(args, conditional: bool | None) -> list[tuple[str, list]]:
    presets = _preset_rows(args, conditional)
    if args.guidance or presets:  # the user's rows (pagkit.spec, presets), after the unguided one
        from ..spec import format_spec, label, parse_spec
        rows = [(label(terms), terms) for terms in (parse_spec(text) for text in args.guidance or []) if terms]
        rows += [(f"{label(terms)}\npreset {name}".replace(" (", "\n("), terms) for name, terms in presets]
        with_cfg = [terms for _, terms in rows if any(isinstance(t, G.CFG) for t in terms)]
        if with_cfg and conditional is False:
            if args.model:  # the user's one model cannot do it
                raise ValueError(f"--guidance {format_spec(with_cfg[0])!r}: CFG needs a class-conditional model "
                                 f"(with a null class); {args.model} is unconditional")
            rows = [(text, terms) for text, terms in rows if terms not in with_cfg]  # the pair: CFG on fmnist-cond
        return [("no guidance", [])] + [(text.replace(" + ", "\n+ "), terms) for text, terms in rows]
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


def check_class_label(class_label: int | None, model, title: str, conditional: bool) -> None:
    """``--class-label`` within a conditional model's classes (the null class named); also the studio's check."""
    classes = model.config.get("num_class_embeds")
    if conditional and class_label is not None and classes and not 0 <= class_label < classes:
        null = f"; {NULL_CLASS} is the null class of CFG" if NULL_CLASS < classes else ""
        raise ValueError(f"--class-label {class_label} is out of range for {title}: its classes are "
                         f"0..{classes - 1}{null}")


def _jobs(args) -> list[tuple]:
    """(title, model, scheduler, conditional) per model to sample: --model, else the shipped pair."""
    if args.model:
        model = load_model(args.model)
        conditional = bool(model.config.get("num_class_embeds"))
        if args.class_label is not None and not conditional:
            raise ValueError(f"--class-label {args.class_label}: {args.model} is unconditional (its config has no "
                             "num_class_embeds); leave --class-label out, or give a class-conditional model")
        return [(str(args.model), model, load_scheduler(args.model, args.scheduler, args.timestep_spacing),
                 conditional)]
    jobs = []
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
    return jobs


def run(args) -> None:
    from ..report import labelled_grid
    from ..sample import sample
    torch.set_num_threads(args.threads) if args.threads else None
    _configurations(args, conditional=None), _configurations(args, conditional=True)  # scales etc., before loading
    if not args.list_layers:
        check_output_file(args.out)
    jobs = _jobs(args)
    if args.list_layers:
        for title, model, _, _ in jobs:
            print(f"[{title}]")
            for info in layers(model):
                print(f"  {info.name}  {info.grid}")
        return

    from ..denoise import GuidedDenoiser
    for title, model, scheduler, conditional in jobs:  # check every layer name before spending time sampling
        for _, terms in _configurations(args, conditional):
            GuidedDenoiser(model, terms, scheduler=scheduler)
        check_class_label(args.class_label, model, title, conditional)

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
