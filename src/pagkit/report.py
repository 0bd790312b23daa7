"""Images for people: labelled sample grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .io import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def labelled_grid(rows: list[tuple[str, torch.Tensor]], path: str | Path, zoom: int = 3, pad: int = 2,
                  label_width: int = 190) -> Path:
    """One row per (label, images) pair; the same column = the same seed. Written atomically as PNG."""
    font = ImageFont.load_default(size=13)  # at the default size 10, spaces all but vanish
    n_cols = max(len(images) for _, images in rows)
    h, w = rows[0][1].shape[-2] * zoom, rows[0][1].shape[-1] * zoom
    canvas = Image.new("RGB", (label_width + n_cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (h + pad)
        for line_no, line in enumerate(label.split("\n")):
            draw.text((4, y + 4 + 15 * line_no), line, fill="black", font=font)
        for c, img in enumerate(to_uint8(images)):
            tile = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
            tile = tile.resize((w, h), Image.NEAREST).convert("RGB")
            canvas.paste(tile, (label_width + pad + c * (w + pad), y))
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
