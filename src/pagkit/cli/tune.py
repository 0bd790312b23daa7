"""pagkit tune: a method's sites, scale and interval for a model by successive halving (see pagkit.tune)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..defaults import DEFAULT_UNCOND
from ..load import SCHEDULERS
from ..tune import DEFAULT_SCALES, TUNABLE
from .common import _floats, _intervals, _layer_sets, _nonnegative_int, _positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="choose a method's sites, scale and interval for a model (successive halving)",
        description="Successive halving over sites x scales x intervals (x heads) within --budget "
                    "generated samples; --pair-best K adds the pairs of rung 0's K best single sites at "
                    "rung 1; --heads greedy then grows a head set on the winner's sites (HeadHunter), "
                    "kept only if it beats the whole layer on the same seeds. The winner is confirmed "
                    "against no guidance on a fresh seed set. Writes OUT/preset.json, OUT/tune.md, "
                    "OUT/finalists.png; resumable, torchrun-ready (see pagkit.tune).")
    p.add_argument("--model", default=DEFAULT_UNCOND, help="shipped model name or diffusers folder")
    p.add_argument("--method", required=True, help="the method to tune: " + ", ".join(TUNABLE))
    p.add_argument("--budget", type=_positive_int, required=True,
                   help="generated samples in all (search, head search, confirmation); too small says the minimum")
    p.add_argument("--layers", default=None,
                   help="candidate site sets: ';' between sets, ',' within one (default: every site alone)")
    p.add_argument("--pairs", action="store_true", help="also every pair of the candidate sites (up front)")
    p.add_argument("--pair-best", type=_nonnegative_int, default=0, metavar="K",
                   help="after rung 0, also every pair of its K best single sites (K >= 2) at the survivors' "
                        "scales and intervals; the budget counts them (default 0: off)")
    p.add_argument("--scales", type=_floats, default=None,
                   help="scale grid in the method's convention (default per method: " +
                        "; ".join(f"{m} {','.join(f'{v:g}' for v in vs)}" for m, vs in DEFAULT_SCALES.items()) + ")")
    p.add_argument("--intervals", type=_intervals, default=None,
                   help="start:stop fractions (default 0:1,0:0.5; slg 0.01:0.2,0:1)")
    p.add_argument("--heads", nargs="?", const="each", default=None, choices=("each", "greedy"),
                   help="methods with heads= (pag): 'each' (the default of a bare --heads) also searches each head "
                        "alone; 'greedy' grows a head set on the halving's winner, one head per round while "
                        "the score improves (HeadHunter, arXiv 2506.10978), each candidate on the last rung's "
                        "samples; the preset takes it only if it beats the whole layer on those seeds")
    p.add_argument("--max-heads", type=_positive_int, default=None, metavar="K",
                   help="with --heads greedy: at most K heads, i.e. K rounds (default 4)")
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
    p.set_defaults(func=run)


def run(args) -> None:
    from ..tune import Tune
    torch.set_num_threads(args.threads) if args.threads else None
    tune = Tune(args.model, args.method.strip().lower(), Path(args.out), args.budget,
                layers=None if args.layers is None else _layer_sets(args.layers),
                pairs=args.pairs, scales=args.scales, intervals=args.intervals, heads=args.heads or False,
                max_heads=args.max_heads, pair_best=args.pair_best, eta=args.eta,
                shard_size=args.shard_size, seed_set=args.seed_set, confirm_seed_set=args.confirm_seed_set,
                scheduler=args.scheduler, steps=args.steps, classifier=args.classifier,
                classifier_b=args.classifier_b, inception=args.inception, reference=args.reference,
                num_real=args.num_real, score=args.score, threads=args.threads, progress=not args.quiet)
    if args.dry_run:
        configs = tune.space()
        from ..spec import format_spec
        print(f"{len(configs)} settings:", ", ".join(format_spec(c.terms()) for c in configs))
        print(tune.plan(configs).describe())
        return
    preset = tune.run()
    if preset is not None:
        print(f"wrote {Path(args.out) / 'preset.json'} ({preset['spec']}), tune.md, finalists.png")
