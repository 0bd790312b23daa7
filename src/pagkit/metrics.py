"""Sample-quality metrics on the features of a Fashion-MNIST classifier that pagkit trains and ships.

* FD and KID: torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance``
  with the classifier's penultimate features in place of Inception's.
* IS analogue: torchmetrics' ``InceptionScore`` on the classifier's logits.
* k-NN precision and recall (Kynkäänniemi et al. 2019, k = 3): torchmetrics lacks them.

Images enter as float tensors in [-1, 1] (the diffusion models' space), (N, 1, 32, 32).
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import io

CLASSIFIER_NAME = "fmnist-classifier"  # the primary feature network (the metrics' fd, kid, ...)
SECOND_CLASSIFIER_NAME = "fmnist-classifier-b"  # the second one, of another design and seed (fd_b, kid_b)


class FashionClassifier(nn.Module):
    """A small VGG-style CNN for 32×32 Fashion-MNIST; ``features`` is its 128-d penultimate layer."""

    num_features = 128

    def __init__(self, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))
        self.body = nn.Sequential(block(1, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * width * 16, self.num_features),
                                  nn.ReLU())
        self.classify = nn.Linear(self.num_features, 10)
        self.width = width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ResNetClassifier(nn.Module):
    """A small ResNet for 32×32 Fashion-MNIST, unlike ``FashionClassifier`` by design: a strided stem
    (16×16), three residual stages (16×16, 8×8, 4×4; strided convolutions, no max pooling, no dropout), and
    ``features`` is the global average of the last stage (4·width channels, 96 at width 24) rather than a
    fully connected layer over the flattened map."""

    def __init__(self, width: int = 24):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.body = nn.Sequential(_ResidualBlock(width, width, 1), _ResidualBlock(width, 2 * width, 2),
                                  _ResidualBlock(2 * width, 4 * width, 2))
        self.num_features = 4 * width
        self.classify = nn.Linear(self.num_features, 10)
        self.width = width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


# config.json's "arch" -> (class, default width); a config without "arch" is the original VGG-style one
ARCHITECTURES = {"vgg": (FashionClassifier, 16), "resnet": (ResNetClassifier, 24)}


class FeatureExtractor(nn.Module):
    """What torchmetrics calls: images in [-1, 1] → the classifier's features (or its logits)."""

    def __init__(self, classifier: FashionClassifier, logits: bool = False):
        super().__init__()
        self.classifier = classifier.eval()
        self.logits = logits
        self.num_features = 10 if logits else classifier.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = x.float().clamp(-1, 1)
            return self.classifier(x) if self.logits else self.classifier.features(x)


class PassThrough(nn.Module):
    """A feature module for torchmetrics when the inputs already are features (or logits)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def classifier_dir(name: str = CLASSIFIER_NAME) -> Path:
    return Path(__file__).parent / "models" / name


def second_classifier_dir() -> Path:
    return classifier_dir(SECOND_CLASSIFIER_NAME)


def make_classifier(arch: str = "vgg", width: int | None = None) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown classifier arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    cls, default_width = ARCHITECTURES[arch]
    return cls(width=width or default_width)


def check_classifier(path: str | Path | None = None) -> Path:
    """The classifier folder ``path`` (default: the shipped primary one), if it holds a classifier; else a clear
    error, before any sampling."""
    path = Path(path) if path else classifier_dir()
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise io.InputNotFound(f"no classifier at {path} (model.safetensors + config.json); train one with "
                                "`python -m pagkit.metrics --train-classifier`")
    return path


def load_classifier(path: str | Path | None = None) -> nn.Module:
    """A feature classifier folder (model.safetensors + config.json, whose "arch" names the design; default
    "vgg"): the shipped primary one when ``path`` is None. Weights are read with safetensors only."""
    path = check_classifier(path)
    config = json.loads((path / "config.json").read_text())
    model = make_classifier(config.get("arch", "vgg"), config["width"])
    model.load_state_dict(io.load_tensors(path / "model.safetensors"))
    return model.eval()


def train_classifier(out: str | Path | None = None, epochs: int = 10, batch_size: int = 128, seed: int = 0,
                     threads: int = 2, data_dir=None, arch: str = "vgg", width: int | None = None,
                     command: str | None = None) -> float:
    """Train a feature classifier; writes model.safetensors, config.json (arch, width, test accuracy, seed,
    command, minutes). Returns the test accuracy."""
    import time

    from tqdm.auto import tqdm

    from .data import load_fashion_mnist
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out) if out else classifier_dir()
    x_train, y_train = load_fashion_mnist("train", data_dir)
    x_test, y_test = load_fashion_mnist("test", data_dir)
    model = make_classifier(arch, width)
    began = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    steps = epochs * (len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc=f"classifier ({arch})", unit="step")
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        for i in range(len(x_train) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x = x_train[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    accuracy = classifier_accuracy(model, x_test, y_test)
    minutes = (time.perf_counter() - began) / 60
    io.save_tensors(out / "model.safetensors", model.state_dict())
    io.write_json(out / "config.json", {"arch": arch, "width": model.width, "num_features": model.num_features,
                                        "test_accuracy": accuracy, "epochs": epochs, "batch_size": batch_size,
                                        "seed": seed, "command": command, "train_minutes": round(minutes, 1),
                                        "threads": threads,
                                        "data": "Fashion-MNIST train (60k), horizontal flips; accuracy on the "
                                                "10k test set"})
    return accuracy


@torch.no_grad()
def classifier_accuracy(model: FashionClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum().item() for i in range(0, len(x), 1000))
    return correct / len(x)


# sync_on_compute=False everywhere: under torchrun, rank 0 alone computes metrics over all shards.
def _fill(metric, real: torch.Tensor | None, fake: torch.Tensor, chunk: int = 1000):
    if real is not None:
        for part in real.split(chunk):
            metric.update(part, real=True)
    for part in fake.split(chunk):
        metric.update(part, real=False)
    return metric.compute()


@contextmanager
def _no_buffer_warning():
    """Hush torchmetrics' warning that KID and IS keep every feature: ours fit easily (128-d classifier or
    2048-d Inception features, at most ~80 MB for 10,000 samples)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Metric `.*` will save all extracted features", category=UserWarning)
        yield


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, extractor: nn.Module) -> float:
    """FD between two sets on ``extractor``'s features (torchmetrics' FID with a custom feature module).

    ``extractor``: e.g. ``FeatureExtractor(load_classifier())`` for images in [-1, 1]; it needs ``num_features``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    return float(_fill(FrechetInceptionDistance(feature=extractor, sync_on_compute=False), real, fake))


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, extractor: nn.Module,
                    subset_size: int = 1000) -> tuple[float, float]:
    """KID (mean, std over random subsets) on ``extractor``'s features."""
    from torchmetrics.image.kid import KernelInceptionDistance
    subset_size = min(subset_size, len(real), len(fake))
    with _no_buffer_warning():
        metric = KernelInceptionDistance(feature=extractor, subset_size=subset_size, sync_on_compute=False)
    mean, std = _fill(metric, real, fake)
    return float(mean), float(std)


def inception_score(fake: torch.Tensor, classifier: FashionClassifier, splits: int = 10) -> tuple[float, float]:
    """IS analogue: exp E_x KL(p(y|x) ‖ p(y)) with the classifier's class probabilities (at most 10)."""
    extractor = FeatureExtractor(classifier, logits=True)
    return inception_score_from_logits(torch.cat([extractor(part) for part in fake.split(1000)]), splits)


def inception_score_from_logits(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """torchmetrics' ``InceptionScore`` (mean, std over ``splits``) on precomputed class logits."""
    from torchmetrics.image.inception import InceptionScore
    with _no_buffer_warning():
        metric = InceptionScore(feature=PassThrough(logits.shape[1]), splits=splits, sync_on_compute=False)
    metric.update(logits)
    mean, std = metric.compute()
    return float(mean), float(std)


@torch.no_grad()
def features(images: torch.Tensor, classifier: FashionClassifier) -> torch.Tensor:
    return torch.cat([classifier.features(chunk) for chunk in images.float().split(1000)])


def _kth_neighbour_radii(feats: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(feats, feats)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    precision: fraction of fakes inside the union of k-NN balls around the reals;
    recall: fraction of reals inside the union of k-NN balls around the fakes.
    """
    real, fake = real_features.double(), fake_features.double()

    def coverage(points, manifold):
        radii = _kth_neighbour_radii(manifold, k)
        inside = torch.zeros(len(points), dtype=torch.bool)
        for i in range(0, len(points), 1000):
            inside[i:i + 1000] = (torch.cdist(points[i:i + 1000], manifold) <= radii[None]).any(dim=1)
        return inside.double().mean().item()

    return coverage(fake, real), coverage(real, fake)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="train pagkit's Fashion-MNIST feature classifier")
    parser.add_argument("--train-classifier", action="store_true", required=True)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="vgg",
                        help="vgg: the primary fmnist-classifier's design; resnet: fmnist-classifier-b's")
    parser.add_argument("--width", type=int, default=None, help="channels of the first stage (default per arch)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import shlex
    import sys
    command = "python -m pagkit.metrics " + shlex.join(sys.argv[1:])
    accuracy = train_classifier(args.out, epochs=args.epochs, seed=args.seed, threads=args.threads, arch=args.arch,
                                width=args.width, command=command)
    print(f"test accuracy: {accuracy:.4f}")
