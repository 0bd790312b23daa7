"""Fashion-MNIST from the idx .gz files, as tensors in [-1, 1], padded 28 -> 32.

The data never comes from the network: pagkit reads the four idx files from a
folder (default ``../shared/data/fashion-mnist`` beside the checkout, or
``$PAGKIT_DATA``).
"""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. "
            "Point --data (or $PAGKIT_DATA) at the folder holding the idx .gz files.")
    images = torch.from_numpy(_read_idx(paths[0]).copy()).float().div_(127.5).sub_(1.0)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    images = images.unsqueeze(1)
    if pad:
        images = F.pad(images, (2, 2, 2, 2), value=-1.0)
    return images, labels
