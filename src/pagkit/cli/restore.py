"""pagkit restore: inverse problems by DPS, with and without PAG, from the same noise (see pagkit.restore)."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .. import guidance as G
from .. import io
from .. import restore as R
from ..data import read_images
from ..defaults import DEFAULT_RESTORE_PAG_LAYERS, DEFAULT_RESTORE_PAG_SCALE, DEFAULT_UNCOND
from ..io import check_output_folder
from ..load import SCHEDULERS, load_model, load_scheduler
from ..restore import DEFAULT_STEP_SIZE, TASKS
from .common import _finite, _nonnegative, _nonnegative_int, _pag_options, _positive_int


class OperatorOption(NamedTuple):
    flag: str
    parameter: str  # make_operator's (the operator dataclass's field)
    type: Callable[[str], object]
    help: str  # ends with the operator's default, in brackets


# pagkit restore's operator options, all defaulting to None (= the operator's own default): a new operator
# parameter is one row here. make_operator refuses one the --task does not take, naming those it does.
OPERATOR_OPTIONS = (
    OperatorOption("--noise-sigma", "noise_sigma", _finite, "measurement noise σ_y (default 0.05)"),
    OperatorOption("--box-size", "size", _positive_int, "box-inpaint: box side in pixels (half)"),
    OperatorOption("--keep-fraction", "keep_fraction", _finite, "random-inpaint: pixels kept (0.3)"),
    OperatorOption("--kernel-size", "kernel_size", _positive_int, "blur tasks: odd kernel side (9)"),
    OperatorOption("--blur-sigma", "sigma", _finite, "gaussian-deblur: σ in pixels (1.5)"),
    OperatorOption("--motion-intensity", "intensity", _finite, "motion-deblur: shake, 0..1 (0.5)"),
    OperatorOption("--operator-seed", "seed", int, "random-inpaint mask / motion kernel (0)"),
)
# argparse dest → make_operator's parameter
TASK_OPTIONS = {o.flag[2:].replace("-", "_"): o.parameter for o in OPERATOR_OPTIONS}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "restore", help="inverse problems by DPS, with and without PAG: grid, PSNR/SSIM/FD table",
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
    _pag_options(p, scale=DEFAULT_RESTORE_PAG_SCALE, layers=DEFAULT_RESTORE_PAG_LAYERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=50)
    for option in OPERATOR_OPTIONS:
        p.add_argument(option.flag, type=option.type, default=None, help=option.help)
    p.add_argument("--classifier", default=None, help="feature classifier folder (default: the shipped one)")
    p.add_argument("--num-real", type=_positive_int, default=10000, help="test images used as FD's reference")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device to restore on (default cpu)")
    p.add_argument("--max-new-shards", type=_positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="pagkit_restore", help="output folder (default pagkit_restore)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> None:
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
    _restore_inputs(args, operator, methods, out)


def _restore_inputs(args, operator, methods: dict, out: Path) -> None:
    """--input: restore the user's images (degrading them first unless --degraded), one grid and table."""
    from ..denoise import GuidedDenoiser
    from ..report import labelled_grid
    from ..sample import sample_shape
    model = load_model(args.model).to(args.device)
    scheduler = load_scheduler(args.model, args.scheduler)
    for terms in methods.values():  # every layer name checked before any work
        GuidedDenoiser(model, terms, scheduler=scheduler)
    blank = torch.zeros(sample_shape(model, 1))
    size = operator(blank).shape[-2:] if args.degraded else blank.shape[-2:]
    images = read_images(args.input, blank.shape[1], tuple(size)).to(args.device)
    with io.run_lock(out):  # one run per --out, as for --test-images; taken once the inputs are checked
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
