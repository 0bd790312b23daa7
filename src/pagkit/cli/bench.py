"""pagkit bench: guidance timed side by side, diffusers' PAG pipeline against pagkit (see pagkit.bench)."""
from __future__ import annotations

import torch

from ..defaults import DEFAULT_COND, DEFAULT_UNCOND
from ..io import atomic_path, check_output_file
from ..load import load_model, shipped_models
from ..spec import format_spec
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
    p.add_argument("--batch", type=_positive_int, default=1, help="samples per run of the demo rows (default 1)")
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the results as JSON: per table and configuration the median seconds, the "
                        "ratio to the table's baseline, every round, and the run's steps, rounds, threads, date "
                        "and machine load (docs/results.md table 12 reads docs/evidence/frontier_cost.json)")
    p.set_defaults(func=run)


def run(args) -> None:
    from .. import bench
    torch.set_num_threads(args.threads)
    import datetime
    for path in (args.out, args.json):
        if path:
            check_output_file(path)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = bench.machine_load()
    sections, machine = [], []
    if args.model in ("sd15", "both", "all"):
        print(f"SD1.5-shaped UNet2DConditionModel (64,128,256,256), 32x32 latents, {args.steps} DDIM steps, "
              f"{args.rounds} rounds, {args.threads} thread(s)")
        unet = bench.sd15_shaped_unet()
        results = bench.run_interleaved(bench.sd15_configs(args.steps, unet=unet), args.rounds)
        sections.append(bench.report("SD1.5-shaped UNet, 32×32 latents", results,
                                     ["CFG 7.5 (diffusers)", "no guidance (diffusers)"]))
        sections.append(bench.sd15_reading(results, share=bench.prefix_share(unet)))
        machine.append(bench.json_section("SD1.5-shaped UNet, 32×32 latents", "sd15-shaped", results,
                                          "no guidance (diffusers)"))
    for name in ("flux", "wan"):  # PAG by depth on a random-weight transformer, beside the limit (n - d)/n
        if args.model in (name, "all"):
            header, title, make = bench.DEPTH_BENCHES[name]
            print(f"{header}, {args.steps} predictions, {args.rounds} rounds, {args.threads} thread(s)")
            configs, limits = make(args.steps)
            results = bench.run_interleaved(configs, args.rounds)
            sections.append(bench.report(title, results, ["no guidance"], limits))
            machine.append(bench.json_section(title, f"{name}-shaped", results, "no guidance"))
    if args.model in ("demo", "both", "all"):
        if DEFAULT_UNCOND in shipped_models():
            model, title = load_model(DEFAULT_UNCOND), f"shipped {DEFAULT_UNCOND} UNet2DModel"
        else:
            model, _ = _random_demo_model()
            title = "demo-shaped UNet2DModel (random weights: no shipped model yet)"
        # the frontier's variants (docs/results.md table 12) beside the demo rows: their terms, names and specs
        uncond, cond = bench.frontier_terms()
        print(f"{title}, {args.steps} DDIM steps, batch {args.batch}, {args.rounds} rounds")
        results = bench.run_interleaved(bench.demo_configs(model, args.steps, batch=args.batch,
                                                           layers=args.demo_layers, frontier=uncond), args.rounds)
        sections.append(bench.report(title, results, ["no guidance"]))
        machine.append(bench.json_section(title, DEFAULT_UNCOND if "shipped" in title else "random-demo", results,
                                          "no guidance", {k: format_spec(t) for k, t in uncond.items()}))
        if DEFAULT_COND in shipped_models():  # the conditional rows: cost relative to CFG
            model = load_model(DEFAULT_COND)
            title = f"shipped {DEFAULT_COND} UNet2DModel, frontier rows (÷ CFG)"
        else:
            model, _ = _random_demo_model(conditional=True)
            title = "demo-shaped class-conditional UNet2DModel (random weights: no shipped model yet), frontier rows"
        print(f"{title}, {args.steps} DDIM steps, batch {args.batch}, {args.rounds} rounds")
        baseline = next(iter(cond))  # CFG alone
        results = bench.run_interleaved(bench.frontier_cond_configs(model, args.steps, args.batch, cond), args.rounds)
        sections.append(bench.report(title, results, [baseline]))
        machine.append(bench.json_section(title, DEFAULT_COND if "shipped" in title else "random-demo-cond",
                                          results, baseline, {k: format_spec(t) for k, t in cond.items()}))
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
        print(f"wrote {args.out}")
    if args.json:
        from ..io import write_json
        write_json(args.json, {
            "command": f"pagkit bench --model {args.model} --steps {args.steps} --batch {args.batch} "
                       f"--rounds {args.rounds} --threads {args.threads} --demo-layers {args.demo_layers} "
                       f"--json {args.json}",
            "date": started.isoformat(timespec="seconds"), "steps": args.steps, "batch": args.batch,
            "rounds": args.rounds, "threads": args.threads, "torch": torch.__version__,
            "load_before": load_before, "load_after": bench.machine_load(),
            "note": "ratio: median seconds of a sampling run / the table's baseline's (no guidance, or CFG for "
                    "the conditional frontier rows), same steps, batch and noise, rounds interleaved",
            "tables": machine})
        print(f"wrote {args.json}")
