"""Fashion-MNIST from the idx .gz files, as tensors in [-1, 1], padded 28 -> 32.

The data never comes from the network: pagkit reads the four idx files from a
folder (default ``../shared/data/fashion-mnist`` beside the checkout, or
``$PAGKIT_DATA``).
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import InputNotFound

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SIZE = 32  # 28 padded by 2 on each side: UNets want sizes divisible by 2**depth


def default_data_dir() -> Path:
    if "PAGKIT_DATA" in os.environ:
        return Path(os.environ["PAGKIT_DATA"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "data" / "fashion-mnist"
        if candidate.is_dir():
            return candidate
        candidate = parent.parent / "shared" / "data" / "fashion-mnist"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data" / "fashion-mnist"


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def data_checksum(data_dir: str | Path | None = None, split: str = "train") -> str:
    """md5 of the uncompressed images and labels of a split (independent of the gzip wrapper)."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    h = hashlib.md5()
    for name in FILES[split]:
        with gzip.open(data_dir / name, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def load_fashion_mnist(split: str = "train", data_dir: str | Path | None = None,
                       pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, 1, 32, 32) in [-1, 1] (background -1) and labels as int64 (N,)."""
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(FILES)}")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    paths = [data_dir / name for name in FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputNotFound(
            f"Fashion-MNIST files not found: {', '.join(missing)}. "
            "Point --data (or $PAGKIT_DATA) at the folder holding the idx .gz files.")
    images = torch.from_numpy(_read_idx(paths[0]).copy()).float().div_(127.5).sub_(1.0)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    images = images.unsqueeze(1)
    if pad:
        images = F.pad(images, (2, 2, 2, 2), value=-1.0)
    return images, labels


def read_images(paths: list[str | Path], channels: int, size: tuple[int, int]) -> torch.Tensor:
    """PNG (or any PIL) images as (N, channels, H, W) in [-1, 1], at ``size`` = (H, W).

    Grayscale/RGB are converted to ``channels`` (1 or 3). A larger image is shrunk to fit
    (box filter: the exact inverse of a nearest-neighbour upscale by an integer factor);
    a smaller one is centred and padded with its own border pixels (28×28 Fashion-MNIST
    → 32×32 as the data loader pads it). An image that would be more than a quarter padding on
    a side (another aspect ratio, or much smaller) is refused: a ValueError naming both sizes.
    """
    from PIL import Image, ImageOps
    if channels not in (1, 3):
        raise ValueError(f"images can be read for 1- or 3-channel models, not {channels}")
    h, w = size
    out = []
    for path in paths:
        if Path(path).is_dir():
            raise ValueError(f"input image {path} is a folder; give the image files (e.g. {path}/*.png)")
        if not Path(path).is_file():
            raise InputNotFound(f"no such input image: {path}")
        try:
            img = Image.open(path).convert("L" if channels == 1 else "RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
        given = f"{img.width}x{img.height}"
        if img.width > w or img.height > h:
            img = ImageOps.contain(img, (w, h), method=Image.BOX)
        if img.width < 0.75 * w or img.height < 0.75 * h:  # padding would make up more than a quarter of it
            raise ValueError(f"image {path} is {given}; this model "
                             f"takes {w}x{h} images (larger ones of the same shape are shrunk, ones at least "
                             f"{math.ceil(0.75 * w)}x{math.ceil(0.75 * h)} padded): give images of aspect {w}:{h}")
        arr = np.asarray(img, dtype=np.float32).reshape(img.height, img.width, channels)
        top, left = (h - img.height) // 2, (w - img.width) // 2
        arr = np.pad(arr, ((top, h - img.height - top), (left, w - img.width - left), (0, 0)), mode="edge")
        out.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_images(path: str | Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A set of real images, (N, channels, H, W) in [-1, 1]: a folder of image files (read as
    ``read_images`` does), or a .safetensors file whose ``images`` tensor already has that shape."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return read_images(files, channels, size)
    if not path.is_file():
        raise InputNotFound(f"no reference images at {path}: give a folder of images or a .safetensors file "
                                "with an 'images' tensor")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: reference images are a folder of images or a .safetensors file")
    from . import io
    tensors = io.load_tensors(path)
    if "images" not in tensors:
        raise ValueError(f"{path} has no 'images' tensor (it has: {', '.join(sorted(tensors)) or 'nothing'})")
    images = tensors["images"].float()
    if images.ndim != 4 or tuple(images.shape[1:]) != (channels, *size):
        raise ValueError(f"{path}: images of shape {tuple(images.shape)}; the model makes (N, {channels}, "
                         f"{size[0]}, {size[1]})")
    if not torch.isfinite(images).all() or images.min() < -1 or images.max() > 1:
        raise ValueError(f"{path}: images must be finite and in [-1, 1] (the models' space)")
    return images
