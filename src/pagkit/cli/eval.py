"""pagkit eval: resumable, torchrun-ready metric sweeps over guidance configurations (see pagkit.evaluate)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..defaults import DEFAULT_PAG_LAYERS, DEFAULT_UNCOND
from ..io import check_output_folder
from ..load import SCHEDULERS, load_model, load_scheduler
from ..methods import METHODS
from .common import _floats, _intervals, _layer_list, _layer_sets, _options, _positive_int, _spacing_option


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="resumable metric sweeps (FD, KID, IS, precision/recall); torchrun-ready")
    p.add_argument("--model", default=DEFAULT_UNCOND, help="shipped model name or diffusers folder")
    p.add_argument("--methods", type=lambda t: [m.strip() for m in t.split(",")], default=["none", "pag"],
                   help="comma-separated: none, any of " + ", ".join(METHODS) + ", or cfg+<method> (e.g. "
                        "cfg+pag); each method takes the axes it has (slg: --layers are block selections; its "
                        "interval is open at both ends, as diffusers' SD3 pipeline)")
    p.add_argument("--options", type=_options, action="append", default=None, metavar="KEY=VALUE,...",
                   help="further fields of the guided methods, as in pagkit sample --guidance (e.g. "
                        "'kernel_size=7'); each goes to every chosen method that has it, and into the row's key. "
                        "Repeat it to sweep them: --options 'rule=apg(eta=0)' --options 'rule=apg(eta=1)'")
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
    p.set_defaults(func=run)


def eval_configs(args) -> list:
    """The configurations an ``eval`` command line sweeps (also read back by docs/make_results.py)."""
    from ..evaluate import expand
    configs = {}
    for options in args.options or [{}]:  # one sweep per option set; the rows they share (none, cfg) once
        for config in expand(args.model, args.methods, scales=args.scales, cfg_scales=args.cfg_scales,
                             layer_sets=_layer_sets(args.layers), perturbations=args.perturbations,
                             sigmas=args.seg_sigmas, intervals=args.intervals, sag_layers=args.sag_layers,
                             seed_sets=args.seed_sets, scheduler=args.scheduler, steps=args.steps,
                             num_samples=args.num_samples, timestep_spacing=args.timestep_spacing, options=options):
            configs.setdefault(config.key, config)
    return list(configs.values())


def run(args) -> None:
    from ..denoise import GuidedDenoiser
    from ..evaluate import Sweep
    configs = eval_configs(args)
    check_output_folder(args.out)
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
