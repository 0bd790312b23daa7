"""What the subcommands share: argparse types, the one-line-error parser, option groups, the demo model."""
from __future__ import annotations

import argparse
import math

import torch

from ..defaults import DEFAULT_PAG_LAYERS, DEFAULT_PAG_SCALE
from ..load import TIMESTEP_SPACINGS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2: no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def _floats(text: str) -> list[float]:
    return [_finite(v) for v in text.split(",") if v.strip()]


def _options(text: str) -> dict[str, str]:
    from ..spec import _split
    try:
        items = _split(text)  # commas inside a rule's parentheses stay: rule=apg(eta=0,momentum=-0.5)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    out = {}
    for item in items:
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


def _layer_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _layer_sets(text: str) -> list[list[str]]:
    """eval's and tune's --layers: ';' between sets, ',' within a set."""
    return [_layer_list(group) for group in text.split(";")]


def _pag_options(p, scale: float = DEFAULT_PAG_SCALE, layers: list[str] = DEFAULT_PAG_LAYERS) -> None:
    p.add_argument("--pag-scale", type=_finite, default=scale,
                   help=f"PAG s, the paper's convention (0 = off; default {scale:g})")
    p.add_argument("--pag-layers", type=_layer_list, default=layers,
                   help=f"comma-separated layer names/aliases (default: {','.join(layers)})")


def _spacing_option(p) -> None:
    p.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None,
                   help="the scheduler's timestep spacing (default: the model's scheduler config; the shipped "
                        "models use leading, DDIM-20 from t=950; trailing starts at t=999)")


def _random_demo_model(conditional: bool = False):
    """sample's and bench's stand-in when no shipped model is installed."""
    from ..train import unet_config
    from diffusers import DDIMScheduler, UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(**unet_config(conditional=conditional)).eval(), DDIMScheduler()
