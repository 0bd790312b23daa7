"""The measurement operators of restoration: y = A(x₀) + σ_y·n, with A linear and differentiable.

Operators act on batches (B, C, H, W) in the models' pixel range [-1, 1]; each A has its adjoint. The tasks and
their defaults, chosen for 32×32 Fashion-MNIST (σ_y = 0.05 everywhere, as in DPS):

==================  ====================================================================
``box-inpaint``     ``BoxInpaint(size=None)``: the centre box (half the image) is missing
``random-inpaint``  ``RandomInpaint(keep_fraction=0.3, seed=0)``: a seeded fixed pixel mask
``gaussian-deblur`` ``GaussianBlur(kernel_size=9, sigma=1.5)``
``motion-deblur``   ``MotionBlur(kernel_size=9, intensity=0.5, seed=0)``: a seeded trajectory
``sr2``, ``sr4``    ``SuperResolution(factor=2 | 4)``: area (box-average) downsampling
==================  ====================================================================
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..perturb import gaussian_kernel_1d


@dataclass
class Operator:
    """A measurement y = A(x) + σ_y·n of (B, C, H, W) images in [-1, 1]; A is linear and differentiable.

    ``noise_sigma``: σ_y, the std of the Gaussian measurement noise (in the [-1, 1] pixel range).
    """

    noise_sigma: float = field(default=0.05, kw_only=True)

    def __post_init__(self):
        _require(_real(self.noise_sigma) and self.noise_sigma >= 0, "noise_sigma", self.noise_sigma,
                 "a finite number >= 0")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A(x)."""
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀy: ⟨A(x), y⟩ = ⟨x, Aᵀy⟩."""
        raise NotImplementedError

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """y = A(x) + σ_y·n, n ~ N(0, I) drawn from ``generator``."""
        y = self(x)
        if self.noise_sigma == 0:
            return y
        return y + self.noise_sigma * randn_tensor(y.shape, generator=generator, device=y.device, dtype=y.dtype)

    def observe(self, image: torch.Tensor) -> torch.Tensor:
        """An already-degraded image (at the measurement's size) as a measurement y."""
        return image

    def degraded_image(self, y: torch.Tensor) -> torch.Tensor:
        """y shown at the image size (for grids)."""
        return y


def _real(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _require(ok: bool, name: str, value, expected: str) -> None:
    """An operator's parameter check: a ValueError that names the parameter and what it must be."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


class _Mask(Operator):
    """A(x) = m ⊙ x with a 0/1 mask m (1 = observed): a diagonal projection, so Aᵀ = A."""

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """m of shape (1, 1, H, W), in x's dtype and device."""
        raise NotImplementedError

    def __call__(self, x):
        return x * self.mask(x)

    def adjoint(self, y):
        return y * self.mask(y)

    def measure(self, x, generator=None):
        # noise only where something is measured: an unobserved pixel of y is a structural 0, and a
        # constant there would still change ‖y − A(x̂₀)‖ (and so the size of DPS's step)
        return self(super().measure(x, generator))

    def observe(self, image):
        return self(image)


@dataclass
class BoxInpaint(_Mask):
    """The centre ``size`` × ``size`` box is missing (default: half the image's shorter side)."""

    size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        _require(self.size is None or isinstance(self.size, int) and self.size > 0, "box size", self.size,
                 "a positive integer (pixels)")

    def mask(self, x):
        h, w = x.shape[-2:]
        s = self.size if self.size is not None else min(h, w) // 2
        if s > min(h, w):
            raise ValueError(f"box size {s} does not fit in a {h}x{w} image")
        m = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
        top, left = (h - s) // 2, (w - s) // 2
        m[..., top:top + s, left:left + s] = 0
        return m


@dataclass
class RandomInpaint(_Mask):
    """A random ``keep_fraction`` of the pixels is observed (all channels); the mask is fixed by ``seed``."""

    keep_fraction: float = 0.3
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        _require(_real(self.keep_fraction) and 0 < self.keep_fraction <= 1, "keep_fraction", self.keep_fraction,
                 "in (0, 1]")

    def mask(self, x):
        h, w = x.shape[-2:]
        u = torch.rand(h, w, generator=torch.Generator().manual_seed(self.seed))
        return (u < self.keep_fraction).to(dtype=x.dtype, device=x.device).view(1, 1, h, w)


class _Blur(Operator):
    """A(x) = k ⋆ x per channel, reflect padding (borders are not darkened); ``kernel`` is (k, k), k odd."""

    kernel: torch.Tensor

    def _weight(self, x):
        return self.kernel.to(dtype=x.dtype, device=x.device).expand(x.shape[1], 1, -1, -1)

    def __call__(self, x):
        p = self.kernel.shape[-1] // 2
        return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), self._weight(x), groups=x.shape[1])

    def adjoint(self, y):
        p = self.kernel.shape[-1] // 2
        return _reflect_pad_adjoint(F.conv_transpose2d(y, self._weight(y), groups=y.shape[1]), p)


def _reflect_pad_adjoint(g: torch.Tensor, p: int) -> torch.Tensor:
    """Transpose of ``F.pad(x, (p,) * 4, mode="reflect")``: fold each mirrored border back onto its source."""
    for dim in (-1, -2):
        n = g.shape[dim] - 2 * p
        centre = g.narrow(dim, p, n).clone()
        centre.narrow(dim, 1, p).add_(g.narrow(dim, 0, p).flip(dim))  # padded[i] = x[p − i], i < p
        centre.narrow(dim, n - 1 - p, p).add_(g.narrow(dim, n + p, p).flip(dim))  # padded[n+p+i] = x[n−2−i]
        g = centre
    return g


def _check_kernel_size(kernel_size) -> None:
    _require(isinstance(kernel_size, int) and kernel_size > 0 and kernel_size % 2 == 1, "kernel_size",
             kernel_size, "a positive odd integer")


@dataclass
class GaussianBlur(_Blur):
    """Gaussian blur of width ``sigma`` (pixels) on a ``kernel_size`` × ``kernel_size`` kernel."""

    kernel_size: int = 9
    sigma: float = 1.5

    def __post_init__(self):
        super().__post_init__()
        _check_kernel_size(self.kernel_size)
        _require(_real(self.sigma) and self.sigma > 0, "blur sigma", self.sigma, "a positive number")
        g = gaussian_kernel_1d(self.sigma, self.kernel_size, dtype=torch.float64)
        self.kernel = torch.outer(g, g)


@dataclass
class MotionBlur(_Blur):
    """Blur along a seeded random camera-shake trajectory (see ``motion_kernel``)."""

    kernel_size: int = 9
    intensity: float = 0.5
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check_kernel_size(self.kernel_size)
        _require(_real(self.intensity) and 0 <= self.intensity <= 1, "motion intensity", self.intensity, "in [0, 1]")
        self.kernel = motion_kernel(self.kernel_size, self.intensity, self.seed)


def motion_kernel(size: int, intensity: float = 0.5, seed: int = 0) -> torch.Tensor:
    """A (size, size) motion-blur kernel (sums to 1): a random trajectory, rasterised.

    The camera path is a walk of 8·size unit steps whose heading turns at each step by
    N(0, (intensity·π/4)²): intensity 0 is a straight line, 1 a tangled shake (the spirit
    of the trajectories of Boracchi & Foi 2012, which DPS's ``motionblur`` kernels use).
    The path is centred, scaled to span the kernel, and each point is splatted
    bilinearly onto the grid. The same (size, intensity, seed) gives the same kernel.
    """
    g = torch.Generator().manual_seed(seed)
    n = 8 * size
    heading = 2 * math.pi * torch.rand(1, generator=g, dtype=torch.float64)
    turns = intensity * math.pi / 4 * torch.randn(n, generator=g, dtype=torch.float64)
    angles = heading + turns.cumsum(0)
    path = torch.stack([angles.cos(), angles.sin()], dim=1).cumsum(0)
    path = path - (path.max(0).values + path.min(0).values) / 2  # centre the bounding box
    path = path * ((size - 1) / 2 / path.abs().max().clamp_min(1e-12)) + (size - 1) / 2
    kernel = torch.zeros(size, size, dtype=torch.float64)
    lo = path.floor().clamp(0, size - 2).long()
    frac = path - lo
    for dy in (0, 1):  # bilinear splatting: each point shares its unit weight among its 4 neighbours
        for dx in (0, 1):
            w = (frac[:, 1] if dy else 1 - frac[:, 1]) * (frac[:, 0] if dx else 1 - frac[:, 0])
            kernel.index_put_((lo[:, 1] + dy, lo[:, 0] + dx), w, accumulate=True)
    return kernel / kernel.sum()


@dataclass
class SuperResolution(Operator):
    """A(x) = the mean of each ``factor`` × ``factor`` block (area downsampling); y is H/factor × W/factor."""

    factor: int = 4

    def __post_init__(self):
        super().__post_init__()
        _require(isinstance(self.factor, int) and self.factor >= 2, "super-resolution factor", self.factor,
                 "an integer >= 2")

    def __call__(self, x):
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the factor {self.factor}")
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor ** 2

    def degraded_image(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest")  # A's pseudo-inverse: A(A⁺y) = y


TASKS = {
    "box-inpaint": BoxInpaint,
    "random-inpaint": RandomInpaint,
    "gaussian-deblur": GaussianBlur,
    "motion-deblur": MotionBlur,
    "sr2": lambda **kw: SuperResolution(factor=2, **kw),
    "sr4": lambda **kw: SuperResolution(factor=4, **kw),
}
_TASK_CLASS = {"sr2": SuperResolution, "sr4": SuperResolution}


def task_parameters(task: str) -> list[str]:
    """The parameters ``make_operator(task, ...)`` accepts."""
    check_task(task)
    names = [f.name for f in dataclasses.fields(_TASK_CLASS.get(task, TASKS[task]))]
    return [n for n in names if not (task in _TASK_CLASS and n == "factor")]  # sr2/sr4 fix their factor


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def make_operator(task: str, **params) -> Operator:
    """The operator of ``task`` (see TASKS); ``params`` override its defaults, None meaning the default."""
    params = {k: v for k, v in params.items() if v is not None}
    valid = task_parameters(task)
    wrong = sorted(set(params) - set(valid))
    if wrong:
        raise ValueError(f"task {task!r} takes no parameter {', '.join(wrong)}; its parameters: {', '.join(valid)}")
    return TASKS[task](**params)
