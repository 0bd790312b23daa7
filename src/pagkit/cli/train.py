"""pagkit train: the resumable trainer of the Fashion-MNIST demo models."""
from __future__ import annotations

from ..io import check_output_folder
from .common import _finite, _nonnegative, _positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a Fashion-MNIST UNet2DModel (resumes from OUT/checkpoint)")
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
    p.set_defaults(func=run)


def run(args) -> None:
    from ..train import TrainConfig, train
    check_output_folder(args.out)
    cfg = TrainConfig(out=args.out, conditional=args.conditional, size=args.size, max_steps=args.max_steps,
                      time_budget_min=args.time_budget_min, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      threads=args.threads, checkpoint_every=args.checkpoint_every, data_dir=args.data,
                      stop_at_step=args.stop_at_step)
    final = train(cfg)
    print(f"final EMA pipeline: {final}")
