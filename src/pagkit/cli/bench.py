"""pagkit bench: guidance timed side by side, diffusers' PAG pipeline against pagkit (see pagkit.bench)."""
from __future__ import annotations

import torch

from ..defaults import DEFAULT_UNCOND
from ..io import atomic_path, check_output_file
from ..load import load_model, shipped_models
from .common import _positive_int, _random_demo_model


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time guidance side by side: diffusers' PAG pipeline vs pagkit")
    p.add_argument("--model", choices=["sd15", "demo", "flux", "wan", "both", "all"], default="both",
                   help="sd15: SD1.5-shaped UNet vs diffusers; demo: the shipped UNet; flux: a Flux-shaped "
                        "transformer, PAG at several depths; wan: a Wan-shaped video transformer, likewise; "
                        "both = sd15 + demo; all = every one")
    p.add_argument("--steps", type=_positive_int, default=10)
    p.add_argument("--rounds", type=_positive_int, default=5)
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--demo-layers", default="mid", help="PAG layers for the demo UNet (default mid)")
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    p.set_defaults(func=run)


def run(args) -> None:
    from .. import bench
    torch.set_num_threads(args.threads)
    if args.out:
        check_output_file(args.out)
    sections = []
    if args.model in ("sd15", "both", "all"):
        print(f"SD1.5-shaped UNet2DConditionModel (64,128,256,256), 32x32 latents, {args.steps} DDIM steps, "
              f"{args.rounds} rounds, {args.threads} thread(s)")
        unet = bench.sd15_shaped_unet()
        results = bench.run_interleaved(bench.sd15_configs(args.steps, unet=unet), args.rounds)
        sections.append(bench.report("SD1.5-shaped UNet, 32×32 latents", results,
                                     ["CFG 7.5 (diffusers)", "no guidance (diffusers)"]))
        sections.append(bench.sd15_reading(results, share=bench.prefix_share(unet)))
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
