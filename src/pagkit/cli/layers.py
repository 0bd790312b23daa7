"""pagkit layers: a model's self-attention sites, their token grids and the aliases that name them."""
from __future__ import annotations

from ..layers import aliases, layers
from ..load import load_model


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("layers", help="list a model's self-attention layers, token grids and aliases")
    p.add_argument("model", help="diffusers model or pipeline folder, or a shipped model name")
    p.set_defaults(func=run)


def run(args) -> None:
    from ..backends import detect
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
